"""Causal depthwise 1-D convolution: the short convolution in front of every Mamba SSM.

The official ``causal-conv1d`` package's API: ``causal_conv1d_fn`` (full sequence, differentiable) and
``causal_conv1d_update`` (a few new tokens against a rolling window, in place, for decoding).

Dimensions: ``batch``, ``dim`` (channels), ``seqlen``, ``width`` (taps, 2..4 in Mamba), ``state_len``
(>= width - 1 columns of the decode window). Per channel ``c`` and position ``t``::

    out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - (width - 1) + k])

where positions before 0 read ``initial_states`` (zeros when None) and, with ``seq_idx``, a position never
reads a position of another packed sequence (it reads zero instead).

Reading order: references -> input checks -> PyTorch path -> Triton kernels -> launchers -> autograd ->
public ops.
"""

import contextlib

import torch
import torch.nn.functional as F

from mambakit.ops._dtypes import as_dtype, compute_dtype
from mambakit.ops._checks import PassedChecks, check_floating, check_same_device, check_seq_idx, check_shape, check_tensor, fail
from mambakit.ops.dispatch import current_backend, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # `import mambakit` must work without Triton; the kernels below are then never launched
    triton = None

    class tl:  # noqa: N801 - stand-in so that the kernel signatures below still evaluate
        constexpr = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_ref", "causal_conv1d_update_ref"]

_ACTIVATIONS = (None, "silu", "swish")
_TRITON_MAX_WIDTH = 4  # the kernels hold the window in registers, zero-padded to 4 taps


