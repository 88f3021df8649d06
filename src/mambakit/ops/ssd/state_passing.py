"""SSD stages 2+3 (Triton), fused: chunk states and the recurrence over chunks, forward and backward.

One program owns a (headdim block, dstate block) tile of one (batch, head) state and walks the chunks in
order, so the per-chunk states never go through memory in fp32 (the official package writes them, then
reads them back in a separate state-passing kernel):

    S_0 = initial state (or 0)
    S_{c+1} = carry_c * exp(dA_cs[c, Q-1]) * S_c + sum_s exp(dA_cs[c, Q-1] - dA_cs[c, s]) dt[c, s] x[c, s] B[c, s]^T

carry_c is 0 where packed sequences (seq_idx) change between the previous chunk's end and this chunk's end,
and inside the sum only the positions of the sequence running at the chunk's end count. The kernel stores
S_0 .. S_{C-1} (the state entering every chunk) in the input's dtype for the chunk-scan dots, and the final
state S_C in fp32.

Backward (reverse order over chunks), with G_{c+1} = dLoss/dS_{c+1}:
    G_C = d final_states;   G_c = local_c + carry_c * exp(dA_cs[c, Q-1]) * G_{c+1}
    local_c = sum_t exp(dA_cs[c, t]) [seq_t == seq entering chunk c] dy[c, t] C[c, t]^T   (from y_t = C_t . S_c ...)
It stores G_{c+1} for every chunk (the chunk-scan backward needs it for dx, dB, ddt), G_0 (= d initial_states)
and sp_c = carry_c exp(dA_cs[c, Q-1]) <G_{c+1}, S_c>, the derivative with respect to the chunk's total decay
through the carried state (the chunk's own inputs add their part in chunk_scan's backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops.dispatch import num_sms


@triton.jit
def _seq_ends(seq_ptr, stride_seq_l, c, seqlen, Q: tl.constexpr):
    """Sequence id entering chunk c (at the previous chunk's last position, or position 0) and at its end."""
    prev_pos = tl.maximum(c * Q - 1, 0).to(tl.int64)
    end_pos = (tl.minimum(c * Q + Q, seqlen) - 1).to(tl.int64)
    return tl.load(seq_ptr + prev_pos * stride_seq_l), tl.load(seq_ptr + end_pos * stride_seq_l)


@triton.jit
def _state_fwd_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, init_ptr, seq_ptr, states_ptr, final_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_init_b, stride_init_h, stride_init_p, stride_init_n,
    stride_seq_b, stride_seq_l,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_pn = tl.program_id(1)
    pid_b = (pid_bh // nheads).to(tl.int64)
    pid_h = pid_bh % nheads
    nblk_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // nblk_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % nblk_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]
    dtype = x_ptr.dtype.element_ty

    # 64-bit scalar bases, 32-bit offsets inside a slice (1M-token inputs overflow int32)
    x_b = x_ptr + pid_b * stride_x_b + pid_h * stride_x_h
    B_b = B_ptr + pid_b * stride_B_b + (pid_h // heads_per_group) * stride_B_g
    xT_offs = offs_p[:, None] * stride_x_p + offs_kb[None, :] * stride_x_l  # (BLOCK_P, BLOCK_K)
    B_offs = offs_kb[:, None] * stride_B_l + offs_n[None, :] * stride_B_n  # (BLOCK_K, BLOCK_N)
    row = (pid_b * nheads + pid_h) * nchunks  # row of (b, h, c=0) in the (b, h, c, Q) stage-1 outputs
    chunk_stride = nheads * headdim * dstate  # states: (b, c, h, p, n)
    st_b = states_ptr + pid_b * nchunks * chunk_stride + pid_h * headdim * dstate
    tile = offs_p[:, None] * dstate + offs_n[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs_p[:, None] * stride_init_p
                        + offs_n[None, :] * stride_init_n, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seq_b = seq_ptr + pid_b * stride_seq_b
    # one flat loop over (chunk, slice of BLOCK_K positions) so that loads stay pipelined across chunks
    for it in range(nchunks * (Q // BLOCK_K)):
        c = it // (Q // BLOCK_K)
        k0 = (it % (Q // BLOCK_K)) * BLOCK_K
        first = k0 == 0
        chunk_row = (row + c) * Q
        a_end = tl.load(dA_cs_ptr + chunk_row + Q - 1)
        decay = tl.exp(a_end)
        if HAS_SEQ:
            seq_prev, seq_end = _seq_ends(seq_b, stride_seq_l, c, seqlen, Q)
            decay = tl.where(seq_end == seq_prev, decay, 0.0)
        # entering chunk c: store the state the chunk starts from, then decay it over the chunk
        tl.store(st_b + tl.cast(c, tl.int64) * chunk_stride + tile, state.to(states_ptr.dtype.element_ty),
                 mask=tl.where(first, mask_pn, False))
        state = state * tl.where(first, decay, 1.0)
        pos0 = c * Q + k0
        mask_k = (pos0 + offs_kb) < seqlen
        pos0 = tl.cast(pos0, tl.int64)
        a = tl.load(dA_cs_ptr + chunk_row + k0 + offs_kb)
        w = tl.exp(a_end - a) * tl.load(dt_ptr + chunk_row + k0 + offs_kb)  # (BLOCK_K,)
        if HAS_SEQ:
            seq = tl.load(seq_b + (pos0 + offs_kb) * stride_seq_l, mask=mask_k, other=0)
            w = tl.where(seq == seq_end, w, 0.0)
        xT = tl.load(x_b + pos0 * stride_x_l + xT_offs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        Bk = tl.load(B_b + pos0 * stride_B_l + B_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        Bw = (Bk.to(tl.float32) * w[:, None]).to(dtype)
        state = tl.dot(xT.to(dtype), Bw, state, input_precision=DOT_PREC)
    tl.store(final_ptr + (pid_b * nheads + pid_h) * headdim * dstate + tile, state, mask=mask_pn)


@triton.jit
def _state_bwd_kernel(
    dy_ptr, C_ptr, dA_cs_ptr, states_ptr, dfinal_ptr, seq_ptr,
    dstates_ptr, dinit_ptr, sp_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_seq_b, stride_seq_l,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_pn = tl.program_id(1)
    pid_b = (pid_bh // nheads).to(tl.int64)
    pid_h = pid_bh % nheads
    nblk_n = tl.cdiv(dstate, BLOCK_N)
    nblk = tl.cdiv(headdim, BLOCK_P) * nblk_n
    offs_p = (pid_pn // nblk_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % nblk_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_pn = mask_p[:, None] & mask_n[None, :]
    dtype = dy_ptr.dtype.element_ty

    dy_b = dy_ptr + pid_b * stride_dy_b + pid_h * stride_dy_h
    C_b = C_ptr + pid_b * stride_C_b + (pid_h // heads_per_group) * stride_C_g
    dyT_offs = offs_p[:, None] * stride_dy_p + offs_kb[None, :] * stride_dy_l  # (BLOCK_P, BLOCK_K)
    C_offs = offs_kb[:, None] * stride_C_l + offs_n[None, :] * stride_C_n  # (BLOCK_K, BLOCK_N)
    row = (pid_b * nheads + pid_h) * nchunks
    chunk_stride = nheads * headdim * dstate
    tile = offs_p[:, None] * dstate + offs_n[None, :]
    st_b = states_ptr + pid_b * nchunks * chunk_stride + pid_h * headdim * dstate
    dst_b = dstates_ptr + pid_b * nchunks * chunk_stride + pid_h * headdim * dstate
    final_off = (pid_b * nheads + pid_h) * headdim * dstate + tile
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + final_off, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seq_b = seq_ptr + pid_b * stride_seq_b
    for it in range(nchunks * (Q // BLOCK_K)):  # chunks in reverse order, slices in any order
        c = nchunks - 1 - it // (Q // BLOCK_K)
        k0 = (it % (Q // BLOCK_K)) * BLOCK_K
        first = k0 == 0
        chunk_row = (row + c) * Q
        decay = tl.exp(tl.load(dA_cs_ptr + chunk_row + Q - 1))
        if HAS_SEQ:
            seq_prev, seq_end = _seq_ends(seq_b, stride_seq_l, c, seqlen, Q)
            decay = tl.where(seq_end == seq_prev, decay, 0.0)
        c64 = tl.cast(c, tl.int64)  # 1M tokens x 80 heads overflow int32 offsets here
        # leaving chunk c backwards: G = dLoss/dS_{c+1}; store it, and sp_c from the state entering chunk c
        at_first = tl.where(first, mask_pn, False)
        tl.store(dst_b + c64 * chunk_stride + tile, G.to(dstates_ptr.dtype.element_ty), mask=at_first)
        S_c = tl.load(st_b + c64 * chunk_stride + tile, mask=at_first, other=0.0).to(tl.float32)
        tl.store(sp_ptr + (row + c) * nblk + pid_pn, decay * tl.sum(G * S_c), mask=first)
        G = G * tl.where(first, decay, 1.0)
        pos0 = c * Q + k0
        mask_k = (pos0 + offs_kb) < seqlen
        pos0 = tl.cast(pos0, tl.int64)
        scale = tl.exp(tl.load(dA_cs_ptr + chunk_row + k0 + offs_kb))
        if HAS_SEQ:
            seq = tl.load(seq_b + (pos0 + offs_kb) * stride_seq_l, mask=mask_k, other=0)
            scale = tl.where(seq == seq_prev, scale, 0.0)
        dyT = tl.load(dy_b + pos0 * stride_dy_l + dyT_offs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        Ck = tl.load(C_b + pos0 * stride_C_l + C_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        Cs = (Ck.to(tl.float32) * scale[:, None]).to(dtype)
        G = tl.dot(dyT.to(dtype), Cs, G, input_precision=DOT_PREC)
    tl.store(dinit_ptr + final_off, G, mask=mask_pn)


def _state_blocks(Q, batch, nheads, headdim, dstate, blocks, dtype, device):
    BK = min(Q, blocks.get("BLOCK_K") or (32 if dtype == torch.float32 else 64))
    BP = blocks.get("BLOCK_P") or max(16, min(64, triton.next_power_of_2(headdim)))
    BN = blocks.get("BLOCK_N")
    if BN is None:
        # long sequential loops want many programs: shrink the dstate block until the grid fills the GPU
        BN = max(16, min(64, triton.next_power_of_2(dstate)))
        while BN > 32 and batch * nheads * triton.cdiv(headdim, BP) * triton.cdiv(dstate, BN) < 2 * num_sms(device):
            BN //= 2
    return BP, BN, BK


def dot_precision(dtype):
    """fp32 inputs keep fp32 dots (tf32 would be ~1e-3 off); 16-bit inputs take Triton's default."""
    return "ieee" if dtype == torch.float32 else None


def state_fwd(x, B, dt_p, dA_cs, initial_states, seq_idx, Q: int, state_dtype, blocks=None):
    """x: (b, l, h, p), B: (b, l, g, n), dt_p, dA_cs: (b, h, c, Q) fp32, initial_states: (b, h, p, n) or None.

    Returns states (b, c, h, p, n) in ``state_dtype`` (the state entering every chunk) and the final state
    (b, h, p, n) in fp32.
    """
    blocks = blocks or {}
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    states = torch.empty(b, nchunks, h, p, n, device=x.device, dtype=state_dtype)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    BP, BN, BK = _state_blocks(Q, b, h, p, n, blocks, x.dtype, x.device)
    init = initial_states if initial_states is not None else final
    seq = seq_idx if seq_idx is not None else dt_p
    grid = (b * h, triton.cdiv(p, BP) * triton.cdiv(n, BN))
    _state_fwd_kernel[grid](
        x, B, dt_p, dA_cs, init, seq, states, final,
        l, h, nchunks, h // g, p, n,
        *x.stride(), *B.stride(), *init.stride(), seq.stride(0), seq.stride(1),
        Q=Q, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
        DOT_PREC=dot_precision(x.dtype), num_warps=blocks.get("num_warps", 8 if x.dtype == torch.float32 else 4),
        num_stages=blocks.get("num_stages", 2),
    )
    return states, final


def state_bwd(dy, C, dA_cs, states, dfinal, seq_idx, Q: int, blocks=None):
    """Reverse pass over chunks. dy: (b, l, h, p), C: (b, l, g, n), states: (b, c, h, p, n),
    dfinal: (b, h, p, n) or None.

    Returns dstates (b, c, h, p, n) = dLoss/dS_{c+1} in states' dtype, dinit (b, h, p, n) fp32 and
    sp (b, h, c) fp32 = carry_c exp(dA_cs[c, Q-1]) <G_{c+1}, S_c>.
    """
    blocks = blocks or {}
    b, l, h, p = dy.shape
    g, n = C.shape[2:]
    nchunks = dA_cs.shape[2]
    BP, BN, BK = _state_blocks(Q, b, h, p, n, blocks, dy.dtype, dy.device)
    nblk = triton.cdiv(p, BP) * triton.cdiv(n, BN)
    dstates = torch.empty(b, nchunks, h, p, n, device=dy.device, dtype=states.dtype)
    dinit = torch.empty(b, h, p, n, device=dy.device, dtype=torch.float32)
    sp = torch.empty(b, h, nchunks, nblk, device=dy.device, dtype=torch.float32)
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    seq = seq_idx if seq_idx is not None else dA_cs
    _state_bwd_kernel[(b * h, nblk)](
        dy, C, dA_cs, states, dfinal if dfinal is not None else dinit, seq,
        dstates, dinit, sp,
        l, h, nchunks, h // g, p, n,
        *dy.stride(), *C.stride(), seq.stride(0), seq.stride(1),
        Q=Q, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None,
        DOT_PREC=dot_precision(dy.dtype), num_warps=blocks.get("num_warps", 8 if dy.dtype == torch.float32 else 4),
        num_stages=blocks.get("num_stages", 2),
    )
    return dstates, dinit, sp.sum(-1)
