"""Mamba (Mamba-1): the selective SSM mixer of Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces" (2023), with the official `mamba_ssm.modules.mamba_simple.Mamba` constructor, initialisation and
parameter names, so official checkpoints load without renaming.

Data flow: in_proj -> (x, z); causal conv1d(x) + SiLU; x_proj -> (dt, B, C); dt_proj (bias added inside the
scan); selective scan with A = -exp(A_log), D skip, z gate, softplus(dt + bias); out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import InferenceParams
from ..ops import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update
from ..ops.decode import linear, mamba1_state_update, norm_linear
from ._common import (cache_slot, check_hidden, conv_weight, decode_constants, fused_step_states, init_dt_bias,
                      new_conv_window, seq_idx_from_cu_seqlens)


def _seq_major_linear(linear: nn.Module, x: torch.Tensor, seq_major_input: bool = False) -> torch.Tensor:
    """linear applied per position, giving (b, out_features, l) with stride 1 along l: one batched GEMM
    weight @ x (no copy of the output). x: (b, l, in_features), or (b, in_features, l) with seq_major_input.
    A linear that is not a plain nn.Linear (e.g. a quantised or adapter-wrapped layer) is called as is."""
    if type(linear) is not nn.Linear:
        out = linear(x.transpose(1, 2) if seq_major_input else x)  # (b, l, out)
        return out.transpose(1, 2)
    out = torch.matmul(linear.weight, x if seq_major_input else x.transpose(1, 2))
    return out if linear.bias is None else out + linear.bias[:, None].to(out.dtype)  # autocast: out.dtype


class Mamba(nn.Module):
    """Mamba-1 mixer. Input and output: (batch, seqlen, d_model).

    ``use_fast_path`` is accepted for compatibility and ignored: mambakit picks its kernels in ``mambakit.ops``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if d_state < 1 or d_conv < 1:
            raise ValueError(f"Mamba: d_state ({d_state}) and d_conv ({d_conv}) must be >= 1")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj weight scaled so that dt keeps its variance at initialisation (official init).
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True  # the LM's weight init zeroes other biases, not this one

        # S4D-real initialisation: A_n = -(n + 1), stored as log(-A) in fp32 whatever the module dtype.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, inference_params: InferenceParams | None = None,
                seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        inference_params: when given, the final conv window and SSM state are written to it; when its
        seqlen_offset > 0 the pass continues from the stored state (a decode step for one token, a chunk of a
        chunked prefill for more). seq_idx (batch, seqlen) / cu_seqlens (num_seqs + 1,): packed sequences that
        must not see each other (mambakit extension; the official Mamba-1 has neither).
        """
        check_hidden("Mamba", hidden_states, self.d_model, self.in_proj.weight)
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            conv_state, ssm_state = cache_slot(inference_params, self.layer_idx,
                                               lambda: self._new_cache(batch, hidden_states))
            continuing = inference_params.seqlen_offset > 0
            if continuing and seqlen == 1 and seq_idx is None:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"Mamba: cu_seqlens packs sequences into batch 1, got batch {batch}")
            if inference_params is not None:
                raise ValueError("Mamba: cu_seqlens with inference_params is not supported for Mamba-1; "
                                 "use seq_idx with left padding, or run the sequences as a padded batch")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)

        # Every (b, d, l) tensor of the scan is laid out seqlen-contiguous (stride 1 along l), as in the official
        # module: the time-parallel scan kernels and the conv's walk kernel read that layout fastest (H200,
        # b4 d3072 l4096 bf16 scan fwd+bwd 6.1 ms against 8.8 for channels-last views).
        xz = _seq_major_linear(self.in_proj, hidden_states)  # (b, 2*d_inner, l)
        x, z = xz.chunk(2, dim=1)  # each (b, d_inner, l)
        if conv_state is not None:
            window = new_conv_window(conv_state if continuing else None, x, self.d_conv, seq_idx)
        x = causal_conv1d_fn(x, conv_weight(self.conv1d), self.conv1d.bias, seq_idx=seq_idx,
                             initial_states=conv_state[:, :, 1:].to(x.dtype) if continuing else None,
                             activation=self.activation)  # (b, d_inner, l)
        x_dbl = _seq_major_linear(self.x_proj, x, seq_major_input=True)  # (b, dt_rank + 2*d_state, l)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = torch.matmul(self.dt_proj.weight, dt)  # (b, d_inner, l); the bias is added inside the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y = selective_scan_fn(
            x, dt, A, B, C, self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=ssm_state is not None,
            initial_state=ssm_state.float() if continuing else None, seq_idx=seq_idx,
        )
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
            conv_state.copy_(window)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step. hidden_states: (batch, 1, d_model); the states are updated in place.

        Returns (out (batch, 1, d_model), conv_state, ssm_state).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba.step decodes one token at a time: hidden_states must be (batch, 1, "
                             f"{self.d_model}), got {tuple(hidden_states.shape)}")
        xz = self.in_proj(hidden_states[:, 0])  # (b, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, conv_weight(self.conv1d), self.conv1d.bias,
                                 activation=self.activation)  # (b, d_inner)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (b, d_inner)
        A, D, dt_bias = self._step_constants()
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def _step_constants(self):
        """fp32 A (d_inner, d_state), D and dt bias (d_inner,), cached between decode steps."""
        return decode_constants(self, (self.A_log, self.D, self.dt_proj.bias), lambda: (
            -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()))

    def fused_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, norm, residual_in_fp32: bool,
                   inference_params: InferenceParams):
        """The block's residual add + RMSNorm and this decode step in 4 kernels (``ops.decode``) instead of 7.

        hidden_states, residual: (batch, 1, d_model); norm: the block's RMSNorm. Returns (out, residual), both
        (batch, 1, d_model), or None where this layer's modules are not the plain ones (tensor-parallel
        shards), and then the caller runs the unfused step.
        """
        if any(type(m) is not nn.Linear for m in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)):
            return None
        # fused at every size: on an H200 the 2.8b step takes 2.1-2.3 ms fused vs 3.1-3.3 unfused (notes/gpu_run4)
        states = fused_step_states(self, hidden_states, inference_params, size_limited=False)
        if states is None:
            return None
        conv_state, ssm_state = states
        xz, residual, x = norm_linear(hidden_states[:, 0], self.in_proj.weight, norm.weight, norm.eps,
                                      residual=None if residual is None else residual[:, 0],
                                      residual_in_fp32=residual_in_fp32, bias=self.in_proj.bias,
                                      conv_state=conv_state, conv_start=0, conv_weight=conv_weight(self.conv1d),
                                      conv_bias=self.conv1d.bias)  # (b, 2*d_inner), x = conv output (b, d_inner)
        x_dbl = linear(x, self.x_proj.weight, self.x_proj.bias)  # (b, dt_rank + 2*d_state)
        A, D, dt_bias = self._step_constants()
        y = mamba1_state_update(x, x_dbl, self.dt_proj.weight, dt_bias, ssm_state, A, D, z=xz[:, self.d_inner:])
        return linear(y, self.out_proj.weight, self.out_proj.bias).unsqueeze(1), residual.unsqueeze(1)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zeroed (conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state)) for this layer."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _new_cache(self, batch: int, like: torch.Tensor):
        return self.allocate_inference_cache(batch, 0)
