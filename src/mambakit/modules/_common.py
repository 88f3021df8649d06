"""Helpers shared by the mixers: input checks, cache slots, the conv window kept for decoding, dt init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..cache import InferenceParams
from ..ops.decode import fused_decode_applies


def check_hidden(name: str, x: torch.Tensor, d_model: int, weight: torch.Tensor) -> None:
    """hidden_states must be (batch, seqlen, d_model) on the weights' device, in their dtype unless autocast."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: hidden_states must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: hidden_states has shape {tuple(x.shape)}, expected (batch, seqlen, {d_model})")
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: hidden_states is empty (shape {tuple(x.shape)}); give at least one token")
    if x.device != weight.device:
        raise ValueError(f"{name}: hidden_states is on {x.device} but the layer is on {weight.device}; "
                         f"move one of them (model.to(device) or x.to(device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: hidden_states is {x.dtype} but the layer's weights are {weight.dtype}; "
                         f"convert one (model.to({x.dtype}) or x.to({weight.dtype})) or run under torch.autocast")


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """cu_seqlens (num_seqs + 1,) -> seq_idx (1, seqlen) int32: the packed sequence each position belongs to."""
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seqlen:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at seqlen={seqlen}, got {cu_seqlens.tolist()}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths.long()).unsqueeze(0)


def cache_slot(inference_params: InferenceParams, layer_idx, make) -> tuple:
    """The (conv_state, ssm_state) of this layer, allocated by ``make()`` on first use."""
    if layer_idx is None:
        raise ValueError("this layer was built without layer_idx, so it cannot keep an inference cache; "
                         "pass layer_idx=... to the constructor")
    states = inference_params.key_value_memory_dict.get(layer_idx)
    if states is None:
        states = make()
        inference_params.key_value_memory_dict[layer_idx] = states
    return states


def fused_step_states(module, hidden_states, inference_params, size_limited=True):
    """(conv_state, ssm_state) for a mixer's fused decode step (``ops.decode``), or None where the step does
    not apply: wrong backend, batch or (when ``size_limited``) layer size, or a cache whose rows are not the
    batch's."""
    if not fused_decode_applies(hidden_states, module.in_proj.weight if size_limited else None):
        return None
    b = hidden_states.shape[0]
    conv_state, ssm_state = cache_slot(inference_params, module.layer_idx,
                                       lambda: module.allocate_inference_cache(b, 0))
    if conv_state.shape[0] != b or ssm_state.shape[0] != b:
        return None
    return conv_state, ssm_state


def new_conv_window(prefix: torch.Tensor | None, x: torch.Tensor, d_conv: int,
                    seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The last d_conv conv inputs after ``x``, the state a decoding step needs.

    prefix: (batch, dim, d_conv) earlier inputs (the cache) or None for zeros; x: (batch, dim, seqlen).
    With packed/left-padded rows (seq_idx), inputs of earlier sequences are zeroed so they never leak into the
    next token's convolution. Returns (batch, dim, d_conv).
    """
    b, d, l = x.shape
    if prefix is None:
        prefix = x.new_zeros(b, d, d_conv)
    window = torch.cat([prefix.to(x.dtype), x[:, :, -d_conv:]], dim=-1)[:, :, -d_conv:]
    if seq_idx is not None:
        k = min(l, d_conv)
        keep = torch.ones(b, d_conv, dtype=torch.bool, device=x.device)
        keep[:, d_conv - k:] = seq_idx[:, l - k:] == seq_idx[:, -1:]
        if l < d_conv:  # older entries come from the prefix, which belongs to the sequence at position 0
            keep[:, : d_conv - k] = (seq_idx[:, :1] == seq_idx[:, -1:])
        window = window * keep.unsqueeze(1).to(window.dtype)
    return window


def varlen_conv_windows(x: torch.Tensor, cu_seqlens: torch.Tensor, d_conv: int) -> torch.Tensor:
    """Per packed sequence, its last d_conv conv inputs (zeros before its start).

    x: (1, dim, total_len); cu_seqlens: (num_seqs + 1,). Returns (num_seqs, dim, d_conv).
    """
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    pos = ends.unsqueeze(1) - d_conv + torch.arange(d_conv, device=x.device)  # (num_seqs, d_conv)
    valid = pos >= starts.unsqueeze(1)
    gathered = x[0][:, pos.clamp_min(0)]  # (dim, num_seqs, d_conv)
    return (gathered * valid.to(x.dtype)).permute(1, 0, 2)


def init_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform in [dt_min, dt_max], so that softplus(bias) lies in that range."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus, Mamba paper's dt initialisation


def conv_weight(conv: torch.nn.Conv1d) -> torch.Tensor:
    """(dim, 1, width) depthwise Conv1d weight -> (dim, width) as the conv ops take it."""
    return conv.weight[:, 0, :]


def decode_constants(module: torch.nn.Module, params: tuple, compute):
    """``compute()`` (fp32 A, D, dt bias... for the decode step), cached until one of ``params`` changes.

    Decoding would otherwise spend several tiny kernels per layer and token recomputing -exp(A_log) and
    casts. The cache is used only with autograd off, and is keyed on each parameter's storage, version
    counter, dtype and device, so in-place updates (optimizer steps, load_state_dict, .to()) invalidate it.
    """
    if torch.is_grad_enabled():
        return compute()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = module.__dict__.get("_decode_constants")
    if cached is None or cached[0] != key:
        cached = (key, compute())
        module.__dict__["_decode_constants"] = cached
    return cached[1]


def silu_gate(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x * F.silu(z)
