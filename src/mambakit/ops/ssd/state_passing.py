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

Time split (long sequences on a small grid). One program per (batch, head, tile) walks every chunk in order,
so b1 l65536 h48 launches ~100 programs that each run a 256-step chain: the GPU waits on latency. When the
grid is small the chunks are cut into P parts of consecutive chunks and the recurrence, being linear, is
assembled from independent pieces (d_c = carry_c exp(dA_cs[c, Q-1]), part p = chunks [s_p, e_p)):
  A. the fused kernel runs every part at once from a zero state (part 0 from the initial state), storing
     the local states S'_c, the part's end state E_p, its total decay T_p = prod_{c in p} d_c and
     W_c = prod_{s_p <= c' < c} d_c' (the decay from the part start to chunk c);
  B. a P-step recurrence gives what each part's start missed, R_0 = 0 (part 0 started from the true state),
     R_{p+1} = T_p R_p + E_p, and the final state R_P (exact: the same recurrence, regrouped);
  C. S_c = S'_c + W_c R_p, in fp32, stored in the states' dtype; a chunk whose W_c is 0 (the decay
     underflowed, or a seq_idx boundary lies between) is skipped, which is exact.
The backward mirrors it in reverse: parts run from G = 0 at their end (the last part from d final_states),
giving local G'_{c+1}, the part's start gradient H_p and W_c = prod_{c < c' < e_p} d_c'. Pass B:
K_{P-1} = 0, K_{p} = T_{p+1} K_{p+1} + H_{p+1} (the true dLoss/dS at the end of part p) and
d initial_states = T_0 K_0 + H_0. Pass C: G_{c+1} = G'_{c+1} + W_c K_p, and since sp_c is linear in G_{c+1}
(S_c is already the true stored state in the backward), sp_c = sp'_c + d_c W_c <K_p, S_c>.
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
    chunks_per_part, w_ptr, tot_ptr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_pn = tl.program_id(1)
    pid_part = tl.program_id(2)  # time split: this program walks chunks [c_lo, c_lo + n_c) only
    part_row = pid_part.to(tl.int64) * tl.num_programs(0) + pid_bh  # (part, b, h) row of final / tot
    c_lo = pid_part * chunks_per_part
    n_c = tl.minimum(chunks_per_part, nchunks - c_lo)
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
    if HAS_INIT:  # only the first part starts from the initial state; the others from 0 (pass B adds it)
        state = tl.load(init_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs_p[:, None] * stride_init_p
                        + offs_n[None, :] * stride_init_n, mask=tl.where(pid_part == 0, mask_pn, False),
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seq_b = seq_ptr + pid_b * stride_seq_b
    tot = tl.full((), 1.0, tl.float32)  # SPLIT: decay from the part's start to the current chunk
    # one flat loop over (chunk, slice of BLOCK_K positions) so that loads stay pipelined across chunks
    for it in range(n_c * (Q // BLOCK_K)):
        c = c_lo + it // (Q // BLOCK_K)
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
        if SPLIT:
            tl.store(w_ptr + (row + c) * 2, tot, mask=tl.where(first, pid_pn == 0, False))
            tot = tot * tl.where(first, decay, 1.0)
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
    # final: (parts, b, h, p, n), the end state of each part (of the whole sequence when not split)
    tl.store(final_ptr + part_row * headdim * dstate + tile, state, mask=mask_pn)
    if SPLIT:
        tl.store(tot_ptr + part_row, tot, mask=pid_pn == 0)


@triton.jit
def _state_bwd_kernel(
    dy_ptr, C_ptr, dA_cs_ptr, states_ptr, dfinal_ptr, seq_ptr,
    dstates_ptr, dinit_ptr, sp_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_seq_b, stride_seq_l,
    chunks_per_part, w_ptr, tot_ptr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_pn = tl.program_id(1)
    pid_part = tl.program_id(2)  # time split: this program walks chunks [c_lo, c_hi) backwards
    part_row = pid_part.to(tl.int64) * tl.num_programs(0) + pid_bh  # (part, b, h) row of dinit / tot
    c_lo = pid_part * chunks_per_part
    c_hi = tl.minimum(c_lo + chunks_per_part, nchunks)
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
    if HAS_DFINAL:  # only the last part starts from d final_states; the others from 0 (pass B adds it)
        G = tl.load(dfinal_ptr + final_off, mask=tl.where(c_hi == nchunks, mask_pn, False), other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seq_b = seq_ptr + pid_b * stride_seq_b
    tot = tl.full((), 1.0, tl.float32)  # SPLIT: decay from the current chunk's end to the part's end
    for it in range((c_hi - c_lo) * (Q // BLOCK_K)):  # chunks in reverse order, slices in any order
        c = c_hi - 1 - it // (Q // BLOCK_K)
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
        if SPLIT:  # W_c for G_{c+1}, then d_c W_c for sp_c
            tl.store(w_ptr + (row + c) * 2, tot, mask=tl.where(first, pid_pn == 0, False))
            tot = tot * tl.where(first, decay, 1.0)
            tl.store(w_ptr + (row + c) * 2 + 1, tot, mask=tl.where(first, pid_pn == 0, False))
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
    # dinit: (parts, b, h, p, n), the gradient at each part's start (d initial_states when not split)
    tl.store(dinit_ptr + part_row * headdim * dstate + tile, G, mask=mask_pn)
    if SPLIT:
        tl.store(tot_ptr + part_row, tot, mask=pid_pn == 0)


@triton.jit
def _combine_parts_kernel(ends_ptr, tot_ptr, starts_ptr, out_ptr, nparts, size, REVERSE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Pass B over the parts of one (batch, head): starts[k] = carry entering part k, carry = T_k carry + E_k,
    in part order (forward) or reverse part order (backward); out = the carry after the last part.
    ends, starts: (parts, b*h, size) fp32, tot: (parts, b*h) fp32, out: (b*h, size) fp32."""
    pid_bh = tl.program_id(0)
    nbh = tl.num_programs(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    carry = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nparts):
        k = i
        if REVERSE:
            k = nparts - 1 - i
        row = tl.cast(k, tl.int64) * nbh + pid_bh
        tl.store(starts_ptr + row * size + offs, carry, mask=mask)
        carry = tl.load(tot_ptr + row) * carry + tl.load(ends_ptr + row * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + pid_bh.to(tl.int64) * size + offs, carry, mask=mask)


@triton.jit
def _correct_chunks_kernel(fix_ptr, starts_ptr, w_ptr, S_ptr, sp_ptr, nheads, nchunks, c0, chunks_per_part,
                           size, HAS_SP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass C for one (chunk c0 + program 0, batch * head): fix[c] += W_c starts[part of c] in fp32, stored in
    fix's dtype; with HAS_SP also sp[c] += d_c W_c <starts[part], S[c]>. Skipped where W_c is 0 (exact).
    fix, S: (b, c, h, size), starts: (parts, b*h, size) fp32, w: (b*h, c, 2), sp: (b*h, c) fp32."""
    c = c0 + tl.program_id(0)
    pid_bh = tl.program_id(1)
    nbh = tl.num_programs(1)
    row = pid_bh.to(tl.int64) * nchunks + c  # (b, h, c)
    w = tl.load(w_ptr + row * 2)
    if w != 0.0:
        b = pid_bh // nheads
        h = pid_bh % nheads
        st = ((b.to(tl.int64) * nchunks + c) * nheads + h) * size
        start = ((c // chunks_per_part).to(tl.int64) * nbh + pid_bh) * size
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, size, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < size
            r = tl.load(starts_ptr + start + offs, mask=mask, other=0.0)
            v = tl.load(fix_ptr + st + offs, mask=mask, other=0.0).to(tl.float32) + w * r
            tl.store(fix_ptr + st + offs, v.to(fix_ptr.dtype.element_ty), mask=mask)
            if HAS_SP:
                dot += r * tl.load(S_ptr + st + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SP:
            tl.store(sp_ptr + row, tl.load(sp_ptr + row) + tl.load(w_ptr + row * 2 + 1) * tl.sum(dot))


# below this many chunks per part the passes B and C cost more than the shorter chains save
MIN_PART_CHUNKS = 4
# state_fwd at b1 l65536 h48 p64 n128 bf16 on an H200 (notes/gpu_run2/ssd_tuned): with the dstate block
# shrunk to 32 for the small grid, 3 pipeline stages took 0.811 ms against 1.266 ms for 2 (state_bwd:
# 1.187 against 1.228). Measured for 16-bit inputs at headdim 64, dstate 128 on a long sequence only; it now
# applies where such a sequence runs unsplit (TIME_SPLIT=1).
_SHRUNK_16BIT_STAGES = 3
# BLOCK_K (positions a dot) of 16-bit inputs at headdim <= 64, dstate <= 128 (notes/gpu_run8, H200, bf16, whole
# forward ms, BLOCK_K 64 -> 128): b4 l4096 h48 (384 programs) 0.399 -> 0.359, b8 l2048 h80 (1280) 0.696 ->
# 0.612, b1 l65536 h48 (time split, 768 programs) 1.658 -> 1.568; 256 was slower everywhere. 3 stages on top:
# 0.461 at b4 (two programs an SM instead of three: 1.5 waves), 0.595 at b8, 1.535 at b1, so they are taken
# above 4 programs an SM. state_bwd with BLOCK_K 128 (fwd+bwd ms): b4 1.517 -> 1.547, b8 2.537 -> 2.485, b1
# 6.194 -> 6.119: taken above 4 programs an SM too.
_WIDE_K = 128
_BUSY_GRID = 4  # programs per SM above which the 16-bit state kernels take 3 stages (fwd) and _WIDE_K (bwd)


def time_parts(programs: int, nchunks: int, sms: int) -> int:
    """Parts of the time split: 1 (none) when the grid already fills the GPU (>= 2 programs per SM) or the
    sequence is short; else a power of two that brings the grid to ~4 programs per SM, with at least
    MIN_PART_CHUNKS chunks per part."""
    if programs >= 2 * sms or nchunks < 2 * MIN_PART_CHUNKS:
        return 1
    want = triton.next_power_of_2(triton.cdiv(4 * sms, programs))
    return max(1, min(want, nchunks // MIN_PART_CHUNKS))


def state_plan(Q, batch, nheads, headdim, dstate, nchunks, blocks, dtype, device, stage: str = "fwd") -> dict:
    """Tiles, launch options and time split of the state kernels (``stage``: "fwd" or "bwd").

    ``blocks`` overrides: BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages, TIME_SPLIT (parts; 1 = off).
    Returns dict(BLOCK_P, BLOCK_N, BLOCK_K, parts, chunks_per_part, num_warps, num_stages).
    """
    sixteen = dtype in (torch.float16, torch.bfloat16)
    # where _SHRUNK_16BIT_STAGES, _WIDE_K and _BUSY_GRID were measured
    measured = sixteen and headdim <= 64 and dstate <= 128
    BP = blocks.get("BLOCK_P") or max(16, min(64, triton.next_power_of_2(headdim)))
    BN = blocks.get("BLOCK_N") or max(16, min(64, triton.next_power_of_2(dstate)))
    sms = num_sms(device)

    def programs(bn: int) -> int:  # of one time part, with a dstate block of bn
        return batch * nheads * triton.cdiv(headdim, BP) * triton.cdiv(dstate, bn)

    parts = blocks.get("TIME_SPLIT") or time_parts(programs(BN), nchunks, sms)
    per_part = triton.cdiv(max(nchunks, 1), max(1, min(parts, nchunks)))
    parts = triton.cdiv(max(nchunks, 1), per_part)  # no empty part
    stages = blocks.get("num_stages")
    shrunk = False
    if parts == 1 and blocks.get("BLOCK_N") is None:
        # not split: long sequential loops want many programs, so shrink the dstate block until the grid fills
        while BN > 32 and programs(BN) < 2 * sms:
            BN //= 2
            shrunk = True
        long_seq = nchunks >= 2 * MIN_PART_CHUNKS  # only measured there; short sequences keep 2 stages
        if stages is None and shrunk and long_seq and measured:
            stages = _SHRUNK_16BIT_STAGES
    busy = parts * programs(BN) > _BUSY_GRID * sms
    wide = measured and not shrunk and (stage == "fwd" or busy)  # the shrunk plan was measured with 64
    BK = min(Q, blocks.get("BLOCK_K") or (_WIDE_K if wide else 64 if sixteen else 32))
    if stages is None and measured and stage == "fwd" and busy and BK == _WIDE_K:
        stages = 3
    return dict(BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, parts=parts, chunks_per_part=per_part,
                num_warps=blocks.get("num_warps", 4 if sixteen else 8), num_stages=stages or 2)


def dot_precision(dtype):
    """fp32 inputs keep fp32 dots (tf32 would be ~1e-3 off); 16-bit inputs take Triton's default."""
    return "ieee" if dtype == torch.float32 else None


def _combine_and_correct(ends, tot, fix, w, plan, reverse, S=None, sp=None):
    """Passes B and C of the time split (module docstring). ends: (parts, b, h, p, n) fp32, tot: (parts, b, h),
    fix: (b, c, h, p, n) corrected in place, w: (b, h, c, 2). Returns the carry after the last part
    (b, h, p, n) fp32: the final state (forward) or d initial_states (backward)."""
    parts, b, h, p, n = ends.shape
    nchunks, per_part, size = fix.shape[1], plan["chunks_per_part"], p * n
    starts = torch.empty_like(ends)
    out = torch.empty(b, h, p, n, device=ends.device, dtype=torch.float32)
    blk = min(1024, triton.next_power_of_2(size))
    _combine_parts_kernel[(b * h, triton.cdiv(size, blk))](ends, tot, starts, out, parts, size, REVERSE=reverse,
                                                           BLOCK=blk, num_warps=4)
    # the first part (forward) / last part (backward) started from the true value: nothing to correct
    c0, c1 = (0, (parts - 1) * per_part) if reverse else (per_part, nchunks)
    if c1 > c0:
        blk = min(2048, triton.next_power_of_2(size))
        _correct_chunks_kernel[(c1 - c0, b * h)](
            fix, starts, w, S if S is not None else fix, sp if sp is not None else tot, h, nchunks, c0, per_part,
            size, HAS_SP=sp is not None, BLOCK=blk, num_warps=4)
    return out


def state_fwd(x, B, dt_p, dA_cs, initial_states, seq_idx, Q: int, state_dtype, blocks=None):
    """x: (b, l, h, p), B: (b, l, g, n), dt_p, dA_cs: (b, h, c, Q) fp32, initial_states: (b, h, p, n) or None.

    Returns states (b, c, h, p, n) in ``state_dtype`` (the state entering every chunk) and the final state
    (b, h, p, n) in fp32. Long sequences on a small grid run time-split (module docstring, ``state_plan``).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    plan = state_plan(Q, b, h, p, n, nchunks, blocks or {}, x.dtype, x.device)
    parts, split = plan["parts"], plan["parts"] > 1
    states = torch.empty(b, nchunks, h, p, n, device=x.device, dtype=state_dtype)
    ends = torch.empty(parts, b, h, p, n, device=x.device, dtype=torch.float32)
    w = torch.empty(b, h, nchunks, 2, device=x.device, dtype=torch.float32) if split else ends
    tot = torch.empty(parts, b, h, device=x.device, dtype=torch.float32) if split else ends
    init = initial_states if initial_states is not None else ends
    seq = seq_idx if seq_idx is not None else dt_p
    BP, BN = plan["BLOCK_P"], plan["BLOCK_N"]
    _state_fwd_kernel[(b * h, triton.cdiv(p, BP) * triton.cdiv(n, BN), parts)](
        x, B, dt_p, dA_cs, init, seq, states, ends,
        l, h, nchunks, h // g, p, n,
        *x.stride(), *B.stride(), *init.stride()[-4:], seq.stride(0), seq.stride(1),
        plan["chunks_per_part"], w, tot,
        Q=Q, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=plan["BLOCK_K"], HAS_INIT=initial_states is not None,
        HAS_SEQ=seq_idx is not None, DOT_PREC=dot_precision(x.dtype), SPLIT=split,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if not split:
        return states, ends[0]
    return states, _combine_and_correct(ends, tot, states, w, plan, reverse=False)


def state_bwd(dy, C, dA_cs, states, dfinal, seq_idx, Q: int, blocks=None):
    """Reverse pass over chunks. dy: (b, l, h, p), C: (b, l, g, n), states: (b, c, h, p, n),
    dfinal: (b, h, p, n) or None.

    Returns dstates (b, c, h, p, n) = dLoss/dS_{c+1} in states' dtype, dinit (b, h, p, n) fp32 and
    sp (b, h, c) fp32 = carry_c exp(dA_cs[c, Q-1]) <G_{c+1}, S_c>. Time-split like ``state_fwd``.
    """
    b, l, h, p = dy.shape
    g, n = C.shape[2:]
    nchunks = dA_cs.shape[2]
    plan = state_plan(Q, b, h, p, n, nchunks, blocks or {}, dy.dtype, dy.device, stage="bwd")
    parts, split = plan["parts"], plan["parts"] > 1
    BP, BN = plan["BLOCK_P"], plan["BLOCK_N"]
    nblk = triton.cdiv(p, BP) * triton.cdiv(n, BN)
    dstates = torch.empty(b, nchunks, h, p, n, device=dy.device, dtype=states.dtype)
    dinit = torch.empty(parts, b, h, p, n, device=dy.device, dtype=torch.float32)
    sp = torch.empty(b, h, nchunks, nblk, device=dy.device, dtype=torch.float32)
    w = torch.empty(b, h, nchunks, 2, device=dy.device, dtype=torch.float32) if split else sp
    tot = torch.empty(parts, b, h, device=dy.device, dtype=torch.float32) if split else sp
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    seq = seq_idx if seq_idx is not None else dA_cs
    _state_bwd_kernel[(b * h, nblk, parts)](
        dy, C, dA_cs, states, dfinal if dfinal is not None else dinit, seq,
        dstates, dinit, sp,
        l, h, nchunks, h // g, p, n,
        *dy.stride(), *C.stride(), seq.stride(0), seq.stride(1),
        plan["chunks_per_part"], w, tot,
        Q=Q, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=plan["BLOCK_K"], HAS_DFINAL=dfinal is not None,
        HAS_SEQ=seq_idx is not None, DOT_PREC=dot_precision(dy.dtype), SPLIT=split,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    sp = sp.sum(-1)
    if not split:
        return dstates, dinit[0], sp
    dinit = _combine_and_correct(dinit, tot, dstates, w, plan, reverse=True, S=states, sp=sp)
    return dstates, dinit, sp
