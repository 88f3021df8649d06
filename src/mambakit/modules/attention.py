"""MHA: the (grouped-query) self-attention layer of hybrid Mamba/attention models, with the constructor and
parameter names of the official `mamba_ssm.modules.mha.MHA`, so hybrid checkpoints (state-spaces/mamba2attn-2.7b)
load without renaming.

Data flow: in_proj -> [q, k, v (, mlp_up, mlp_gate)]; optional depthwise causal conv1d over q, k, v (no
activation); rotary embedding on the first rotary_emb_dim dims of q and k; scaled dot-product attention
(PyTorch SDPA); [context, mlp_up * silu(mlp_gate)] -> out_proj.

Inference cache (``InferenceParams.key_value_memory_dict[layer_idx]``): ``(kv_cache, conv_state)`` with
kv_cache (batch, max_seqlen, 2, num_heads_kv, head_dim) like the official layout and conv_state
(batch, qkv_dim, d_conv), the last d_conv conv *inputs*; ``(kv_cache,)`` when d_conv == 0.

Positions of the new tokens while continuing from the cache (seqlen_offset > 0):
- ``inference_params.lengths_per_sample`` (batch,) int device tensor, when set: per-row number of cached
  tokens. The cache write index, the rotary positions and the attention mask all come from it, with no host
  sync, so a captured CUDA graph replays correctly as long as the caller advances the tensor between replays
  (the official graph decoder does the same). The host ``seqlen_offset`` then only has to be > 0.
- otherwise the Python int ``seqlen_offset``: the same for all rows; attention reads only the filled prefix.
Left-padded batches (generate's ragged prompts) pass ``seq_idx`` (padding 0, prompt 1) with
``lengths_per_sample`` counting each row's real tokens: only the real tokens enter the cache, left-aligned.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import InferenceParams
from ..ops import causal_conv1d_fn, causal_conv1d_update
from ._common import cache_slot, check_hidden, conv_weight, new_conv_window, seq_idx_from_cu_seqlens, silu_gate

# enable_gqa appeared in torch 2.5; before it, K/V heads are repeated explicitly.
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


# ---- rotary embedding ------------------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., seqlen) int -> cos, sin (..., seqlen, rotary_dim // 2) in fp32.

    Frequencies base^(-2i/rotary_dim) (RoFormer, Su et al. 2021); computed on the fly rather than kept in a
    buffer so that ``model.to(bfloat16)`` cannot round them and no state-dict key is added.
    """
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., l, rotary_dim / 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of each head; the rest pass through.

    x: (batch, seqlen, nheads, head_dim); cos, sin: (seqlen, r) or (batch, seqlen, r). Non-interleaved
    (GPT-NeoX) pairs dim i with i + r; interleaved (GPT-J) pairs 2i with 2i + 1 (flash-attn's two layouts).
    """
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., l, 1, r): broadcast over heads
    xr = x[..., : 2 * r].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :r], xr[..., r:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * r:]), dim=-1)


def positions_in_segments(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, seqlen) -> each token's position inside its packed sequence (batch, seqlen) int64."""
    idx = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of each token's segment
    return idx - first


def _last_sequence_start(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx (batch, seqlen), non-decreasing -> (batch,) index where each row's last sequence starts."""
    return (seq_idx != seq_idx[:, -1:]).sum(dim=1)


def _real_tokens_first(kv: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Rotate each row of kv (b, l, ...) left so that its last sequence (the real tokens) comes first."""
    b, l = seq_idx.shape
    index = (torch.arange(l, device=kv.device) + _last_sequence_start(seq_idx).unsqueeze(1)) % l  # (b, l)
    return kv.gather(1, index.view(b, l, *([1] * (kv.dim() - 2))).expand_as(kv))


class MHA(nn.Module):
    """Multi-head self-attention (MHA/GQA/MQA) for hybrid models. Input and output: (batch, seqlen, embed_dim).

    mlp_dim > 0 adds a parallel gated MLP branch (rounded up to a multiple of 256, as in the official layer)
    that shares in_proj and out_proj with the attention.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None,
                 head_dim: int | None = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None, causal: bool = False,
                 layer_idx: int | None = None, d_conv: int = 0, rotary_emb_dim: int = 0,
                 rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads < 1 or num_heads_kv < 1 or num_heads % num_heads_kv:
            raise ValueError(f"MHA: num_heads={num_heads} must be a positive multiple of num_heads_kv={num_heads_kv}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"MHA: embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                                 f"set head_dim explicitly")
            head_dim = embed_dim // num_heads
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
            raise ValueError(f"MHA: rotary_emb_dim={rotary_emb_dim} must be even and at most head_dim={head_dim}")
        if d_conv < 0:
            raise ValueError(f"MHA: d_conv must be >= 0, got {d_conv}")
        self.embed_dim, self.layer_idx, self.causal = embed_dim, layer_idx, causal
        self.num_heads, self.num_heads_kv, self.head_dim = num_heads, num_heads_kv, head_dim
        self.softmax_scale = softmax_scale
        self.d_conv = d_conv
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256  # official rounding, so checkpoint shapes match
        self.qkv_dim = head_dim * (num_heads + 2 * num_heads_kv)

        self.in_proj = nn.Linear(embed_dim, self.qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, kernel_size=d_conv, padding=d_conv - 1,
                                    groups=self.qkv_dim, **factory)
        self.out_proj = nn.Linear(head_dim * num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias,
                                  **factory)

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None,
                seq_idx: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seqlen, embed_dim) -> (batch, seqlen, embed_dim).

        seq_idx (batch, seqlen), non-decreasing per row / cu_seqlens (num_seqs + 1,) for packed sequences:
        tokens attend only within their own sequence and rotary positions restart at each sequence. With an
        inference cache, seq_idx marks left padding (see ``_attend_cached``); cu_seqlens takes no cache.
        """
        check_hidden("MHA", x, self.embed_dim, self.in_proj.weight)
        qkv = self.in_proj(x)  # (b, l, qkv_dim + mlp_dim)
        x_mlp = None
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = silu_gate(up, gate)  # (b, l, mlp_dim / 2)
        if cu_seqlens is not None:
            if x.shape[0] != 1:
                raise ValueError(f"MHA: cu_seqlens packs sequences into batch 1, got batch {x.shape[0]}")
            if inference_params is not None:
                raise ValueError("MHA: packed sequences (cu_seqlens) cannot use an inference cache; give each "
                                 "sequence its own batch row")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
        if inference_params is None:
            context = self._attend_sequence(qkv, seq_idx)
        else:
            context = self._attend_cached(qkv, inference_params, seq_idx)
        context = context.flatten(-2)  # (b, l, num_heads * head_dim)
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)

    def _attend_sequence(self, qkv: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """Whole sequences, no cache. qkv: (b, l, qkv_dim) -> context (b, l, num_heads, head_dim)."""
        if self.d_conv > 0:
            qkv = self._conv(qkv, seq_idx=seq_idx)
        q, k, v = self._split_heads(qkv)
        if seq_idx is None:
            q, k = self._rotate(q, k, torch.arange(qkv.shape[1], device=qkv.device))
            return self._sdpa(q, k, v, None, is_causal=self.causal)
        q, k = self._rotate(q, k, positions_in_segments(seq_idx))
        return self._sdpa(q, k, v, self._segment_mask(seq_idx), is_causal=False)

    def _attend_cached(self, qkv: torch.Tensor, params: InferenceParams, seq_idx) -> torch.Tensor:
        """Prefill (seqlen_offset == 0) or continue (decode step / chunk of a chunked prefill) from the cache.

        Where row b's new tokens go: positions ``base_b + 0, 1, ...`` with base_b = 0 for a prefill, else
        ``lengths_per_sample[b]`` (device tensor, no host sync) or ``seqlen_offset`` (host int, all rows).
        Left padding (seq_idx: the row's last sequence is its real tokens, earlier ones padding): only the real
        tokens enter the cache, left-aligned, so that rotary positions and the cache match the unpadded row;
        this needs ``lengths_per_sample``, which the caller advances by each row's real token count.
        """
        b, l, _ = qkv.shape
        kv_cache, conv_state = self._cache_entry(params, b, qkv.dtype)
        offset, lengths = params.seqlen_offset, params.lengths_per_sample
        if seq_idx is not None and lengths is None:
            raise ValueError("MHA: left-padded rows (seq_idx) with an inference cache need "
                             "inference_params.lengths_per_sample: a (batch,) int32 tensor of zeros before the "
                             "prefill, advanced by each row's number of real tokens after every forward")
        if (offset == 0 or lengths is None) and offset + l > kv_cache.shape[1]:
            raise ValueError(f"MHA layer {self.layer_idx}: {offset} cached + {l} new tokens exceed the KV "
                             f"cache's max_seqlen={kv_cache.shape[1]}; allocate a longer cache")
        if self.d_conv > 0:
            qkv = self._conv_cached(qkv, conv_state, offset > 0, seq_idx)
        q, k, v = self._split_heads(qkv)
        arange = torch.arange(l, device=qkv.device)
        if offset == 0:
            positions = arange if seq_idx is None else positions_in_segments(seq_idx)
            q, k = self._rotate(q, k, positions)
            kv = torch.stack([k, v], dim=2)  # (b, l, 2, num_heads_kv, head_dim)
            kv_cache[:, :l] = kv if seq_idx is None else _real_tokens_first(kv, seq_idx)
            mask = None if seq_idx is None else self._segment_mask(seq_idx)
            return self._sdpa(q, k, v, mask, is_causal=self.causal and mask is None)
        if lengths is None:  # host positions, the same for every row: write the slice, read the filled prefix
            q, k = self._rotate(q, k, offset + arange)
            kv_cache[:, offset:offset + l] = torch.stack([k, v], dim=2)
            kv_cache = kv_cache[:, :offset + l]
            return self._attend_prefix(q, kv_cache, offset + arange, None)
        base = lengths[:b].long().unsqueeze(1)  # (b, 1)
        first = torch.zeros_like(base) if seq_idx is None else _last_sequence_start(seq_idx).unsqueeze(1)
        q, k = self._rotate(q, k, base + arange - first)
        kv = torch.stack([k, v], dim=2)
        if seq_idx is not None:
            kv = _real_tokens_first(kv, seq_idx)
        # Per-row write index from a device tensor: no host sync, CUDA-graph safe. Padding (moved behind the
        # real tokens) lands past them, in slots that later tokens overwrite.
        kv_cache.scatter_(1, (base + arange).view(b, l, 1, 1, 1).expand_as(kv), kv)
        return self._attend_prefix(q, kv_cache, base + arange - first, arange < first)

    def _attend_prefix(self, q, kv_cache, positions, padding) -> torch.Tensor:
        """q (b, l, h, d) at ``positions`` ((l,) or (b, l)) against the cache (b, S, 2, h_kv, d): key j is
        visible when j <= the query's position (causal) or j <= the last new position. Padding queries (b, l)
        see every key: their outputs are discarded, and a fully masked row would be NaN."""
        keys = torch.arange(kv_cache.shape[1], device=q.device)
        limit = positions if self.causal else positions[..., -1:].expand_as(positions)
        mask = keys <= limit.unsqueeze(-1)  # (l, S) or (b, l, S)
        if padding is not None:
            mask = mask | padding.unsqueeze(-1)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (b, 1, l, S): broadcast over heads
        k, v = kv_cache.unbind(dim=2)  # each (b, S, num_heads_kv, head_dim)
        return self._sdpa(q, k, v, mask, is_causal=False)

    def _cache_entry(self, params: InferenceParams, batch: int, dtype):
        """(kv_cache[:batch], conv_state[:batch] or None), allocated on first use with params.max_seqlen."""
        states = cache_slot(params, self.layer_idx,
                            lambda: self.allocate_inference_cache(batch, params.max_seqlen, dtype=dtype))
        kv_cache, conv_state = states[0], (states[1] if len(states) > 1 else None)
        if batch > kv_cache.shape[0]:
            raise ValueError(f"MHA layer {self.layer_idx}: batch {batch} exceeds the KV cache's batch "
                             f"{kv_cache.shape[0]}")
        return kv_cache[:batch], None if conv_state is None else conv_state[:batch]

    def _segment_mask(self, seq_idx: torch.Tensor) -> torch.Tensor:
        """(b, 1, l, l) bool: same packed sequence (and causal)."""
        mask = seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(-2)
        if self.causal:
            mask = mask & torch.ones_like(mask[0]).tril()
        return mask.unsqueeze(1)

    # ---- pieces -------------------------------------------------------------------------------------------
    def _split_heads(self, qkv: torch.Tensor):
        """(b, l, qkv_dim) -> q (b, l, num_heads, head_dim), k, v (b, l, num_heads_kv, head_dim)."""
        d = self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_heads_kv * d, self.num_heads_kv * d], dim=-1)
        return q.unflatten(-1, (self.num_heads, d)), k.unflatten(-1, (-1, d)), v.unflatten(-1, (-1, d))

    def _rotate(self, q, k, positions):
        if self.rotary_emb_dim == 0:
            return q, k
        cos, sin = rotary_cos_sin(positions, self.rotary_emb_dim, self.rotary_emb_base)
        return (apply_rotary(q, cos, sin, self.rotary_emb_interleaved),
                apply_rotary(k, cos, sin, self.rotary_emb_interleaved))

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """q (b, lq, h, d), k, v (b, lk, h_kv, d), mask broadcastable to (b, h, lq, lk) -> (b, lq, h, d)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        extra = {}
        if self.num_heads != self.num_heads_kv:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                rep = self.num_heads // self.num_heads_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=self.softmax_scale, **extra)
        return out.transpose(1, 2)

    def _conv(self, qkv: torch.Tensor, seq_idx=None, initial_states=None) -> torch.Tensor:
        """Depthwise causal conv over the sequence, no activation (official). (b, l, qkv_dim) -> same."""
        out = causal_conv1d_fn(qkv.transpose(1, 2), conv_weight(self.conv1d), self.conv1d.bias,
                               seq_idx=seq_idx, initial_states=initial_states)
        return out.transpose(1, 2)

    def _conv_cached(self, qkv: torch.Tensor, conv_state: torch.Tensor, continuing: bool, seq_idx) -> torch.Tensor:
        """Conv that keeps the last d_conv *inputs* in conv_state (b, qkv_dim, d_conv), updated in place.

        (The official layer stores the conv outputs after a prefill, so its decoding drifts from its own
        forward pass; the inputs are what the next token's convolution reads.)
        """
        if continuing and qkv.shape[1] == 1 and seq_idx is None:
            out = causal_conv1d_update(qkv[:, 0], conv_state, conv_weight(self.conv1d), self.conv1d.bias)
            return out.unsqueeze(1)
        qkv_t = qkv.transpose(1, 2)  # (b, qkv_dim, l)
        window = new_conv_window(conv_state if continuing else None, qkv_t, self.d_conv, seq_idx)
        out = self._conv(qkv, seq_idx=seq_idx,
                         initial_states=conv_state[:, :, 1:].to(qkv.dtype) if continuing else None)
        conv_state.copy_(window)
        return out

    # ---- cache --------------------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs) -> tuple:
        """(kv_cache (b, max_seqlen, 2, num_heads_kv, head_dim)[, conv_state (b, qkv_dim, d_conv)]).

        Zeroed rather than empty: a CUDA-graph decode step reads the whole cache under a mask, and a NaN in an
        unwritten slot would leak through the masked softmax (0 * NaN).
        """
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        device = self.out_proj.weight.device
        kv_cache = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, device=device,
                               dtype=dtype)
        if self.d_conv == 0:
            return (kv_cache,)
        return kv_cache, torch.zeros(batch_size, self.qkv_dim, self.d_conv, device=device, dtype=dtype)