# ----------------------------------------------------------------------------------------------------------
# References: plain loops, the specification the tests hold every path to
# ----------------------------------------------------------------------------------------------------------


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None):
    """Reference causal conv, one position at a time (slow, readable; math in float64 for float64 inputs).

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) int;
    initial_states: (batch, dim, width - 1), the inputs before position 0 (they belong to the sequence of
    position 0). Returns out: (batch, dim, seqlen) in x's dtype, and with ``return_final_states`` also
    final_states: (batch, dim, width - 1), the last width - 1 inputs (initial_states included).
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    cdt = compute_dtype(x)
    pad = (initial_states.to(cdt) if initial_states is not None
           else x.new_zeros(batch, dim, width - 1, dtype=cdt))
    ext = torch.cat([pad, x.to(cdt)], dim=-1)  # (batch, dim, width - 1 + seqlen)
    if seq_idx is not None:
        seq_ext = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)  # (batch, w-1+l)
    out = x.new_empty(batch, dim, seqlen, dtype=cdt)
    for t in range(seqlen):
        window = ext[:, :, t:t + width]  # (batch, dim, width): inputs t-width+1 .. t
        if seq_idx is not None:
            same = seq_ext[:, t:t + width] == seq_idx[:, t:t + 1]  # (batch, width)
            window = window * same[:, None, :]
        out[:, :, t] = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        out = out + bias.to(cdt)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final_states = ext[:, :, ext.shape[-1] - (width - 1):].to(x.dtype)
    if final_states_out is not None:
        final_states = final_states_out.copy_(final_states)
    return out, final_states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    """Reference decode step: ``conv_state`` (its rows ``conv_state_indices``) is updated in place.

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (state_batch, dim, state_len) with
    state_len >= width - 1. Without ``cache_seqlens`` the window shifts left by seqlen and x is appended;
    with ``cache_seqlens`` (batch,) the state is a circular buffer: the window is the width - 1 entries before
    index cache_seqlens (mod state_len) and x is written from there on. Returns out shaped like x.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    batch, dim, seqlen = x3.shape
    width = weight.shape[1]
    cdt = compute_dtype(x)
    out = x3.new_empty(batch, dim, seqlen, dtype=cdt)
    for i in range(batch):
        row = i if conv_state_indices is None else int(conv_state_indices[i])
        state = conv_state[row]  # (dim, state_len), a view: written below
        state_len = state.shape[-1]
        if cache_seqlens is None:
            history = state[:, state_len - (width - 1):]
        else:
            start = int(cache_seqlens[i])
            history = state[:, [(start - (width - 1) + j) % state_len for j in range(width - 1)]]
        ext = torch.cat([history.to(cdt), x3[i].to(cdt)], dim=-1)  # (dim, width - 1 + seqlen)
        for t in range(seqlen):
            out[i, :, t] = (ext[:, t:t + width] * weight.to(cdt)).sum(-1)
        if cache_seqlens is None:
            full = torch.cat([state.to(cdt), x3[i].to(cdt)], dim=-1)
            state.copy_(full[:, full.shape[-1] - state_len:])
        else:
            for t in range(seqlen):
                state[:, (int(cache_seqlens[i]) + t) % state_len] = x3[i, :, t]
    if bias is not None:
        out = out + bias.to(cdt)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        fail(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def _check_weight_bias(weight, bias, dim, x):
    check_tensor("weight", weight, 2, "(dim, width)")
    if weight.shape[0] != dim or weight.shape[1] < 1:
        fail(f"weight has shape {tuple(weight.shape)}, expected ({dim}, width) (dim, width) for x with dim={dim}"
             "; a Conv1d weight (dim, 1, width) needs .squeeze(1)")
    if bias is not None:
        check_shape("bias", bias, (dim,), "(dim,)")
    check_floating(x=x, weight=weight, bias=bias)
    check_same_device("x", x, weight=weight, bias=bias)


def _check_fn_inputs(x, weight, bias, seq_idx, initial_states, final_states_out, activation):
    check_tensor("x", x, 3, "(batch, dim, seqlen)")
    batch, dim, seqlen = x.shape
    _check_weight_bias(weight, bias, dim, x)
    _check_activation(activation)
    width = weight.shape[1]
    for name, t in (("initial_states", initial_states), ("final_states_out", final_states_out)):
        if t is None:
            continue
        check_shape(name, t, (batch, dim, width - 1), f"(batch, dim, width - 1) for weight width {width}")
        check_same_device("x", x, **{name: t})
        if t.dtype != x.dtype:
            fail(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast it with .to(x.dtype)")
    check_seq_idx(seq_idx, batch, seqlen, x.device)  # syncs once per seq_idx tensor, not per call


def _check_update_inputs(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    check_tensor("x", x, (2, 3), "(batch, dim) or (batch, dim, seqlen)")
    batch, dim = x.shape[:2]
    seqlen = x.shape[2] if x.dim() == 3 else 1
    _check_weight_bias(weight, bias, dim, x)
    _check_activation(activation)
    width = weight.shape[1]
    check_tensor("conv_state", conv_state, 3, "(batch, dim, state_len)")
    check_floating(conv_state=conv_state)
    check_same_device("x", x, conv_state=conv_state, cache_seqlens=cache_seqlens,
                      conv_state_indices=conv_state_indices)
    state_len = conv_state.shape[2]
    if conv_state.shape[1] != dim or state_len < width - 1:
        fail(f"conv_state has shape {tuple(conv_state.shape)}, expected (batch, {dim}, state_len) with "
             f"state_len >= width - 1 = {width - 1}")
    for name, t in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if t is None:
            continue
        check_shape(name, t, (batch,), "(batch,)")
        if t.dtype not in (torch.int32, torch.int64):
            fail(f"{name} must be int32 or int64, got {t.dtype}")
    if conv_state_indices is None and conv_state.shape[0] != batch:
        fail(f"conv_state has batch {conv_state.shape[0]} but x has batch {batch}; pass conv_state_indices "
             "to pick rows of a larger cache")
    if cache_seqlens is not None and seqlen > state_len:
        fail(f"with cache_seqlens (circular buffer) x may hold at most state_len={state_len} new tokens, "
             f"got {seqlen}")


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (vectorised; autograd gives the gradients)
# ----------------------------------------------------------------------------------------------------------


def _conv_torch(x, weight, bias, seq_idx, initial_states, activation):
    """out: (batch, dim, seqlen) in the compute dtype (fp32, or fp64 for fp64 inputs), before the final cast."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    cdt = compute_dtype(x)
    pad = (initial_states.to(cdt) if initial_states is not None
           else x.new_zeros(batch, dim, width - 1, dtype=cdt))
    ext = torch.cat([pad, x.to(cdt)], dim=-1)  # (batch, dim, width - 1 + seqlen)
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    if seq_idx is None:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run conv1d in bf16/fp16
            out = F.conv1d(ext, w.unsqueeze(1), b, groups=dim)  # depthwise: (batch, dim, seqlen)
    else:
        # width <= 4 in practice: sum the shifted copies, each masked where its source position belongs to
        # another sequence. The padding positions belong to the sequence of position 0.
        seq_ext = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)  # (batch, w-1+l)
        out = None
        for k in range(width):
            same = (seq_ext[:, k:k + seqlen] == seq_idx).unsqueeze(1)  # (batch, 1, seqlen)
            term = ext[:, :, k:k + seqlen].masked_fill(~same, 0.0) * w[:, k:k + 1]
            out = term if out is None else out + term
        if b is not None:
            out = out + b[:, None]
    if activation is not None:
        out = F.silu(out)
    return out


def _final_states(x, initial_states, width):
    """The last width - 1 inputs of cat(initial_states or zeros, x): (batch, dim, width - 1), x's dtype."""
    batch, dim, seqlen = x.shape
    if seqlen >= width - 1:
        return x[:, :, seqlen - (width - 1):]
    pad = initial_states if initial_states is not None else x.new_zeros(batch, dim, width - 1)
    return torch.cat([pad[:, :, seqlen:], x], dim=-1)


def _update_torch(x3, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    """Vectorised decode step. x3: (batch, dim, seqlen); conv_state updated in place. Returns out like x3."""
    batch, dim, seqlen = x3.shape
    width = weight.shape[1]
    state_len = conv_state.shape[2]
    cdt = compute_dtype(x3)
    if seqlen == 1 and cache_seqlens is None and conv_state_indices is None:
        # The plain decode step: a multiply-add over the window is several times cheaper than F.conv1d
        # (per-call overhead dominates at one token on CPU).
        window = torch.cat([conv_state[:, :, 1:], as_dtype(x3, conv_state.dtype)], dim=-1)  # (b, dim, state_len)
        conv_state.copy_(window)
        out = (as_dtype(window[:, :, state_len - width:], cdt) * as_dtype(weight, cdt)).sum(-1, keepdim=True)
        if bias is not None:
            out = out + as_dtype(bias, cdt)[:, None]  # (b, d, 1)
        return F.silu(out) if activation is not None else out
    rows = conv_state if conv_state_indices is None else conv_state[conv_state_indices.long()]
    if cache_seqlens is None:
        full = torch.cat([rows.to(cdt), x3.to(cdt)], dim=-1)  # (batch, dim, state_len + seqlen)
        ext = full[:, :, full.shape[-1] - (width - 1 + seqlen):]  # (batch, dim, width - 1 + seqlen)
        new_rows = full[:, :, full.shape[-1] - state_len:].to(conv_state.dtype)
    else:
        start = cache_seqlens.long()[:, None]  # (batch, 1)
        hist_idx = (start + torch.arange(-(width - 1), 0, device=x3.device)) % state_len  # (batch, width-1)
        history = rows.gather(2, hist_idx[:, None, :].expand(batch, dim, width - 1))
        ext = torch.cat([history.to(cdt), x3.to(cdt)], dim=-1)
        write_idx = (start + torch.arange(seqlen, device=x3.device)) % state_len  # (batch, seqlen)
        new_rows = rows.scatter(2, write_idx[:, None, :].expand(batch, dim, seqlen), x3.to(conv_state.dtype))
    with torch.autocast(x3.device.type, enabled=False):  # autocast would run conv1d in bf16/fp16
        out = F.conv1d(ext, weight.to(cdt).unsqueeze(1), bias.to(cdt) if bias is not None else None, groups=dim)
    if conv_state_indices is None:
        conv_state.copy_(new_rows)
    else:
        conv_state.index_copy_(0, conv_state_indices.long(), new_rows)
    return F.silu(out) if activation is not None else out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# The taps are zero-padded to 4 (tap k of a width-W filter is weight column k - 4 + W), so one body serves
# widths 1..4: position t reads the tiles of inputs at t-3, t-2, t-1, t ("shifted tiles"). Math is fp32.
#
# How a kernel gets the shifted tiles depends on the memory layout (constexpr SPLIT):
# - seqlen contiguous (stride(2) == 1, SPLIT): a load at t-1 is misaligned, one load instruction per element.
#   Instead the kernel loads aligned tiles at t and t-8 (16-byte vectors) and splits each into its 8
#   interleaved columns (reshape + tl.split: the 8 columns of a group sit in one thread's registers); the
#   tile at t-1 is the join of columns (7 of the group before, 0..6), and so on.
# - channels contiguous (stride(1) == 1, Mamba-2's xBC.transpose(1, 2)): a shift along seqlen moves whole
#   rows, so shifted loads stay aligned and the repeated rows come from L1.
# ----------------------------------------------------------------------------------------------------------


@_jit
def _taps_1d(w_ptr, d_idx, d_mask, sw_d, sw_k, WIDTH: tl.constexpr):
    """The 4 zero-padded taps of channels d_idx, each (BLOCK_D,) fp32; w0 multiplies the input at t - 3."""
    w_row = w_ptr + d_idx * sw_d
    w3 = tl.load(w_row + (WIDTH - 1) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
    w2 = tl.zeros_like(w3)
    w1 = tl.zeros_like(w3)
    w0 = tl.zeros_like(w3)
    if WIDTH >= 2:
        w2 = tl.load(w_row + (WIDTH - 2) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
    if WIDTH >= 3:
        w1 = tl.load(w_row + (WIDTH - 3) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
    if WIDTH >= 4:
        w0 = tl.load(w_row + (WIDTH - 4) * sw_k, mask=d_mask, other=0.0).to(tl.float32)
    return w0, w1, w2, w3


@_jit
def _load_taps(w_ptr, d_idx, d_mask, sw_d, sw_k, WIDTH: tl.constexpr):
    """_taps_1d as (BLOCK_D, 1) columns, to scale (BLOCK_D, BLOCK_L) tiles."""
    w0, w1, w2, w3 = _taps_1d(w_ptr, d_idx, d_mask, sw_d, sw_k, WIDTH)
    return w0[:, None], w1[:, None], w2[:, None], w3[:, None]


@_jit
def _load_ext(x_base, init_base, d_loc, d_mask, pos, seqlen, sx_d, sx_l, si_d, si_l,
              WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """Inputs at positions pos (1-D) of channels d_loc: (BLOCK_D, len(pos)) fp32.

    x_base points at (batch, first channel, position 0). Positions < 0 read initial_states (zero when absent
    or before its first column), positions >= seqlen read zero.
    """
    p = pos[None, :]
    dm = d_mask[:, None]
    v = tl.load(x_base + d_loc[:, None] * sx_d + p * sx_l, mask=dm & (p >= 0) & (p < seqlen), other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        ip = p + (WIDTH - 1)
        h = tl.load(init_base + d_loc[:, None] * si_d + ip * si_l, mask=dm & (p < 0) & (ip >= 0), other=0.0)
        v += h.to(tl.float32)
    return v


@_jit
def _load_seq(seq_base, pos, seqlen, ss_l, seq0):
    """Sequence ids at positions pos (1-D) as (1, len(pos)); positions < 0 belong to the first sequence."""
    s = tl.load(seq_base + pos * ss_l, mask=(pos >= 0) & (pos < seqlen), other=-1)
    return tl.where(pos < 0, seq0, s)[None, :]


@_jit
def _tap4(e0, e1, e2, e3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ: tl.constexpr):
    """sum_k w_k e_k, where e_k counts only if its sequence id s_k equals s3's (the position written)."""
    if HAS_SEQ:
        e0 = tl.where(s0 == s3, e0, 0.0)
        e1 = tl.where(s1 == s3, e1, 0.0)
        e2 = tl.where(s2 == s3, e2, 0.0)
    return w0 * e0 + w1 * e1 + w2 * e2 + w3 * e3


@_jit
def _masked(v, s, s_ref, HAS_SEQ: tl.constexpr):
    if HAS_SEQ:
        v = tl.where(s == s_ref, v, 0.0)
    return v


@_jit
def _act(z, SILU: tl.constexpr):
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@_jit
def _act_grad(dy, z, SILU: tl.constexpr):
    """dy * act'(z); silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z)."""
    if SILU:
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy


@_jit
def _split8(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """t: (ROWS, COLS) -> its 8 interleaved columns t[:, 8j + i], i = 0..7, each (ROWS, COLS // 8)."""
    t = tl.reshape(t, (ROWS, COLS // 8, 2, 2, 2))  # column 8j + 4a + 2b + c -> (j, a, b, c)
    c0, c1 = tl.split(t)
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    t0, t4 = tl.split(b00)
    t2, t6 = tl.split(b01)
    t1, t5 = tl.split(b10)
    t3, t7 = tl.split(b11)
    return t0, t1, t2, t3, t4, t5, t6, t7


@_jit
def _join8(t0, t1, t2, t3, t4, t5, t6, t7, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Inverse of _split8: 8 tensors (ROWS, COLS // 8) -> (ROWS, COLS)."""
    c0 = tl.join(tl.join(t0, t4), tl.join(t2, t6))
    c1 = tl.join(tl.join(t1, t5), tl.join(t3, t7))
    return tl.reshape(tl.join(c0, c1), (ROWS, COLS))


@_jit
def _back3(cur, prev, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Tiles at t-1, t-2, t-3 from the tiles at t (cur) and t-8 (prev), without loading again."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(cur, ROWS, COLS)
    _, _, _, _, _, p5, p6, p7 = _split8(prev, ROWS, COLS)
    m1 = _join8(p7, c0, c1, c2, c3, c4, c5, c6, ROWS, COLS)
    m2 = _join8(p6, p7, c0, c1, c2, c3, c4, c5, ROWS, COLS)
    m3 = _join8(p5, p6, p7, c0, c1, c2, c3, c4, ROWS, COLS)
    return m1, m2, m3


@_jit
def _fwd3(cur, n0, n1, n2, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Tiles at t+1, t+2, t+3 from the tile at t and columns 0, 1, 2 of the groups of the tile at t+8."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(cur, ROWS, COLS)
    p1 = _join8(c1, c2, c3, c4, c5, c6, c7, n0, ROWS, COLS)
    p2 = _join8(c2, c3, c4, c5, c6, c7, n0, n1, ROWS, COLS)
    p3 = _join8(c3, c4, c5, c6, c7, n0, n1, n2, ROWS, COLS)
    return p1, p2, p3


@_jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, out_ptr, dim, seqlen,
    sx_b, sx_d, sx_l, sw_d, sw_k, ss_b, ss_l, si_b, si_d, si_l, so_b, so_d, so_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out = act(bias + sum_k w_k x[t - 3 + k]). Grid (seqlen tiles, dim tiles, batch); tile (BLOCK_D, BLOCK_L)."""
    l0 = tl.program_id(0) * BLOCK_L
    d0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    pos = l0 + tl.arange(0, BLOCK_L)
    x_base = x_ptr + b * sx_b + d0 * sx_d
    i_base = init_ptr + b * si_b + d0 * si_d
    w0, w1, w2, w3 = _load_taps(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    x3 = _load_ext(x_base, i_base, d_loc, d_mask, pos, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    if SPLIT:
        xp = _load_ext(x_base, i_base, d_loc, d_mask, pos - 8, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x2, x1, x0 = _back3(x3, xp, BLOCK_D, BLOCK_L)
    else:
        x2 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 1, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x1 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 2, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x0 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 3, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    s0, s1, s2, s3 = 0, 0, 0, 0
    if HAS_SEQ:
        s_base = seq_ptr + b * ss_b
        seq0 = tl.load(s_base)
        s3 = _load_seq(s_base, pos, seqlen, ss_l, seq0)
        if SPLIT:
            s2, s1, s0 = _back3(s3, _load_seq(s_base, pos - 8, seqlen, ss_l, seq0), 1, BLOCK_L)
        else:
            s2 = _load_seq(s_base, pos - 1, seqlen, ss_l, seq0)
            s1 = _load_seq(s_base, pos - 2, seqlen, ss_l, seq0)
            s0 = _load_seq(s_base, pos - 3, seqlen, ss_l, seq0)
    out = _tap4(x0, x1, x2, x3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ)
    if HAS_BIAS:
        out += tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    out = _act(out, SILU)
    o_ptrs = out_ptr + b * so_b + (d0 + d_loc)[:, None] * so_d + pos[None, :] * so_l
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask[:, None] & (pos[None, :] < seqlen))


@_jit
def _load_raw(x_base, init_base, d_loc, d_mask, pos, end, seqlen, sx_d, sx_l, si_d, si_l,
              WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """_load_ext in x's dtype, zero at pos >= end too: a prefetched tile stays packed in registers and is
    converted where it is used, so the wait for it lands there and not right after the load."""
    p = pos[None, :]
    dm = d_mask[:, None]
    v = tl.load(x_base + d_loc[:, None] * sx_d + p * sx_l, mask=dm & (p >= 0) & (p < seqlen) & (p < end),
                other=0.0)
    if HAS_INIT:
        ip = p + (WIDTH - 1)
        h = tl.load(init_base + d_loc[:, None] * si_d + ip * si_l, mask=dm & (p < 0) & (ip >= 0), other=0.0)
        v = tl.where(p < 0, h.to(v.dtype), v)
    return v


@_jit
def _conv_fwd_walk_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, out_ptr, dim, seqlen,
    sx_b, sx_d, sx_l, sw_d, sw_k, ss_b, ss_l, si_b, si_d, si_l, so_b, so_d, so_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, STEPS: tl.constexpr,
):
    """Forward, seqlen contiguous ("walk" variant). Grid (seqlen spans of STEPS * BLOCK_L, dim tiles, batch).

    A program walks its span one (BLOCK_D, BLOCK_L) tile at a time with _conv_fwd_kernel's split/join shifts,
    and issues the loads of tile i + 1 before it computes and stores tile i: two tiles in flight per thread
    instead of one, and the taps, bias and address setup paid once per span instead of once per tile.
    """
    l0 = tl.program_id(0) * (BLOCK_L * STEPS)
    d0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    span_end = l0 + BLOCK_L * STEPS  # a multiple of BLOCK_L: the masks below stay 16-byte uniform
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    pos = l0 + tl.arange(0, BLOCK_L)
    x_base = x_ptr + b * sx_b + d0 * sx_d
    i_base = init_ptr + b * si_b + d0 * si_d
    o_base = out_ptr + b * so_b + (d0 + d_loc)[:, None] * so_d
    s_base = seq_ptr + b * ss_b
    w0, w1, w2, w3 = _load_taps(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    bias = tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    seq0 = 0
    if HAS_SEQ:
        seq0 = tl.load(s_base)
    cur = _load_raw(x_base, i_base, d_loc, d_mask, pos, span_end, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, False)
    prev = _load_raw(x_base, i_base, d_loc, d_mask, pos - 8, span_end, seqlen, sx_d, sx_l, si_d, si_l, WIDTH,
                     HAS_INIT)
    for _ in range(0, tl.cdiv(tl.minimum(span_end, seqlen) - l0, BLOCK_L)):
        nxt = pos + BLOCK_L
        # the next tile of this span (nothing past its end: that is the next program's)
        cur_n = _load_raw(x_base, i_base, d_loc, d_mask, nxt, span_end, seqlen, sx_d, sx_l, si_d, si_l, WIDTH,
                          False)
        prev_n = _load_raw(x_base, i_base, d_loc, d_mask, nxt - 8, span_end, seqlen, sx_d, sx_l, si_d, si_l,
                           WIDTH, False)
        x3 = cur.to(tl.float32)
        x2, x1, x0 = _back3(x3, prev.to(tl.float32), BLOCK_D, BLOCK_L)
        s0, s1, s2, s3 = 0, 0, 0, 0
        if HAS_SEQ:
            s3 = _load_seq(s_base, pos, seqlen, ss_l, seq0)
            s2, s1, s0 = _back3(s3, _load_seq(s_base, pos - 8, seqlen, ss_l, seq0), 1, BLOCK_L)
        out = _act(bias + _tap4(x0, x1, x2, x3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ), SILU)
        tl.store(o_base + pos[None, :] * so_l, out.to(out_ptr.dtype.element_ty),
                 mask=d_mask[:, None] & (pos[None, :] < seqlen))
        cur, prev, pos = cur_n, prev_n, nxt


@_jit
def _next3_grads(x3, xn, dyn, s3, sn, w0, w1, w2, w3, bias,
                 HAS_SEQ: tl.constexpr, SILU: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """SPLIT layout: g = dy * act'(pre-activation) at columns 0, 1, 2 of the groups of the tile at t+8.

    x3, s3: inputs and ids of the tile at t; xn, dyn, sn: inputs, output grads and ids of the tile at t+8.
    Only these 3 of 8 columns are recomputed (the pre-activation costs two MUFU ops per position).
    """
    y0, y1, y2, _, _, _, _, _ = _split8(dyn, ROWS, COLS)
    if SILU:
        _, _, _, _, _, c5, c6, c7 = _split8(x3, ROWS, COLS)
        n0, n1, n2, _, _, _, _, _ = _split8(xn, ROWS, COLS)
        q5, q6, q7, r0, r1, r2 = 0, 0, 0, 0, 0, 0
        if HAS_SEQ:
            _, _, _, _, _, q5, q6, q7 = _split8(s3, 1, COLS)
            r0, r1, r2, _, _, _, _, _ = _split8(sn, 1, COLS)
        y0 = _act_grad(y0, bias + _tap4(c5, c6, c7, n0, q5, q6, q7, r0, w0, w1, w2, w3, HAS_SEQ), SILU)
        y1 = _act_grad(y1, bias + _tap4(c6, c7, n0, n1, q6, q7, r0, r1, w0, w1, w2, w3, HAS_SEQ), SILU)
        y2 = _act_grad(y2, bias + _tap4(c7, n0, n1, n2, q7, r0, r1, r2, w0, w1, w2, w3, HAS_SEQ), SILU)
    return y0, y1, y2


@_jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, dim, seqlen,
    sx_b, sx_d, sx_l, sw_d, sw_k, ss_b, ss_l, si_b, si_d, si_l, sy_b, sy_d, sy_l, sdx_b, sdx_d, sdx_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, same grid and tiles as the forward. With g = dy * act'(pre-activation):
    dx[t] = sum_k w_k g[t + 3 - k]; partial sums over the tile of dw_k = g[t] x[t - 3 + k] and db = g[t] go
    to row (batch * seqlen tiles + seqlen tile) of dw_ptr: (programs, dim, 4) and db_ptr: (programs, dim).
    """
    l0 = tl.program_id(0) * BLOCK_L
    d0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    pos = l0 + tl.arange(0, BLOCK_L)
    x_base = x_ptr + b * sx_b + d0 * sx_d
    i_base = init_ptr + b * si_b + d0 * si_d
    y_base = dy_ptr + b * sy_b + d0 * sy_d
    w0, w1, w2, w3 = _load_taps(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    bias = tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    x3 = _load_ext(x_base, i_base, d_loc, d_mask, pos, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    if SPLIT:
        xp = _load_ext(x_base, i_base, d_loc, d_mask, pos - 8, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x2, x1, x0 = _back3(x3, xp, BLOCK_D, BLOCK_L)
    else:
        x2 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 1, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x1 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 2, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
        x0 = _load_ext(x_base, i_base, d_loc, d_mask, pos - 3, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    # ids at t-3 .. t (s0..s3) and t+1 .. t+3 (s4..s6)
    s0, s1, s2, s3, s4, s5, s6, sn = 0, 0, 0, 0, 0, 0, 0, 0
    if HAS_SEQ:
        s_base = seq_ptr + b * ss_b
        seq0 = tl.load(s_base)
        s3 = _load_seq(s_base, pos, seqlen, ss_l, seq0)
        if SPLIT:
            s2, s1, s0 = _back3(s3, _load_seq(s_base, pos - 8, seqlen, ss_l, seq0), 1, BLOCK_L)
            sn = _load_seq(s_base, pos + 8, seqlen, ss_l, seq0)
            n0, n1, n2, _, _, _, _, _ = _split8(sn, 1, BLOCK_L)
            s4, s5, s6 = _fwd3(s3, n0, n1, n2, 1, BLOCK_L)
        else:
            s2 = _load_seq(s_base, pos - 1, seqlen, ss_l, seq0)
            s1 = _load_seq(s_base, pos - 2, seqlen, ss_l, seq0)
            s0 = _load_seq(s_base, pos - 3, seqlen, ss_l, seq0)
            s4 = _load_seq(s_base, pos + 1, seqlen, ss_l, seq0)
            s5 = _load_seq(s_base, pos + 2, seqlen, ss_l, seq0)
            s6 = _load_seq(s_base, pos + 3, seqlen, ss_l, seq0)
    dy = _load_ext(y_base, y_base, d_loc, d_mask, pos, seqlen, sy_d, sy_l, 0, 0, WIDTH, False)
    g0 = _act_grad(dy, bias + _tap4(x0, x1, x2, x3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ), SILU)
    # g at t+1, t+2, t+3
    if SPLIT:
        xn = x3
        if SILU:
            xn = _load_ext(x_base, i_base, d_loc, d_mask, pos + 8, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, False)
        dyn = _load_ext(y_base, y_base, d_loc, d_mask, pos + 8, seqlen, sy_d, sy_l, 0, 0, WIDTH, False)
        n0, n1, n2 = _next3_grads(x3, xn, dyn, s3, sn, w0, w1, w2, w3, bias, HAS_SEQ, SILU, BLOCK_D, BLOCK_L)
        g1, g2, g3 = _fwd3(g0, n0, n1, n2, BLOCK_D, BLOCK_L)
    else:
        g1 = _load_ext(y_base, y_base, d_loc, d_mask, pos + 1, seqlen, sy_d, sy_l, 0, 0, WIDTH, False)
        g2 = _load_ext(y_base, y_base, d_loc, d_mask, pos + 2, seqlen, sy_d, sy_l, 0, 0, WIDTH, False)
        g3 = _load_ext(y_base, y_base, d_loc, d_mask, pos + 3, seqlen, sy_d, sy_l, 0, 0, WIDTH, False)
        if SILU:
            x4 = _load_ext(x_base, i_base, d_loc, d_mask, pos + 1, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, False)
            x5 = _load_ext(x_base, i_base, d_loc, d_mask, pos + 2, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, False)
            x6 = _load_ext(x_base, i_base, d_loc, d_mask, pos + 3, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, False)
            g1 = _act_grad(g1, bias + _tap4(x1, x2, x3, x4, s1, s2, s3, s4, w0, w1, w2, w3, HAS_SEQ), SILU)
            g2 = _act_grad(g2, bias + _tap4(x2, x3, x4, x5, s2, s3, s4, s5, w0, w1, w2, w3, HAS_SEQ), SILU)
            g3 = _act_grad(g3, bias + _tap4(x3, x4, x5, x6, s3, s4, s5, s6, w0, w1, w2, w3, HAS_SEQ), SILU)
    dx = _tap4(g3, g2, g1, g0, s6, s5, s4, s3, w0, w1, w2, w3, HAS_SEQ)  # the last argument is the position written
    dx_ptrs = dx_ptr + b * sdx_b + (d0 + d_loc)[:, None] * sdx_d + pos[None, :] * sdx_l
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=d_mask[:, None] & (pos[None, :] < seqlen))
    row = b * tl.num_programs(0) + tl.program_id(0)
    d_idx = d0 + d_loc
    dw_row = dw_ptr + row * dim * 4 + d_idx * 4
    tl.store(dw_row, tl.sum(_masked(g0 * x0, s0, s3, HAS_SEQ), axis=1), mask=d_mask)
    tl.store(dw_row + 1, tl.sum(_masked(g0 * x1, s1, s3, HAS_SEQ), axis=1), mask=d_mask)
    tl.store(dw_row + 2, tl.sum(_masked(g0 * x2, s2, s3, HAS_SEQ), axis=1), mask=d_mask)
    tl.store(dw_row + 3, tl.sum(g0 * x3, axis=1), mask=d_mask)
    if HAS_BIAS:
        tl.store(db_ptr + row * dim + d_idx, tl.sum(g0, axis=1), mask=d_mask)


# ----------------------------------------------------------------------------------------------------------
# Channels-contiguous layout (stride(1) == 1, how both Mamba mixers call the op: in_proj(h).transpose(1, 2)).
# A program owns BLOCK_D channels and a chunk of CHUNK positions and walks along seqlen one row of BLOCK_D
# contiguous channels at a time, 4 rows per step (all loads of a step issued before any store, so that 4 rows
# are in flight). The last 3 rows stay in registers: every input is read from memory once (plus a 3-row halo
# per chunk), where shifted (BLOCK_D, BLOCK_L) tiles would read each element 4 times through L1/L2.
# ----------------------------------------------------------------------------------------------------------


@_jit
def _row_mask(d_loc, d_mask, t, lo, hi):
    """d_mask where lo <= t < hi (t scalar). Compared as a vector: Triton's interpreter turns
    (bool vector & bool scalar) into an int array that tl.load then refuses."""
    tv = t + d_loc * 0
    return d_mask & (tv >= lo) & (tv < hi)


@_jit
def _row_x(base, d_loc, d_mask, t, seqlen, s_d, s_l):
    """Row t (scalar, >= 0) of a (dim, seqlen) slice: (BLOCK_D,) fp32, zero at t >= seqlen."""
    ptrs = base + d_loc * s_d + tl.cast(t, tl.int64) * s_l
    return tl.load(ptrs, mask=_row_mask(d_loc, d_mask, t, 0, seqlen), other=0.0).to(tl.float32)


@_jit
def _row_ext(x_base, init_base, d_loc, d_mask, t, seqlen, sx_d, sx_l, si_d, si_l,
             WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """Row t (scalar, may be < 0: initial_states, or zero) of cat(initial_states, x): (BLOCK_D,) fp32."""
    v = tl.load(x_base + d_loc * sx_d + tl.cast(t, tl.int64) * sx_l, mask=_row_mask(d_loc, d_mask, t, 0, seqlen),
                other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        ip = t + (WIDTH - 1)
        h = tl.load(init_base + d_loc * si_d + ip * si_l, mask=_row_mask(d_loc, d_mask, t, 1 - WIDTH, 0), other=0.0)
        v += h.to(tl.float32)
    return v


@_jit
def _row_seq(seq_base, t, seqlen, ss_l, seq0, HAS_SEQ: tl.constexpr):
    """Sequence id of position t (scalar); positions < 0 belong to the first sequence; 0 without seq_idx."""
    if HAS_SEQ:
        s = tl.load(seq_base + t * ss_l, mask=(t >= 0) & (t < seqlen), other=-1)
        return tl.where(t < 0, seq0, s)
    return t * 0


@_jit
def _store_row(base, d_loc, d_mask, t, lo, hi, v, s_d, s_l):
    """Row t (scalar) of a (dim, seqlen) slice, written where lo <= t < hi."""
    tl.store(base + d_loc * s_d + tl.cast(t, tl.int64) * s_l, v.to(base.dtype.element_ty),
             mask=_row_mask(d_loc, d_mask, t, lo, hi))


@_jit
def _conv_fwd_rows_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, out_ptr, dim, seqlen,
    sx_b, sx_d, sx_l, sw_d, sw_k, ss_b, ss_l, si_b, si_d, si_l, so_b, so_d, so_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Forward, channels contiguous. Grid (seqlen chunks, dim tiles, batch); CHUNK a multiple of 4."""
    l0 = tl.program_id(0) * CHUNK
    d0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    x_base = x_ptr + b * sx_b + d0 * sx_d
    i_base = init_ptr + b * si_b + d0 * si_d
    o_base = out_ptr + b * so_b + d0 * so_d
    s_base = seq_ptr + b * ss_b
    seq0 = 0
    if HAS_SEQ:
        seq0 = tl.load(s_base)
    w0, w1, w2, w3 = _taps_1d(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    bias = tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)
    # the 3 rows before the chunk, and their sequence ids
    pa = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 3, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    pb = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 2, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    pc = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 1, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    qa = _row_seq(s_base, l0 - 3, seqlen, ss_l, seq0, HAS_SEQ)
    qb = _row_seq(s_base, l0 - 2, seqlen, ss_l, seq0, HAS_SEQ)
    qc = _row_seq(s_base, l0 - 1, seqlen, ss_l, seq0, HAS_SEQ)
    for t in range(l0, tl.minimum(l0 + CHUNK, seqlen), 4):
        r0 = _row_x(x_base, d_loc, d_mask, t, seqlen, sx_d, sx_l)
        r1 = _row_x(x_base, d_loc, d_mask, t + 1, seqlen, sx_d, sx_l)
        r2 = _row_x(x_base, d_loc, d_mask, t + 2, seqlen, sx_d, sx_l)
        r3 = _row_x(x_base, d_loc, d_mask, t + 3, seqlen, sx_d, sx_l)
        s0 = _row_seq(s_base, t, seqlen, ss_l, seq0, HAS_SEQ)
        s1 = _row_seq(s_base, t + 1, seqlen, ss_l, seq0, HAS_SEQ)
        s2 = _row_seq(s_base, t + 2, seqlen, ss_l, seq0, HAS_SEQ)
        s3 = _row_seq(s_base, t + 3, seqlen, ss_l, seq0, HAS_SEQ)
        o0 = _act(bias + _tap4(pa, pb, pc, r0, qa, qb, qc, s0, w0, w1, w2, w3, HAS_SEQ), SILU)
        o1 = _act(bias + _tap4(pb, pc, r0, r1, qb, qc, s0, s1, w0, w1, w2, w3, HAS_SEQ), SILU)
        o2 = _act(bias + _tap4(pc, r0, r1, r2, qc, s0, s1, s2, w0, w1, w2, w3, HAS_SEQ), SILU)
        o3 = _act(bias + _tap4(r0, r1, r2, r3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ), SILU)
        _store_row(o_base, d_loc, d_mask, t, 0, seqlen, o0, so_d, so_l)
        _store_row(o_base, d_loc, d_mask, t + 1, 0, seqlen, o1, so_d, so_l)
        _store_row(o_base, d_loc, d_mask, t + 2, 0, seqlen, o2, so_d, so_l)
        _store_row(o_base, d_loc, d_mask, t + 3, 0, seqlen, o3, so_d, so_l)
        pa, pb, pc = r1, r2, r3
        qa, qb, qc = s1, s2, s3


@_jit
def _bwd_row(xa, xb, xc, xt, ga, gb, gc, sa, sb, sc, st, dyt, w0, w1, w2, w3, bias,
             HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """Row t of the backward: g[t] = dy[t] act'(pre[t]) from the inputs at t-3..t, and
    dx[t-3] = sum_k w_k g[t-k] from g at t-3..t (each term only within the sequence of t-3)."""
    gt = _act_grad(dyt, bias + _tap4(xa, xb, xc, xt, sa, sb, sc, st, w0, w1, w2, w3, HAS_SEQ), SILU)
    return gt, _tap4(gt, gc, gb, ga, st, sc, sb, sa, w0, w1, w2, w3, HAS_SEQ)


@_jit
def _dw_row(acc0, acc1, acc2, acc3, accb, gt, xa, xb, xc, xt, sa, sb, sc, st, keep, HAS_SEQ: tl.constexpr):
    """Add row t's terms of dw_k = sum_t g[t] x[t-3+k] and db = sum_t g[t] (keep: t is in this chunk)."""
    g = tl.where(keep, gt, 0.0)
    acc0 += _masked(g * xa, sa, st, HAS_SEQ)
    acc1 += _masked(g * xb, sb, st, HAS_SEQ)
    acc2 += _masked(g * xc, sc, st, HAS_SEQ)
    acc3 += g * xt
    accb += g
    return acc0, acc1, acc2, acc3, accb


@_jit
def _conv_bwd_rows_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, init_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, dim, seqlen,
    sx_b, sx_d, sx_l, sw_d, sw_k, ss_b, ss_l, si_b, si_d, si_l, sy_b, sy_d, sy_l, sdx_b, sdx_d, sdx_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Backward, channels contiguous, same grid as _conv_fwd_rows_kernel. Walks rows t = l0 .. l_end + 2
    (the 3 rows after the chunk supply g for the chunk's last dx rows), writing dx[t - 3]; per-program
    partial sums of dw, db go to row (batch * chunks + chunk) of dw_ptr: (programs, dim, 4), db_ptr."""
    l0 = tl.program_id(0) * CHUNK
    d0 = tl.program_id(1) * BLOCK_D
    b = tl.program_id(2).to(tl.int64)
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    x_base = x_ptr + b * sx_b + d0 * sx_d
    i_base = init_ptr + b * si_b + d0 * si_d
    y_base = dy_ptr + b * sy_b + d0 * sy_d
    dx_base = dx_ptr + b * sdx_b + d0 * sdx_d
    s_base = seq_ptr + b * ss_b
    seq0 = 0
    if HAS_SEQ:
        seq0 = tl.load(s_base)
    w0, w1, w2, w3 = _taps_1d(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    bias = tl.zeros_like(w0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)
    xa = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 3, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    xb = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 2, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    xc = _row_ext(x_base, i_base, d_loc, d_mask, l0 - 1, seqlen, sx_d, sx_l, si_d, si_l, WIDTH, HAS_INIT)
    sa = _row_seq(s_base, l0 - 3, seqlen, ss_l, seq0, HAS_SEQ)
    sb = _row_seq(s_base, l0 - 2, seqlen, ss_l, seq0, HAS_SEQ)
    sc = _row_seq(s_base, l0 - 1, seqlen, ss_l, seq0, HAS_SEQ)
    ga = tl.zeros_like(w0)  # g before the chunk: only reaches dx rows of the previous chunk (not written)
    gb = tl.zeros_like(w0)
    gc = tl.zeros_like(w0)
    acc0 = tl.zeros_like(w0)
    acc1 = tl.zeros_like(w0)
    acc2 = tl.zeros_like(w0)
    acc3 = tl.zeros_like(w0)
    accb = tl.zeros_like(w0)
    l_end = tl.minimum(l0 + CHUNK, seqlen)
    for t in range(l0, l_end + 3, 4):
        x0 = _row_x(x_base, d_loc, d_mask, t, seqlen, sx_d, sx_l)
        x1 = _row_x(x_base, d_loc, d_mask, t + 1, seqlen, sx_d, sx_l)
        x2 = _row_x(x_base, d_loc, d_mask, t + 2, seqlen, sx_d, sx_l)
        x3 = _row_x(x_base, d_loc, d_mask, t + 3, seqlen, sx_d, sx_l)
        y0 = _row_x(y_base, d_loc, d_mask, t, seqlen, sy_d, sy_l)
        y1 = _row_x(y_base, d_loc, d_mask, t + 1, seqlen, sy_d, sy_l)
        y2 = _row_x(y_base, d_loc, d_mask, t + 2, seqlen, sy_d, sy_l)
        y3 = _row_x(y_base, d_loc, d_mask, t + 3, seqlen, sy_d, sy_l)
        s0 = _row_seq(s_base, t, seqlen, ss_l, seq0, HAS_SEQ)
        s1 = _row_seq(s_base, t + 1, seqlen, ss_l, seq0, HAS_SEQ)
        s2 = _row_seq(s_base, t + 2, seqlen, ss_l, seq0, HAS_SEQ)
        s3 = _row_seq(s_base, t + 3, seqlen, ss_l, seq0, HAS_SEQ)
        g0, e0 = _bwd_row(xa, xb, xc, x0, ga, gb, gc, sa, sb, sc, s0, y0, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
        g1, e1 = _bwd_row(xb, xc, x0, x1, gb, gc, g0, sb, sc, s0, s1, y1, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
        g2, e2 = _bwd_row(xc, x0, x1, x2, gc, g0, g1, sc, s0, s1, s2, y2, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
        g3, e3 = _bwd_row(x0, x1, x2, x3, g0, g1, g2, s0, s1, s2, s3, y3, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
        _store_row(dx_base, d_loc, d_mask, t - 3, l0, l_end, e0, sdx_d, sdx_l)
        _store_row(dx_base, d_loc, d_mask, t - 2, l0, l_end, e1, sdx_d, sdx_l)
        _store_row(dx_base, d_loc, d_mask, t - 1, l0, l_end, e2, sdx_d, sdx_l)
        _store_row(dx_base, d_loc, d_mask, t, l0, l_end, e3, sdx_d, sdx_l)
        acc0, acc1, acc2, acc3, accb = _dw_row(acc0, acc1, acc2, acc3, accb, g0, xa, xb, xc, x0,
                                               sa, sb, sc, s0, t < l_end, HAS_SEQ)
        acc0, acc1, acc2, acc3, accb = _dw_row(acc0, acc1, acc2, acc3, accb, g1, xb, xc, x0, x1,
                                               sb, sc, s0, s1, t + 1 < l_end, HAS_SEQ)
        acc0, acc1, acc2, acc3, accb = _dw_row(acc0, acc1, acc2, acc3, accb, g2, xc, x0, x1, x2,
                                               sc, s0, s1, s2, t + 2 < l_end, HAS_SEQ)
        acc0, acc1, acc2, acc3, accb = _dw_row(acc0, acc1, acc2, acc3, accb, g3, x0, x1, x2, x3,
                                               s0, s1, s2, s3, t + 3 < l_end, HAS_SEQ)
        xa, xb, xc = x1, x2, x3
        ga, gb, gc = g1, g2, g3
        sa, sb, sc = s1, s2, s3
    row = b * tl.num_programs(0) + tl.program_id(0)
    d_idx = d0 + d_loc
    dw_row = dw_ptr + row * dim * 4 + d_idx * 4
    tl.store(dw_row, acc0, mask=d_mask)
    tl.store(dw_row + 1, acc1, mask=d_mask)
    tl.store(dw_row + 2, acc2, mask=d_mask)
    tl.store(dw_row + 3, acc3, mask=d_mask)
    if HAS_BIAS:
        tl.store(db_ptr + row * dim + d_idx, accb, mask=d_mask)


@_jit
def _update_input(x_base, s_base, d_loc, d_mask, q, start, seqlen, state_len, sx_d, sx_l, sc_d, sc_s,
                  WIDTH: tl.constexpr):
    """Decode inputs at positions q (1-D, relative to the first new token): (BLOCK_D, len(q)) fp32.

    q >= 0 reads x; -(width - 1) <= q < 0 reads the state at index (start + q) mod state_len.
    """
    p = q[None, :]
    dm = d_mask[:, None]
    v = tl.load(x_base + d_loc[:, None] * sx_d + p * sx_l, mask=dm & (p >= 0) & (p < seqlen), other=0.0)
    hist = (start + p + state_len) % state_len
    h = tl.load(s_base + d_loc[:, None] * sc_d + hist * sc_s, mask=dm & (p < 0) & (p >= 1 - WIDTH), other=0.0)
    return v.to(tl.float32) + h.to(tl.float32)


@_jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, cache_ptr, idx_ptr, out_ptr, dim, seqlen, state_len,
    sx_b, sx_d, sx_l, sc_b, sc_d, sc_s, sw_d, sw_k, so_b, so_d, so_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CIRCULAR: tl.constexpr,
    HAS_IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One decode step. Grid (batch, dim tiles). The window of new token t is (t-3 .. t) over
    cat(history, x); the state row is then shifted left by seqlen with x appended (or, CIRCULAR, x is
    written from index cache_seqlens % state_len on)."""
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    d_loc = tl.arange(0, BLOCK_D)
    d_mask = d0 + d_loc < dim
    row = b
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    start = state_len  # linear buffer: history q < 0 sits at index state_len + q
    if CIRCULAR:
        start = tl.load(cache_ptr + b).to(tl.int32) % state_len
    x_base = x_ptr + b * sx_b + d0 * sx_d
    s_base = state_ptr + row * sc_b + d0 * sc_d
    t = tl.arange(0, BLOCK_T)
    w0, w1, w2, w3 = _load_taps(w_ptr, d0 + d_loc, d_mask, sw_d, sw_k, WIDTH)
    e0 = _update_input(x_base, s_base, d_loc, d_mask, t - 3, start, seqlen, state_len, sx_d, sx_l, sc_d, sc_s, WIDTH)
    e1 = _update_input(x_base, s_base, d_loc, d_mask, t - 2, start, seqlen, state_len, sx_d, sx_l, sc_d, sc_s, WIDTH)
    e2 = _update_input(x_base, s_base, d_loc, d_mask, t - 1, start, seqlen, state_len, sx_d, sx_l, sc_d, sc_s, WIDTH)
    e3 = _update_input(x_base, s_base, d_loc, d_mask, t, start, seqlen, state_len, sx_d, sx_l, sc_d, sc_s, WIDTH)
    out = _tap4(e0, e1, e2, e3, 0, 0, 0, 0, w0, w1, w2, w3, False)
    if HAS_BIAS:
        out += tl.load(b_ptr + d0 + d_loc, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    out = _act(out, SILU)
    o_ptrs = out_ptr + b * so_b + (d0 + d_loc)[:, None] * so_d + t[None, :] * so_l
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask[:, None] & (t[None, :] < seqlen))
    dm = d_mask[:, None]
    if CIRCULAR:
        new = tl.load(x_base + d_loc[:, None] * sx_d + t[None, :] * sx_l, mask=dm & (t[None, :] < seqlen))
        dst = (start + t[None, :]) % state_len
        dst_mask = dm & (t[None, :] < seqlen)
    else:
        # new state[j] = cat(state, x)[j + seqlen]
        j = tl.arange(0, BLOCK_S)[None, :]
        src = j + seqlen
        new = tl.load(s_base + d_loc[:, None] * sc_d + src * sc_s, mask=dm & (src < state_len), other=0.0)
        new = new.to(tl.float32)
        new += tl.load(x_base + d_loc[:, None] * sx_d + (src - state_len) * sx_l,
                       mask=dm & (src >= state_len) & (j < state_len), other=0.0)
        dst = j
        dst_mask = dm & (j < state_len)
    tl.debug_barrier()  # every read of this state row happens before the first write
    tl.store(s_base + d_loc[:, None] * sc_d + dst * sc_s, new.to(state_ptr.dtype.element_ty), mask=dst_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _layout(x):
    """x with a layout the kernels read fast, and SPLIT (seqlen contiguous) or not (channels contiguous)."""
    if x.stride(2) != 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x, x.stride(2) == 1


def _like_layout(t, split):
    """t in the layout chosen for x (a copy only when it differs)."""
    if split:
        return t if t.stride(2) == 1 else t.contiguous()
    return t if t.stride(1) == 1 else t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_like_layout(x, split):
    """An uninitialised (batch, dim, seqlen) tensor: seqlen contiguous when split, else channels contiguous."""
    batch, dim, seqlen = x.shape
    if split:
        return torch.empty(batch, dim, seqlen, device=x.device, dtype=x.dtype)
    return torch.empty(batch, seqlen, dim, device=x.device, dtype=x.dtype).transpose(1, 2)


def _conv_blocks(split, dim, seqlen, backward):
    """(BLOCK_D, BLOCK_L, num_warps).

    seqlen contiguous: 2K-element tiles forward, 1K backward (more live tiles), long along seqlen.
    channels contiguous: BLOCK_D = 256 channels (4 per thread over 2 warps: 8- or 16-byte accesses) walking a
    chunk of BLOCK_L positions; chunks of 64 forward keep enough programs in flight (b4 l4096 d3072: 3072 of
    them), 128 backward halves the dw partial sums (programs x dim x 4 fp32) that the launcher then adds up.
    """
    if split:
        elems = 1024 if backward else 2048
        block_l = min(128 if backward else 256, max(8, _next_pow2(seqlen)))
        return max(1, min(_next_pow2(dim), elems // block_l)), block_l, 4
    return min(256, _next_pow2(dim)), 128 if backward else 64, 2


def _opt(t, x, ndim):
    """(pointer, strides) for an optional tensor: a dummy pointer and zero strides when absent."""
    return (t, t.stride()) if t is not None else (x, (0,) * ndim)


# Forward variants (issue 4), one per layout, picked by FWD_VARIANT so that the GPU check script can time them
# side by side (scripts/gpu_check_conv_norm.py). FWD_BLOCKS holds each new variant's launch parameters.
# - split layout (seqlen contiguous): "tile", one (BLOCK_D, BLOCK_L) tile per program (_conv_fwd_kernel, the
#   kernel measured in docs/benchmarks.md); "walk", STEPS tiles per program with the next tile's loads issued
#   before the current one is stored (_conv_fwd_walk_kernel).
# - rows layout (channels contiguous): "tile" only, CHUNK rows of BLOCK_D = 256 channels over 2 warps.
# H200 (CUDA graph of 20 calls, w4 SiLU bf16): split b4 d3072 l4096 tile 61.3 us (77% of copy), walk 55.1 us
# (86%); b1 d3328 l65536 248 -> 225 us (83 -> 91%). A rows variant with 16-byte accesses and the next 4 rows
# prefetched measured no faster than tile (66 vs 67 us at b4, 254 vs 239 us at l65536) and was not kept.
FWD_VARIANT = {"split": "walk", "rows": "tile"}
FWD_BLOCKS = {
    ("split", "walk"): dict(BLOCK_D=8, BLOCK_L=256, STEPS=4, num_warps=4),
}


def _fwd_launch(split, variant, dim, seqlen, blocks, num_warps):
    """(kernel, launch parameters incl. num_warps, BLOCK_D, seqlen per program) of a forward variant."""
    variant = variant or FWD_VARIANT["split" if split else "rows"]
    if variant == "tile":
        block_d, block_l, warps = _conv_blocks(split, dim, seqlen, False)
        block_d, block_l = blocks or (block_d, block_l)
        params = dict(SPLIT=True, BLOCK_L=block_l) if split else dict(CHUNK=block_l)
        kernel, span = (_conv_fwd_kernel if split else _conv_fwd_rows_kernel), block_l
        params.update(BLOCK_D=block_d, num_warps=num_warps or warps)
        return kernel, params, block_d, span
    key = ("split" if split else "rows", variant)
    if key not in FWD_BLOCKS:
        fail(f"no forward variant {variant!r} for the {key[0]} layout; known: tile, "
             + ", ".join(v for lay, v in FWD_BLOCKS if lay == key[0]))
    params = dict(FWD_BLOCKS[key])
    if blocks:
        params["BLOCK_D"], params["BLOCK_L"] = blocks
    if num_warps:
        params["num_warps"] = num_warps
    return _conv_fwd_walk_kernel, params, params["BLOCK_D"], params["BLOCK_L"] * params["STEPS"]


def _conv_fwd_triton(x, weight, bias, seq_idx, initial_states, activation, blocks=None, num_warps=None,
                     variant=None):
    """Launch the forward kernel. Returns out: (batch, dim, seqlen) in x's layout and dtype.
    blocks: (BLOCK_D, BLOCK_L) and num_warps override the heuristic (the GPU check script sweeps them);
    BLOCK_L is the chunk each program walks in the channels-contiguous layout (a multiple of 4).
    variant: a forward variant's name (see FWD_VARIANT), None for FWD_VARIANT's choice for x's layout."""
    batch, dim, seqlen = x.shape
    x, split = _layout(x)
    out = _empty_like_layout(x, split)
    kernel, params, block_d, span = _fwd_launch(split, variant, dim, seqlen, blocks, num_warps)
    seq, ss = _opt(seq_idx, x, 2)
    init, si = _opt(_like_layout(initial_states, split) if initial_states is not None else None, x, 3)
    grid = (triton.cdiv(seqlen, span), triton.cdiv(dim, block_d), batch)
    kernel[grid](
        x, weight, bias if bias is not None else x, seq, init, out, dim, seqlen,
        *x.stride(), *weight.stride(), *ss, *si, *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
        HAS_INIT=initial_states is not None, SILU=activation is not None, **params)
    return out


def _conv_bwd_triton(x, weight, bias, seq_idx, initial_states, dout, activation, blocks=None, num_warps=None):
    """Launch the backward kernel. Returns dx (x's layout and dtype), dweight, dbias (fp32, or None)."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    x, split = _layout(x)
    dout = _like_layout(dout, split)
    dx = _empty_like_layout(x, split)
    block_d, block_l, warps = _conv_blocks(split, dim, seqlen, True)
    block_d, block_l = blocks or (block_d, block_l)
    n_l = triton.cdiv(seqlen, block_l)
    dw_part = torch.empty(batch * n_l, dim, 4, device=x.device, dtype=torch.float32)
    db_part = torch.empty(batch * n_l, dim, device=x.device, dtype=torch.float32) if bias is not None else dw_part
    seq, ss = _opt(seq_idx, x, 2)
    init, si = _opt(_like_layout(initial_states, split) if initial_states is not None else None, x, 3)
    kernel = _conv_bwd_kernel if split else _conv_bwd_rows_kernel
    extra = dict(SPLIT=True, BLOCK_L=block_l) if split else dict(CHUNK=block_l)
    kernel[(n_l, triton.cdiv(dim, block_d), batch)](
        x, weight, bias if bias is not None else x, seq, init, dout, dx, dw_part, db_part, dim, seqlen,
        *x.stride(), *weight.stride(), *ss, *si, *dout.stride(), *dx.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
        HAS_INIT=initial_states is not None, SILU=activation is not None,
        BLOCK_D=block_d, num_warps=num_warps or warps, **extra)
    dweight = dw_part.sum(0)[:, 4 - width:]  # drop the zero-padded taps
    return dx, dweight, db_part.sum(0) if bias is not None else None


def _update_triton(x3, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    """Launch the decode kernel; x3: (batch, dim, seqlen). Returns out: (batch, dim, seqlen), x's dtype."""
    batch, dim, seqlen = x3.shape
    state_len = conv_state.shape[2]
    out = torch.empty(batch, dim, seqlen, device=x3.device, dtype=x3.dtype)
    block_d = min(_next_pow2(dim), max(16, 2048 // max(_next_pow2(seqlen), _next_pow2(state_len))))
    _conv_update_kernel[(batch, triton.cdiv(dim, block_d))](
        x3, conv_state, weight, bias if bias is not None else x3,
        cache_seqlens if cache_seqlens is not None else x3,
        conv_state_indices if conv_state_indices is not None else x3,
        out, dim, seqlen, state_len, *x3.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation is not None,
        CIRCULAR=cache_seqlens is not None, HAS_IDX=conv_state_indices is not None,
        BLOCK_D=block_d, BLOCK_T=_next_pow2(seqlen), BLOCK_S=_next_pow2(state_len), num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


def _initial_states_grad(x, weight, bias, seq_idx, initial_states, dout, activation):
    """d initial_states: only outputs 0 .. width-2 read it, so autograd of the PyTorch path on that prefix."""
    n = min(weight.shape[1] - 1, x.shape[2])
    with torch.enable_grad():
        h = initial_states.detach().requires_grad_()
        pre = _conv_torch(x[:, :, :n].detach(), weight.detach(), bias.detach() if bias is not None else None,
                          seq_idx[:, :n] if seq_idx is not None else None, h, activation)
        (dh,) = torch.autograd.grad(pre, h, dout[:, :, :n].to(pre.dtype))
    return dh


def _add_final_states_grad(dx, dinit, dfinal, width):
    """final_states = last width-1 columns of cat(initial_states, x): route its gradient back in place."""
    seqlen = dx.shape[2]
    n = min(seqlen, width - 1)
    if n > 0:
        dx[:, :, seqlen - n:] += dfinal[:, :, width - 1 - n:].to(dx.dtype)
    if dinit is not None and n < width - 1:
        dinit[:, :, seqlen:] += dfinal[:, :, :width - 1 - n].to(dinit.dtype)


class _CausalConv1dFn(torch.autograd.Function):
    """causal_conv1d_fn on the kernels; returns (out, final_states) and takes the gradient of both."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, activation, return_final_states):
        out = _conv_fwd_triton(x, weight, bias, seq_idx, initial_states, activation)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        if not return_final_states:  # no extra launch (the copy below) when nobody asked for them
            return out
        return out, _final_states(x, initial_states, weight.shape[1]).clone()

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        width = weight.shape[1]
        dout = torch.zeros_like(x) if dout is None else dout  # only final_states was used: rare
        dx, dweight, dbias = _conv_bwd_triton(x, weight, bias, seq_idx, initial_states, dout, ctx.activation)
        dinit = None
        if initial_states is not None and ctx.needs_input_grad[4]:
            dinit = _initial_states_grad(x, weight, bias, seq_idx, initial_states, dout, ctx.activation)
            dinit = dinit.to(initial_states.dtype)
        if dfinal is not None and width > 1:
            _add_final_states_grad(dx, dinit, dfinal, width)
        dbias = dbias.to(bias.dtype) if dbias is not None else None
        return dx, dweight.to(weight.dtype), dbias, None, dinit, None, None


def _use_conv_kernels(x, width):
    """Triton for CUDA tensors (or when forced); float64 and widths > 4 stay on the PyTorch path."""
    if x.dtype == torch.float64 or not use_triton(x):
        return False
    if width <= _TRITON_MAX_WIDTH:
        return True
    if current_backend() == "triton":
        fail(f"the Triton conv kernels support width <= {_TRITON_MAX_WIDTH}, got weight width {width}; "
             "use MAMBAKIT_BACKEND=torch (or auto) for wider convolutions")
    return False


# ----------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise conv over the sequence, optionally followed by SiLU (the official signature).

    x: (batch, dim, seqlen), any strides (``t.transpose(1, 2)`` of a (batch, seqlen, dim) tensor, as Mamba-2
    passes it, is as fast as contiguous); weight: (dim, width); bias: (dim,) or None;
    seq_idx: (batch, seqlen) int32/int64, non-decreasing ids of packed sequences, or None;
    initial_states: (batch, dim, width - 1) in x's dtype: the inputs before position 0 (for the first sequence
    only when seq_idx is given), or None for zeros; final_states_out: (batch, dim, width - 1) buffer to write
    the final states into; activation: None, "silu" or "swish".

    Returns out: (batch, dim, seqlen) in x's dtype (math in fp32), and when ``return_final_states`` also
    final_states: (batch, dim, width - 1), the last width - 1 inputs. Differentiable in x, weight, bias,
    initial_states (and through final_states).
    """
    _check_fn_inputs(x, weight, bias, seq_idx, initial_states, final_states_out, activation)
    width = weight.shape[1]
    if _use_conv_kernels(x, width):
        if not return_final_states:
            return _CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states, activation, False)
        out, final_states = _CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states, activation, True)
    else:
        out = _conv_torch(x, weight, bias, seq_idx, initial_states, activation).to(x.dtype)
        final_states = _final_states(x, initial_states, width)
    if not return_final_states:
        return out
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final_states)
        return out, final_states_out
    return out, final_states


_PASSED_UPDATE = PassedChecks()


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """One decode step: convolve a few new tokens against the cached window and update it in place.

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (state_batch, dim, state_len), state_len >= width - 1
    (Mamba uses state_len = width), written in place; weight: (dim, width); bias: (dim,) or None;
    activation: None, "silu" or "swish"; cache_seqlens: (batch,) int or None: when given, conv_state is a
    circular buffer and x is written from index cache_seqlens % state_len on; conv_state_indices: (batch,) int
    or None: row i of x uses conv_state[conv_state_indices[i]] (continuous batching).

    Returns out shaped like x, in x's dtype. Not differentiable (a decoding op).
    """
    # a decode loop repeats one layout: check it once
    _PASSED_UPDATE.once(_check_update_inputs, x, conv_state, weight, bias, activation, cache_seqlens,
                        conv_state_indices)
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x  # (batch, dim, seqlen), a view
    if _use_conv_kernels(x, weight.shape[1]):
        # one launch, no copies or casts: the kernel reads any strides and dtypes (decode speed is launch-bound)
        out = _update_triton(x3, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    else:  # decoding runs under inference_mode: no_grad is entered only when autograd is on
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            out = as_dtype(_update_torch(x3, conv_state, weight, bias, activation, cache_seqlens,
                                         conv_state_indices), x.dtype)
    return out.squeeze(-1) if x.dim() == 2 else out
