"""Mamba2: the SSD mixer of Dao & Gu, "Transformers are SSMs" (2024), with the official
`mamba_ssm.modules.mamba2.Mamba2` constructor, initialisation and parameter names.

Data flow: in_proj -> [z0, x0 (optional gated MLP part), z, xBC, dt]; causal conv1d(xBC) + SiLU;
split xBC -> (x, B, C); chunked SSD scan with A = -exp(A_log), D skip, softplus(dt + dt_bias) clamped to
dt_limit; gated RMSNorm(y, z) per group (norm_before_gate=False); out_proj.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import InferenceParams
from ..ops import (RMSNormGated, causal_conv1d_fn, causal_conv1d_update, mamba_chunk_scan_combined,
                   selective_state_update)
from ..ops import decode as _decode
from ..ops.decode import gated_norm_linear, linear, mamba2_state_update, norm_linear
from .block import add_norm
from ._common import (cache_slot, check_hidden, conv_weight, decode_constants, fused_step_states, init_dt_bias,
                      new_conv_window, seq_idx_from_cu_seqlens, silu_gate, varlen_conv_windows)


class Mamba2(nn.Module):
    """Mamba-2 mixer. Input and output: (batch, seqlen, d_model).

    ``use_mem_eff_path`` is accepted for compatibility; ``process_group`` must be None here (tensor parallelism:
    ``mambakit.distributed.parallelize(model, group)`` splits a built model). ``recompute_mixer`` (mambakit):
    in training passes (gradients on, no cache, no cu_seqlens, d_ssm = d_inner, plain out_proj and norm) run
    the mixer after in_proj through ``mamba_split_conv1d_scan_combined``, recomputed in the backward: about a
    quarter of the activation memory kept per layer, for one more forward of conv, scan and norm.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: int = 2, headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                 A_init_range=(1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit=(0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: int | None = None, process_group=None, sequence_parallel: bool = True,
                 device=None, dtype=None, recompute_mixer: bool = False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if process_group is not None:
            raise NotImplementedError("Mamba2 does not take a process_group in mambakit: build the model with "
                                      "process_group=None, then split it with "
                                      "mambakit.distributed.parallelize(model, group) (see docs/hybrid_and_tp.md)")
        self.d_model, self.d_state, self.d_conv, self.conv_init, self.expand = d_model, d_state, d_conv, conv_init, expand
        self.d_inner = int(expand * d_model)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm > self.d_inner or self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} must be <= d_inner={self.d_inner} and divisible by "
                             f"headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if ngroups < 1 or self.nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads={self.nheads}")
        if chunk_size < 1:
            raise ValueError(f"Mamba2: chunk_size must be >= 1, got {chunk_size}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.recompute_mixer = recompute_mixer
        self.layer_idx = layer_idx

        # in_proj output order: [z, x, B, C, dt] (plus [z0, x0] in front when d_ssm < d_inner).
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor, device=device))
        self.dt_bias._no_weight_decay = True
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(lo, hi)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    # ---- full sequence ------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, seqlen: int | None = None, seq_idx: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        Also accepts u as (batch * seqlen, d_model) with ``seqlen`` given (the official layout). inference_params:
        as in Mamba; with cu_seqlens (batch 1, packed) each packed sequence gets its own cache row.
        """
        flat = u.dim() == 2
        if flat:
            if seqlen is None or u.shape[0] % seqlen:
                raise ValueError(f"Mamba2: a 2-D input {tuple(u.shape)} needs seqlen dividing its first dimension")
            u = u.reshape(u.shape[0] // seqlen, seqlen, u.shape[1])
        check_hidden("Mamba2", u, self.d_model, self.in_proj.weight)
        batch, seqlen, _ = u.shape
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
            conv_state, ssm_state = cache_slot(inference_params, self.layer_idx,
                                               lambda: self.allocate_inference_cache(rows, 0))
            continuing = inference_params.seqlen_offset > 0
            if continuing and seqlen == 1 and seq_idx is None and cu_seqlens is None:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out.reshape(batch, self.d_model) if flat else out
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"Mamba2: cu_seqlens packs sequences into batch 1, got batch {batch}")
            if continuing:
                raise ValueError("Mamba2: cu_seqlens cannot continue from a cache (seqlen_offset > 0)")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)

        zxbcdt = self.in_proj(u)  # (b, l, d_in_proj)
        d_mlp = self.d_inner - self.d_ssm
        if (self.recompute_mixer and torch.is_grad_enabled() and inference_params is None and cu_seqlens is None
                and d_mlp == 0 and self._plain_tail()):
            out = self._recomputed_mixer(zxbcdt, seq_idx)
            return out.reshape(batch * seqlen, self.d_model) if flat else out
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        xBC_t = xBC.transpose(1, 2)  # (b, conv_dim, l), channels-last view
        if conv_state is not None:
            window = (varlen_conv_windows(xBC_t, cu_seqlens, self.d_conv) if cu_seqlens is not None else
                      new_conv_window(conv_state if continuing else None, xBC_t, self.d_conv, seq_idx))
        xBC = causal_conv1d_fn(xBC_t, conv_weight(self.conv1d), self.conv1d.bias, seq_idx=seq_idx,
                               initial_states=conv_state[:, :, 1:].to(xBC.dtype) if continuing else None,
                               activation=self.activation).transpose(1, 2)  # (b, l, conv_dim)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = self._scan(x, dt, B, C, z, seq_idx, cu_seqlens, ssm_state, continuing)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
            conv_state.copy_(window)
        y = y.reshape(batch, seqlen, self.d_ssm)  # (b, l, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([silu_gate(x0, z0), y], dim=-1)
        out = self.out_proj(y)  # (b, l, d_model)
        return out.reshape(batch * seqlen, self.d_model) if flat else out

    def _plain_tail(self) -> bool:
        """out_proj and the norm are the plain modules the recomputed mixer reimplements (not, e.g., tensor-
        parallel ones that all-reduce: those keep the ordinary path)."""
        return type(self.out_proj) is nn.Linear and (not self.rmsnorm or type(self.norm) is RMSNormGated)

    def _recomputed_mixer(self, zxbcdt: torch.Tensor, seq_idx) -> torch.Tensor:
        """conv -> scan -> norm -> out_proj of zxbcdt (b, l, d_in_proj), recomputed in the backward."""
        from ..ops.ssd.split_conv1d_scan import mamba_split_conv1d_scan_combined

        return mamba_split_conv1d_scan_combined(
            zxbcdt, conv_weight(self.conv1d), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
            self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D, self.chunk_size,
            seq_idx=seq_idx, dt_limit=self.dt_limit, headdim=self.headdim, ngroups=self.ngroups,
            rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
            rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6, norm_before_gate=self.norm_before_gate,
            outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias)

    def _scan(self, x, dt, B, C, z, seq_idx, cu_seqlens, ssm_state, continuing):
        """SSD over (b, l, ...) pieces; returns y (b, l, h, p) [and the state to keep in the cache]."""
        b, l, _ = x.shape
        A = -torch.exp(self.A_log.float())  # (nheads,)
        keep = ssm_state is not None
        out = mamba_chunk_scan_combined(
            x.reshape(b, l, self.nheads, self.headdim), dt, A,
            B.reshape(b, l, self.ngroups, self.d_state), C.reshape(b, l, self.ngroups, self.d_state),
            chunk_size=self.chunk_size,
            D=self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D,
            z=None if self.rmsnorm else z.reshape(b, l, self.nheads, self.headdim),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            initial_states=ssm_state.float() if continuing else None,
            seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            return_final_states=keep and cu_seqlens is None,
            return_varlen_states=keep and cu_seqlens is not None,
        )
        return out  # y, or (y, final states), or (y, one final state per packed sequence) with cu_seqlens

    # ---- decoding -----------------------------------------------------------------------------------
    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step. hidden_states: (batch, 1, d_model); the states are updated in place."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba2.step decodes one token at a time: hidden_states must be (batch, 1, "
                             f"{self.d_model}), got {tuple(hidden_states.shape)}")
        zxbcdt = self.in_proj(hidden_states[:, 0])  # (b, d_in_proj)
        d_mlp = self.d_inner - self.d_ssm
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        xBC = causal_conv1d_update(xBC, conv_state, conv_weight(self.conv1d), self.conv1d.bias,
                                   activation=self.activation)  # (b, conv_dim)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = x.shape[0]
        A, D, dt_bias = self._step_constants()
        if self.dt_limit != (0.0, float("inf")):
            # The official step ignores dt_limit; apply it so that decoding matches the full forward.
            dt = F.softplus(dt.float() + dt_bias).clamp(*self.dt_limit)
            dt_bias = None
        y = selective_state_update(
            ssm_state, x.reshape(b, self.nheads, self.headdim), dt, A,
            B.reshape(b, self.ngroups, self.d_state), C.reshape(b, self.ngroups, self.d_state), D,
            z=None if self.rmsnorm else z.reshape(b, self.nheads, self.headdim),
            dt_bias=dt_bias, dt_softplus=dt_bias is not None,
        ).reshape(b, self.d_ssm)  # (b, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([silu_gate(x0, z0), y], dim=-1)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def _step_constants(self):
        """fp32 A (nheads,), D (nheads,) or (nheads, headdim), dt bias (nheads,), cached between decode steps."""
        return decode_constants(self, (self.A_log, self.D, self.dt_bias), lambda: (
            -torch.exp(self.A_log.float()),
            (self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D).float(),
            self.dt_bias.float()))

    def fused_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, norm, residual_in_fp32: bool,
                   inference_params: InferenceParams):
        """The block's residual add + RMSNorm and this decode step in 3 kernels (``ops.decode``) instead of 6.

        hidden_states, residual: (batch, 1, d_model); norm: the block's RMSNorm. Returns (out, residual), both
        (batch, 1, d_model), or None where the layer is not covered (a gated-MLP part, d_ssm < d_inner, or
        tensor-parallel shards), and then the caller runs the unfused step.
        """
        if self.d_ssm != self.d_inner or type(self.in_proj) is not nn.Linear or type(self.out_proj) is not nn.Linear:
            return None
        # a layer too large for our in_proj GEMV (decode.LARGE_MAMBA2_STEP): norm, cuBLAS and the conv update
        # kernels first, then the same fused state update and gated norm + out_proj
        large = self.in_proj.weight.numel() > _decode.MAX_FUSED_WEIGHT
        if large and _decode.LARGE_MAMBA2_STEP != "fused_out":
            return None
        states = fused_step_states(self, hidden_states, inference_params, size_limited=not large)
        if states is None:
            return None
        conv_state, ssm_state = states
        if large:
            normed, residual = add_norm(hidden_states[:, 0], None if residual is None else residual[:, 0], norm,
                                        residual_in_fp32)
            zxbcdt = self.in_proj(normed)  # (b, d_in_proj)
            xBC = causal_conv1d_update(zxbcdt[:, self.d_ssm:self.d_ssm + self.conv_dim], conv_state,
                                       conv_weight(self.conv1d), self.conv1d.bias, activation=self.activation)
        else:
            zxbcdt, residual, xBC = norm_linear(
                hidden_states[:, 0], self.in_proj.weight, norm.weight, norm.eps,
                residual=None if residual is None else residual[:, 0], residual_in_fp32=residual_in_fp32,
                bias=self.in_proj.bias, conv_state=conv_state, conv_start=self.d_ssm,
                conv_weight=conv_weight(self.conv1d),
                conv_bias=self.conv1d.bias)  # [z, xBC, dt] (b, d_in_proj); xBC = conv output (b, conv_dim)
        A, D, dt_bias = self._step_constants()
        y = mamba2_state_update(zxbcdt, xBC, ssm_state, A, D, dt_bias, self.dt_limit, self.ngroups,
                                dt_start=self.d_ssm + self.conv_dim, z_start=None if self.rmsnorm else 0)  # (b, d_ssm)
        if self.rmsnorm:
            out = gated_norm_linear(y, zxbcdt[:, :self.d_ssm], self.norm.weight, self.norm.eps,
                                    self.norm.group_size or self.d_ssm, self.norm.norm_before_gate,
                                    self.out_proj.weight, self.out_proj.bias)
        else:
            out = linear(y, self.out_proj.weight, self.out_proj.bias)
        return out.unsqueeze(1), residual.unsqueeze(1)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zeroed (conv_state (b, conv_dim, d_conv), ssm_state (b, nheads, headdim, d_state))."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        # channels-last conv state like the official layout (the update kernel reads a (b, d_conv) column per step)
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device,
                                 dtype=conv_dtype).transpose(1, 2)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state
