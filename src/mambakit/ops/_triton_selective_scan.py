"""Triton kernels and launchers of the Mamba-1 selective scan (imported lazily: needs Triton).

Two kernel families: the channel-parallel kernels here (channels on lanes, time walked inside each thread),
and the time-parallel ones of ``_triton_scan_time.py`` / ``_triton_scan_time_bwd.py`` (time on lanes). With
FWD_CONFIG / BWD_CONFIG "kernel" = "auto", ``scan_fwd`` / ``scan_bwd`` send inputs contiguous along the
sequence to the time-parallel kernels (H200, bf16, b4 d3072 l4096: fwd 1.04 vs 1.11 ms, fwd+bwd 6.13 vs 7.61;
b1 d3072 l65536: 5.12 vs 6.25, 27.8 vs 37.9) and channels-last inputs (transposed views of (b, l, d) tensors;
fwd 0.90 ms with prefetch here, 2.5 ms for a contiguous copy first) to these. The Mamba module passes
seqlen-contiguous tensors.

Forward: one program per (block of BLOCK_D channels, batch row) walks the sequence in chunks of CHUNK steps.
Per chunk it loads (CHUNK, BLOCK_D) tiles of u/delta/z and B/C for the chunk, builds dA = exp(dt A) and
dBu = dt u B and runs ``tl.associative_scan`` along time with the first-order-recurrence combine, folding the
carried state into the first step.

Tile layout, the performance-critical choice: 4-D tiles (NK, CHUNK, BLOCK_D, NJ) with the state index
n = k * NJ + j. Triton's default layout fills lanes and warps from the last axis, so with BLOCK_D * NJ = 32 *
num_warps each thread owns one (channel, j) pair and holds its NK states for all CHUNK steps in registers: the
scan along time runs inside each thread (no shuffles), and y = sum_n h C costs NK - 1 in-register adds plus
log2(NJ) shuffle rounds shared by NK states (4 shuffles per element for NK = 1, 0.5 for NK = 4). Larger NK
means fewer threads (b * d * NJ) and more registers per thread; the GPU script times the trade-off.

Checkpoints: the state at every SEG-th step (SEG a multiple of CHUNK, 128 by default) is saved in fp32,
(b, nseg, d, n): 1/SEG of the full states. The backward walks the segments in reverse; per segment it first
re-runs the forward over its sub-chunks writing each sub-chunk's start state to a small per-program scratch
buffer (L2-resident), then walks the sub-chunks in reverse: recompute the states, then a reverse scan for
g_t = dL/dh_t = dy_t C_t + dA_{t+1} g_{t+1}. That recurrence reads the *next* step's dA, so the reverse scan
carries a triple (dA of the segment's first step, product of the other steps' dA, value) instead of a shifted
copy of dA. Per-step dB/dC are reduced over the program's channels and added atomically in fp32; dA, dD,
delta_bias (and constant B/C) go to per-batch partial buffers that the launcher sums.

Variants (keys of FWD_CONFIG / BWD_CONFIG, all off by default; the GPU script times them):
- prefetch (forward; 1 or 2 chunks ahead): the loop over chunks carries the raw tiles of the next one or two
  chunks in registers, loaded before the current chunk is computed, so that global-load latency overlaps the
  scan (each SM holds only ~3 programs of 4 warps: ptxas gives the wide tiles 154 registers a thread).
- parts (time split, for grids too small to fill the GPU, e.g. b1 d3072 l65536 = 96 wide programs): the
  sequence is cut into parts of whole checkpoint segments, each walked by its own programs. Forward: pass 1
  runs parts 0..P-2 from a zero state, keeping each part's end state and the product of its dA (exactly 0 if a
  packed sequence starts inside); pass 2 (_combine_parts_kernel) combines them in order into every part's
  true start state; pass 3 is the ordinary forward of every part from its start state. Backward, the mirror
  image: g needs no states, so pass 1 runs only g's reverse recurrence over parts 1..P-1 from a zero gradient;
  pass 2 combines them backwards into the gradient arriving at each part's end; pass 3 is the ordinary
  backward of every part. The extra pass costs about half a pass; the split pays when it multiplies the
  programs in flight.
- cl_copy: channels-last u/delta/z (stride 1 along d, the Mamba module's views of in_proj's output) are
  copied to contiguous (b, d, l) first (a few tenths of a ms at b4 d3072 l4096), so that the kernel reads
  each channel's time steps as runs of contiguous memory.
- num_stages, maxnreg: Triton's launch options; chunk / nk / block_d: the tiles above.

All offsets that scale with batch, channels or time are int64 (1M tokens x 5120 channels > 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops.dispatch import num_sms


@triton.jit
def _softplus(x):
    # torch's threshold (linear above 20); exp(x) below -15 where log(1 + exp(x)) rounds to 0 in fp32
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _recurrence_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _reverse_combine(f1, q1, v1, f2, q2, v2):
    # Reverse scan: (f1, q1, v1) aggregates the later segment, (f2, q2, v2) the earlier one (Triton passes the
    # running aggregate first, as its test_scan2d reference for reverse=True shows). A segment holds f = dA of
    # its first step, q = product of its other steps' dA, v = g at its first step without gradient from after
    # the segment; g_t = c_t + dA_{t+1} g_{t+1} composes as below.
    return f2, q2 * f1 * q1, v2 + q2 * f1 * v1


@triton.jit
def _sum_n(x):
    """(NK, CHUNK, BLOCK_D, NJ) -> (CHUNK, BLOCK_D): in-register adds over k, then shuffles over j."""
    return tl.sum(tl.sum(x, axis=0), axis=2)


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _seq_reset(seq_base, t, mask_t, s_sl):
    """(len(t),) bool: a packed sequence starts at step t (seq_idx changes there), so no decay from the
    previous state; False at masked steps and at t = 0."""
    cur = tl.load(seq_base + t * s_sl, mask=mask_t, other=0)
    prev = tl.load(seq_base + (t - 1) * s_sl, mask=mask_t & (t > 0), other=0)
    return (cur != prev) & (t > 0) & mask_t


@triton.jit
def _load_chunk(u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, t0, t_end, offs_t, mask_d, mask_n4,
                s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl,
                HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr, LOAD_C: tl.constexpr):
    """The raw tiles of the chunk starting at step t0 (steps >= t_end masked), in the inputs' dtypes (half the
    registers of fp32 while prefetched): u, x (delta before bias), z (CHUNK, BLOCK_D); B, C broadcastable to
    (NK, CHUNK, BLOCK_D, NJ); reset (CHUNK,): a packed sequence starts there. Unused outputs (z without HAS_Z,
    C without LOAD_C, reset without HAS_SEQ) are placeholders."""
    t = t0 + offs_t.to(tl.int64)
    mask_t = t < t_end
    m2 = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_base + t[:, None] * s_ul, mask=m2, other=0.0)
    x = tl.load(dt_base + t[:, None] * s_dtl, mask=m2, other=0.0)
    zv = u
    if HAS_Z:
        zv = tl.load(z_base + t[:, None] * s_zl, mask=m2, other=0.0)
    reset = t < 0
    if HAS_SEQ:
        reset = _seq_reset(seq_base, t, mask_t, s_sl)
    if CONST_BC:
        Bt = Bk[:, None, :, :]
        Ct = Ck[:, None, :, :]
    else:  # B_ptrs: (NK, 1, 1, NJ) pointers to step 0
        t4 = t[None, :, None, None]
        mnt = mask_n4 & (t4 < t_end)
        Bt = tl.load(B_ptrs + t4 * s_Bl, mask=mnt, other=0.0)
        Ct = Bt
        if LOAD_C:
            Ct = tl.load(C_ptrs + t4 * s_Cl, mask=mnt, other=0.0)
    return u, x, zv, Bt, Ct, reset


@triton.jit
def _discretize(u, x, reset, Bt, A2, bias, m2, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ: tl.constexpr):
    """dt (CHUNK, BLOCK_D) after bias and softplus (0 at masked steps, so that the state passes through), the
    pre-softplus x, and dA = exp(dt A), dBu = dt u B (NK, CHUNK, BLOCK_D, NJ); u, x, B fp32."""
    if HAS_BIAS:
        x = x + bias[None, :]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    dt = tl.where(m2, dt, 0.0)
    dA = tl.exp2(dt[None, :, :, None] * A2[:, None, :, :])
    if HAS_SEQ:
        dA = tl.where(reset[None, :, None, None], 0.0, dA)
    dBu = (dt * u)[None, :, :, None] * Bt
    return dt, x, dA, dBu


@triton.jit
def _chunk_terms(u_base, dt_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, A2, bias, t0, L, offs_t, mask_d, mask_n4,
                 s_ul, s_dtl, s_Bl, s_Cl, s_sl,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr):
    """Loads one chunk starting at step t0. Returns t (CHUNK,) int64, the (CHUNK, BLOCK_D) mask, u, dt (after bias
    and softplus, 0 past the end so that the state passes through) and the pre-softplus x, all (CHUNK, BLOCK_D);
    dA and dBu (NK, CHUNK, BLOCK_D, NJ); B and C broadcastable to that shape."""
    t = t0 + offs_t.to(tl.int64)
    m2 = (t < L)[:, None] & mask_d[None, :]
    u, x, _, Bt, Ct, reset = _load_chunk(u_base, dt_base, u_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, t0, L, offs_t,
                                         mask_d, mask_n4, s_ul, s_dtl, s_ul, s_Bl, s_Cl, s_sl,
                                         False, HAS_SEQ, CONST_BC, True)
    u, x, Bt, Ct = u.to(tl.float32), x.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32)
    dt, x, dA, dBu = _discretize(u, x, reset, Bt, A2, bias, m2, HAS_BIAS, SOFTPLUS, HAS_SEQ)
    return t, m2, u, dt, x, dA, dBu, Bt, Ct


@triton.jit
def _states(dA, dBu, h, first):
    """States of one chunk (NK, CHUNK, BLOCK_D, NJ) given the state h (NK, BLOCK_D, NJ) before it."""
    _, hs = tl.associative_scan((dA, tl.where(first, dBu + dA * h[:, None, :, :], dBu)), 1, _recurrence_combine)
    return hs


@triton.jit
def _state_index(pid_d, DIM, NSTATE, BLOCK_D: tl.constexpr, NK: tl.constexpr, NJ: tl.constexpr):
    """Channel offsets (BLOCK_D,), their mask, and for state-shaped (NK, BLOCK_D, NJ) tensors: the state index
    n (NK, 1, NJ), the offset d * NSTATE + n (int64) and the mask."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n3 = tl.arange(0, NK)[:, None, None] * NJ + tl.arange(0, NJ)[None, None, :]
    d3 = offs_d.to(tl.int64)[None, :, None]
    mask_s = (offs_d < DIM)[None, :, None] & (n3 < NSTATE)
    return offs_d, offs_d < DIM, n3, d3 * NSTATE + n3, mask_s


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr, out_ptr, last_ptr, states_ptr,
    decay_ptr, L, DIM, NSTATE, DIM_PER_GROUP, PART_LEN,
    s_ub, s_ud, s_ul, s_dtb, s_dtd, s_dtl, s_Ad, s_An,
    s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_hb, s_hp, s_hd, s_hn, s_sb, s_sl, s_lb, s_lp,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr, STORE_STATES: tl.constexpr,
    PASS1: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_D: tl.constexpr, NK: tl.constexpr, NJ: tl.constexpr, CHUNK: tl.constexpr, SEG: tl.constexpr,
):
    """Grid (channel blocks, b, parts): program (., ., p) walks steps [p PART_LEN, (p + 1) PART_LEN), a multiple
    of SEG (one part of length >= L without a time split). h0: (b, parts, d, n) via s_hp (0: shared).
    PASS1 (time split, pass 1): from a zero state, write only the part's end state to last_ptr and the product
    of its dA to decay_ptr, both (b, parts, d, n) via s_lb / s_lp; else write out and, for the last part, the
    last state. PREFETCH (0, 1, 2): the tiles of the chunk that many ahead are loaded before the current chunk
    is computed."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    offs_d, mask_d, n3, st_off, mask_s = _state_index(pid_d, DIM, NSTATE, BLOCK_D, NK, NJ)
    offs_t = tl.arange(0, CHUNK)
    d64 = offs_d.to(tl.int64)
    d3 = d64[None, :, None]
    A2 = tl.load(A_ptr + d3 * s_Ad + n3 * s_An, mask=mask_s, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    n4 = n3[:, None, :, :]  # (NK, 1, 1, NJ)
    Bk = A2  # placeholders when B and C vary per step
    Ck = A2
    B_ptrs = B_ptr
    C_ptrs = C_ptr
    if CONST_BC:  # B, C: (d, n), s_Bx the channel stride
        Bk = tl.load(B_ptr + d3 * s_Bx + n3 * s_Bn, mask=mask_s, other=0.0).to(tl.float32)
        Ck = tl.load(C_ptr + d3 * s_Cx + n3 * s_Cn, mask=mask_s, other=0.0).to(tl.float32)
    else:  # B, C: (b, g, n, l), s_Bx the group stride (0 for (b, n, l)); a program never straddles two groups
        group = ((pid_d * BLOCK_D) // DIM_PER_GROUP).to(tl.int64)
        B_ptrs = B_ptr + pid_b * s_Bb + group * s_Bx + n4 * s_Bn
        C_ptrs = C_ptr + pid_b * s_Cb + group * s_Cx + n4 * s_Cn
    mask_n4 = n4 < NSTATE
    u_base = u_ptr + pid_b * s_ub + d64[None, :] * s_ud
    dt_base = dt_ptr + pid_b * s_dtb + d64[None, :] * s_dtd
    z_base = z_ptr + pid_b * s_zb + d64[None, :] * s_zd
    o_base = out_ptr + pid_b * s_ob + d64[None, :] * s_od
    seq_base = seq_ptr + pid_b * s_sb
    if HAS_H0 and not PASS1:
        h = tl.load(h0_ptr + pid_b * s_hb + pid_p * s_hp + d3 * s_hd + n3 * s_hn, mask=mask_s,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros([NK, BLOCK_D, NJ], dtype=tl.float32)
    decay = tl.full([NK, BLOCK_D, NJ], 1.0, dtype=tl.float32)
    first = (offs_t == 0)[None, :, None, None]
    last = (offs_t == CHUNK - 1)[None, :, None, None]
    SUBS: tl.constexpr = SEG // CHUNK
    t_end = tl.minimum(L, (pid_p + 1).to(tl.int64) * PART_LEN)
    c_begin = pid_p.to(tl.int64) * (PART_LEN // CHUNK)  # int64 chunk indices: t = c * CHUNK needs no cast
    c_end = tl.cdiv(t_end, CHUNK)
    st_ptr = states_ptr + pid_b * tl.cdiv(L, SEG) * DIM * NSTATE + st_off  # checkpoint s at + s * DIM * NSTATE
    LOAD_OUT: tl.constexpr = not PASS1
    if PREFETCH >= 1:
        u_n, x_n, z_n, B_n, C_n, r_n = _load_chunk(
            u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, c_begin * CHUNK, t_end,
            offs_t, mask_d, mask_n4, s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl,
            HAS_Z and LOAD_OUT, HAS_SEQ, CONST_BC, LOAD_OUT)
    if PREFETCH == 2:
        u_m, x_m, z_m, B_m, C_m, r_m = _load_chunk(
            u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, (c_begin + 1) * CHUNK, t_end,
            offs_t, mask_d, mask_n4, s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl,
            HAS_Z and LOAD_OUT, HAS_SEQ, CONST_BC, LOAD_OUT)
    for c in range(c_begin, c_end):
        t0 = c * CHUNK
        if STORE_STATES:
            if c % SUBS == 0:
                tl.store(st_ptr + (c // SUBS) * (DIM * NSTATE), h, mask=mask_s)
        if PREFETCH == 1:  # registers carry the next chunk's tiles, so its loads overlap this chunk's scan
            u, x, zv, Bt, Ct, reset = u_n, x_n, z_n, B_n, C_n, r_n
            u_n, x_n, z_n, B_n, C_n, r_n = _load_chunk(
                u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, t0 + CHUNK, t_end, offs_t, mask_d,
                mask_n4, s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl, HAS_Z and LOAD_OUT, HAS_SEQ, CONST_BC, LOAD_OUT)
        elif PREFETCH == 2:  # two chunks ahead: the loads get two chunks' compute to arrive
            u, x, zv, Bt, Ct, reset = u_n, x_n, z_n, B_n, C_n, r_n
            u_n, x_n, z_n, B_n, C_n, r_n = u_m, x_m, z_m, B_m, C_m, r_m
            u_m, x_m, z_m, B_m, C_m, r_m = _load_chunk(
                u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, t0 + 2 * CHUNK, t_end, offs_t, mask_d,
                mask_n4, s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl, HAS_Z and LOAD_OUT, HAS_SEQ, CONST_BC, LOAD_OUT)
        else:
            u, x, zv, Bt, Ct, reset = _load_chunk(
                u_base, dt_base, z_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, t0, t_end, offs_t, mask_d, mask_n4,
                s_ul, s_dtl, s_zl, s_Bl, s_Cl, s_sl, HAS_Z and LOAD_OUT, HAS_SEQ, CONST_BC, LOAD_OUT)
        u, x, zv = u.to(tl.float32), x.to(tl.float32), zv.to(tl.float32)
        Bt, Ct = Bt.to(tl.float32), Ct.to(tl.float32)
        t = t0 + offs_t.to(tl.int64)
        m2 = (t < t_end)[:, None] & mask_d[None, :]
        dt, x, dA, dBu = _discretize(u, x, reset, Bt, A2, bias, m2, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        hs = _states(dA, dBu, h, first)
        h = tl.sum(tl.where(last, hs, 0.0), axis=1)
        if PASS1:
            decay *= tl.reduce(dA, 1, _mul)
        else:
            y = _sum_n(hs * Ct)  # (CHUNK, BLOCK_D)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                y *= zv * tl.sigmoid(zv)
            tl.store(o_base + t[:, None] * s_ol, y.to(out_ptr.dtype.element_ty), mask=m2)
    l_ptr = last_ptr + pid_b * s_lb + pid_p * s_lp + st_off
    if PASS1:
        tl.store(l_ptr, h, mask=mask_s)
        tl.store(decay_ptr + pid_b * s_lb + pid_p * s_lp + st_off, decay, mask=mask_s)
    elif pid_p == tl.num_programs(2) - 1:
        tl.store(l_ptr, h, mask=mask_s)


@triton.jit
def _combine_parts_kernel(end_ptr, decay_ptr, h0_ptr, out_ptr, NPARTS, SIZE,
                          HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Time split, pass 2: the sequential combine over parts. end, decay, out: contiguous (b, parts, SIZE) fp32;
    h0: (b, SIZE). Forward: out[p] = the state before part p, out[0] = h0, out[p + 1] = decay[p] out[p] + end[p].
    REVERSE (backward): out[p] = the gradient arriving at the end of part p, out[last] = h0 (dlast),
    out[p - 1] = decay[p] out[p] + end[p]."""
    pid_b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(NPARTS):
        p = i
        if REVERSE:
            p = NPARTS - 1 - i
        off = (pid_b * NPARTS + p) * SIZE + offs
        tl.store(out_ptr + off, h, mask=mask)
        if i < NPARTS - 1:
            h = tl.load(decay_ptr + off, mask=mask, other=0.0) * h + tl.load(end_ptr + off, mask=mask, other=0.0)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, states_ptr, dout_ptr, dlast_ptr,
    scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr, decay_ptr,
    L, DIM, NSTATE, DIM_PER_GROUP, NGROUPS, PART_LEN, PART0, NPARTS,
    s_ub, s_ud, s_ul, s_dtb, s_dtd, s_dtl, s_Ad, s_An,
    s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_sb, s_sl, s_glb, s_glp,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr, G_ONLY: tl.constexpr,
    BLOCK_D: tl.constexpr, NK: tl.constexpr, NJ: tl.constexpr, CHUNK: tl.constexpr, SEG: tl.constexpr,
):
    """Gradients. Grid (channel blocks, b, parts - PART0): program (., ., p - PART0) walks back over steps
    [p PART_LEN, (p + 1) PART_LEN) (PART_LEN a multiple of SEG; one part without a time split), starting from
    the gradient dlast (b, parts, d, n) via s_glb / s_glp (s_glp 0: shared). du, ddt, dz: contiguous (b, d, l);
    dB, dC: fp32 (b, g, n, l) zeroed (atomics) or, when constant, (b * parts, d, n) partials; dA: (b * parts,
    d, n) partials; dD, dbias: (b * parts, d) partials; dh0: (b, parts, d, n), the gradient into each part's
    start state; scratch: (b * parts, cdiv(d, BLOCK_D), SEG // CHUNK, BLOCK_D * NK * NJ) fp32.
    G_ONLY (time split, pass 1): only the reverse recurrence of g from a zero gradient at the part's end:
    writes dh0 and the product of the part's dA to decay_ptr (b, parts, d, n), nothing else."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2) + PART0
    pid_q = pid_b * NPARTS + pid_p  # (batch row, part): the index of this program's partials
    offs_d, mask_d, n3, st_off, mask_s = _state_index(pid_d, DIM, NSTATE, BLOCK_D, NK, NJ)
    offs_t = tl.arange(0, CHUNK)
    d64 = offs_d.to(tl.int64)
    d3 = d64[None, :, None]
    A = tl.load(A_ptr + d3 * s_Ad + n3 * s_An, mask=mask_s, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    n4 = n3[:, None, :, :]
    Bk = A
    Ck = A
    B_ptrs = B_ptr
    C_ptrs = C_ptr
    if CONST_BC:
        Bk = tl.load(B_ptr + d3 * s_Bx + n3 * s_Bn, mask=mask_s, other=0.0).to(tl.float32)
        Ck = tl.load(C_ptr + d3 * s_Cx + n3 * s_Cn, mask=mask_s, other=0.0).to(tl.float32)
    else:
        group = ((pid_d * BLOCK_D) // DIM_PER_GROUP).to(tl.int64)
        B_ptrs = B_ptr + pid_b * s_Bb + group * s_Bx + n4 * s_Bn
        C_ptrs = C_ptr + pid_b * s_Cb + group * s_Cx + n4 * s_Cn
        dBC_off = ((pid_b * NGROUPS + group) * NSTATE + n3) * L  # (NK, 1, NJ) in (b, g, n, l)
    mask_n4 = n4 < NSTATE
    dB_acc = tl.zeros([NK, BLOCK_D, NJ], dtype=tl.float32)
    dC_acc = tl.zeros([NK, BLOCK_D, NJ], dtype=tl.float32)
    u_base = u_ptr + pid_b * s_ub + d64[None, :] * s_ud
    dt_base = dt_ptr + pid_b * s_dtb + d64[None, :] * s_dtd
    z_base = z_ptr + pid_b * s_zb + d64[None, :] * s_zd
    g_base = dout_ptr + pid_b * s_gb + d64[None, :] * s_gd
    bdl = (pid_b * DIM + d64[None, :]) * L  # (1, BLOCK_D) in contiguous (b, d, l)
    seq_base = seq_ptr + pid_b * s_sb
    scr_ptr = (scratch_ptr + (pid_q * tl.num_programs(0) + pid_d) * ((SEG // CHUNK) * BLOCK_D * NK * NJ)
               + (tl.arange(0, NK)[:, None, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :, None]) * NJ
               + tl.arange(0, NJ)[None, None, :])
    nseg = tl.cdiv(L, SEG)
    s_begin = pid_p * (PART_LEN // SEG)
    s_end = tl.minimum(nseg, s_begin + PART_LEN // SEG)
    st_ptr = states_ptr + (pid_b * nseg + s_end - 1) * DIM * NSTATE + st_off  # the part's last checkpoint
    if HAS_DLAST:
        Gc = tl.load(dlast_ptr + pid_b * s_glb + pid_p * s_glp + st_off, mask=mask_s, other=0.0)
    else:
        Gc = tl.zeros([NK, BLOCK_D, NJ], dtype=tl.float32)
    dA_acc = tl.zeros([NK, BLOCK_D, NJ], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = (offs_t == 0)[None, :, None, None]
    last = (offs_t == CHUNK - 1)[None, :, None, None]
    decay = tl.full([NK, BLOCK_D, NJ], 1.0, dtype=tl.float32)
    for i in range(s_end - s_begin):
        s = s_end - 1 - i
        nsub = tl.minimum(SEG // CHUNK, tl.cdiv(L - s * SEG, CHUNK))
        if not G_ONLY:
            h = tl.load(st_ptr, mask=mask_s, other=0.0)
            st_ptr -= DIM * NSTATE
            for j in range(nsub):  # forward over the segment: the start state of every sub-chunk to scratch
                tl.store(scr_ptr + j * (BLOCK_D * NK * NJ), h)
                t, m2, u, dt, x, dA, dBu, Bt, Ct = _chunk_terms(
                    u_base, dt_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, A2, bias, s * SEG + j * CHUNK, L, offs_t,
                    mask_d, mask_n4, s_ul, s_dtl, s_Bl, s_Cl, s_sl, HAS_BIAS, SOFTPLUS, HAS_SEQ, CONST_BC)
                h = tl.sum(tl.where(last, _states(dA, dBu, h, first), 0.0), axis=1)
            tl.debug_barrier()  # scratch written above is read below, possibly by other threads
        for jj in range(nsub):
            j = nsub - 1 - jj
            t, m2, u, dt, x, dA, dBu, Bt, Ct = _chunk_terms(
                u_base, dt_base, B_ptrs, C_ptrs, seq_base, Bk, Ck, A2, bias, s * SEG + j * CHUNK, L, offs_t,
                mask_d, mask_n4, s_ul, s_dtl, s_Bl, s_Cl, s_sl, HAS_BIAS, SOFTPLUS, HAS_SEQ, CONST_BC)
            dy = tl.load(g_base + t[:, None] * s_gl, mask=m2, other=0.0).to(tl.float32)
            if G_ONLY:  # g needs neither the states nor any gradient but its own recurrence
                if HAS_Z:
                    zv = tl.load(z_base + t[:, None] * s_zl, mask=m2, other=0.0).to(tl.float32)
                    dy = dy * zv * tl.sigmoid(zv)
                dyC = dy[None, :, :, None] * Ct
                dyC = tl.where(last, dyC + Gc[:, None, :, :], dyC)
                _, _, g = tl.associative_scan((dA, tl.full(dA.shape, 1.0, tl.float32), dyC), 1, _reverse_combine,
                                              reverse=True)
                Gc = tl.sum(tl.where(first, g * dA, 0.0), axis=1)
                decay *= tl.reduce(dA, 1, _mul)
            else:
                h_in = tl.load(scr_ptr + j * (BLOCK_D * NK * NJ))
                hs = _states(dA, dBu, h_in, first)
                if HAS_Z:
                    zv = tl.load(z_base + t[:, None] * s_zl, mask=m2, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zv)
                    y = _sum_n(hs * Ct)
                    if HAS_D:
                        y += Dv[None, :] * u
                    dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
                    tl.store(dz_ptr + bdl + t[:, None], dz.to(dz_ptr.dtype.element_ty), mask=m2)
                    dy = dy * zv * sz
                dy4 = dy[None, :, :, None]
                dyC = dy4 * Ct
                dyC = tl.where(last, dyC + Gc[:, None, :, :], dyC)  # gradient arriving from the next chunk
                _, _, g = tl.associative_scan((dA, tl.full(dA.shape, 1.0, tl.float32), dyC), 1, _reverse_combine,
                                              reverse=True)  # g_t = dL/dh_t
                Gc = tl.sum(tl.where(first, g * dA, 0.0), axis=1)  # into the state before this chunk
                w = g * (hs - dBu)  # g_t dA_t h_{t-1} = dL/d(dt_t A)
                gB = _sum_n(g * Bt)  # (CHUNK, BLOCK_D)
                ddt = _sum_n(w * A[:, None, :, :]) + gB * u
                du = gB * dt
                if HAS_D:
                    du += Dv[None, :] * dy
                    dD_acc += tl.sum(dy * u, axis=0)
                dA_acc += tl.sum(w * dt[None, :, :, None], axis=1)
                if SOFTPLUS:
                    ddt = tl.where(x > 20.0, ddt, ddt * tl.sigmoid(x))
                ddt = tl.where(m2, ddt, 0.0)
                dbias_acc += tl.sum(ddt, axis=0)
                tl.store(du_ptr + bdl + t[:, None], du.to(du_ptr.dtype.element_ty), mask=m2)
                tl.store(ddt_ptr + bdl + t[:, None], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
                dtu4 = (dt * u)[None, :, :, None]
                if CONST_BC:
                    dB_acc += tl.sum(g * dtu4, axis=1)
                    dC_acc += tl.sum(hs * dy4, axis=1)
                else:  # per-step dB, dC: (NK, CHUNK, NJ) summed over this program's channels
                    t3 = t[None, :, None]
                    mnt = (n3 < NSTATE) & (t3 < L)
                    tl.atomic_add(dB_ptr + dBC_off + t3, tl.sum(g * dtu4, axis=2), mask=mnt, sem="relaxed")
                    tl.atomic_add(dC_ptr + dBC_off + t3, tl.sum(hs * dy4, axis=2), mask=mnt, sem="relaxed")
        if not G_ONLY:
            tl.debug_barrier()  # the next segment overwrites the scratch read above
    bdn = pid_q * DIM * NSTATE + st_off
    tl.store(dh0_ptr + bdn, Gc, mask=mask_s)
    if G_ONLY:
        tl.store(decay_ptr + bdn, decay, mask=mask_s)
    else:
        tl.store(dA_ptr + bdn, dA_acc, mask=mask_s)
        if CONST_BC:
            tl.store(dB_ptr + bdn, dB_acc, mask=mask_s)
            tl.store(dC_ptr + bdn, dC_acc, mask=mask_s)
        tl.store(dD_ptr + pid_q * DIM + d64, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + pid_q * DIM + d64, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

# nk: states per thread; chunk: steps per loop iteration (registers per thread ~ nk * chunk per tile);
# seg: steps between saved states. num_warps None: block_d * (n / nk) / 32, so that every thread owns one
# (channel, j) pair. block_d / nk / chunk None: chosen per call by _auto_tiles. num_stages, maxnreg: Triton's
# launch options (None: its default; maxnreg caps registers a thread, e.g. 168 keeps 3 programs of 4 warps on
# an SM: ptxas gives the wide forward 154 registers, 194 with prefetch). prefetch (False / True = 1 / 2, or
# "auto": 1 for channels-last u, else 0): load the tiles of the chunk that many ahead before computing the
# current one. parts: time split into that many parts run by separate programs (1: none; 0: auto, a split
# only when the wide tiles give fewer than 2 programs an SM, into enough parts for part_programs programs
# an SM; see _time_split). cl_copy: copy channels-last u/delta/z (stride 1 along d)
# to contiguous (b, d, l) before the kernel, so that the kernel reads whole time rows per channel.
# The GPU script (scripts/gpu_check_mamba1.py) times variants of these.
# Defaults measured on an H200 (notes/gpu_run3/mamba1, bf16, n = 16): prefetch for channels-last inputs
# (b4 d3072 l4096 fwd 0.90 vs 1.22 ms; contiguous 1.14 vs 1.11, so off there);
# an automatic time split on small grids (b1 d3072 l65536 fwd 10.1 -> 6.25 ms with 32 parts, fwd+bwd
# 76.6 -> 40.5 ms); the backward capped at 168 registers (3 programs an SM: b4 fwd+bwd 8.78 -> 7.63 ms).
# kernel: "auto" (the time-parallel kernel of _triton_scan_time.py when it takes the inputs: u, delta, z
# contiguous along time; else this module's channel-parallel one), "time" or "channel" (forced).
FWD_CONFIG = dict(kernel="auto", block_d=None, nk=None, chunk=None, seg=128, num_warps=None, num_stages=None,
                  maxnreg=None, prefetch="auto", parts=0, part_programs=16, cl_copy=False)
# kernel: as FWD_CONFIG's, for the backward (the time-parallel one is in _triton_scan_time_bwd.py).
BWD_CONFIG = dict(kernel="auto", block_d=None, nk=None, chunk=None, num_warps=None, num_stages=None, maxnreg=168,
                  parts=0, part_programs=16, cl_copy=False)

# Measured on an H200 (notes/gpu_run2, bf16, n = 16): with >= 2 programs per SM, wide programs with 4 states
# per thread are fastest (b4 d3072 l4096: fwd 1.14 ms vs 2.92 ms for (8, 1, 16), fwd+bwd 10.5 vs 15.8 ms);
# with fewer programs (b1 d3072 l65536: 96 of them) the sequential walk is latency-bound and more, narrower
# programs win (fwd 10.8 ms for (4, 1, 16) vs 13.7 ms for (32, 4, 4)).
_WIDE = dict(block_d=32, nk=4, chunk=4)
_NARROW_FWD = dict(block_d=4, nk=1, chunk=16)
_NARROW_BWD = dict(block_d=8, nk=1, chunk=16)


def _auto_tiles(cfg: dict, u: torch.Tensor, narrow: dict) -> dict:
    """Fills the config's None tiles from the grid size: the wide tiles when they give every SM two programs
    (counting a fixed time split's parts; an automatic split, parts=0, supplies the programs itself)."""
    b, d = u.shape[0], u.shape[1]
    parts = cfg.get("parts", 1)
    programs = b * triton.cdiv(d, _WIDE["block_d"]) * max(parts, 1)
    preset = _WIDE if parts == 0 or programs >= 2 * num_sms(u.device) else narrow
    return {k: (preset[k] if v is None and k in preset else v) for k, v in cfg.items()}


def _time_split(cfg: dict, u: torch.Tensor, block_d: int, seg: int) -> tuple[int, int]:
    """(parts, part_len): part_len a multiple of seg (checkpoints and chunks never straddle parts), parts =
    cdiv(l, part_len). parts=0: no split when the grid already gives every SM two programs, else the smallest
    power of two giving part_programs programs per SM."""
    b, d, l = u.shape
    nseg = triton.cdiv(max(l, 1), seg)
    want = cfg["parts"]
    if want == 0:
        programs, sms = b * triton.cdiv(d, block_d), num_sms(u.device)
        want = 1 if programs >= 2 * sms else triton.next_power_of_2(triton.cdiv(cfg["part_programs"] * sms, programs))
    part_segs = triton.cdiv(nseg, max(1, min(want, nseg)))
    return triton.cdiv(nseg, part_segs), part_segs * seg


def _prefetch(cfg: dict, u: torch.Tensor) -> int:
    """Chunks loaded ahead: the config's value, or for "auto" 1 when u is channels-last (stride 1 along d)."""
    if cfg["prefetch"] == "auto":
        return int(u.stride(1) == 1 and u.shape[2] > 1)
    return int(cfg["prefetch"])


def _contiguous_if_channels_last(cfg: dict, *ts):
    """With cl_copy, channels-last (stride 1 along d) (b, d, l) tensors become contiguous copies."""
    if not cfg["cl_copy"]:
        return ts
    return tuple(t.contiguous() if t is not None and t.shape[2] > 1 and t.stride(1) == 1 else t for t in ts)


def _combine_parts(end: torch.Tensor, decay: torch.Tensor, h0, reverse: bool) -> torch.Tensor:
    """Time split, pass 2: end, decay (b, parts, d, n) fp32 (parts - 1 filled: the last part's (reverse: the
    first's) are never read); h0 (b, d, n) or None -> (b, parts, d, n): each part's start state (reverse: the
    gradient at each part's end)."""
    b, parts, d, n = end.shape
    out = _empty_like(end)
    size, block = d * n, 1024
    _combine_parts_kernel[(triton.cdiv(size, block), b)](
        end, decay, _opt(h0, end), out, parts, size,
        HAS_H0=h0 is not None, REVERSE=reverse, BLOCK=block)
    return out


# Every buffer a kernel fills is allocated through these two, so that tests can poison them with NaN.
_empty, _empty_like = torch.empty, torch.empty_like


def _bc_strides(M: torch.Tensor):
    """(s_b, s_x, s_n, s_l) of B/C: s_x is the channel stride when constant (d, n), else the group stride."""
    if M.dim() == 2:
        return 0, M.stride(0), M.stride(1), 0
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride()


def _group_block_d(block_d: int, d: int, B: torch.Tensor) -> int:
    """Channels per program: block_d, at most next_pow2(d), halved until a program never straddles two groups
    of B/C ((b, g, n, l) with g > 1)."""
    g = B.shape[1] if B.dim() == 4 else 1
    block_d = min(block_d, triton.next_power_of_2(d))
    while g > 1 and (d // g) % block_d:
        block_d //= 2
    return block_d


def _blocks(u, A, B, cfg, chunk):
    """Kernel meta-parameters from a config: BLOCK_D, NK, NJ, CHUNK and num_warps.
    A program never straddles two groups of B/C."""
    d, l = u.shape[1], u.shape[2]
    block_d = _group_block_d(cfg["block_d"], d, B)
    BN = max(2, triton.next_power_of_2(A.shape[1]))
    nk = min(cfg["nk"], BN)
    chunk = max(2, min(chunk, triton.next_power_of_2(max(l, 1))))
    warps = cfg["num_warps"] or max(1, min(8, block_d * (BN // nk) // 32))
    return dict(BLOCK_D=block_d, NK=nk, NJ=BN // nk, CHUNK=chunk, num_warps=warps)


def _config(defaults: dict, **overrides) -> dict:
    cfg = dict(defaults)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def _opt(t, fallback):
    return t if t is not None else fallback


def _launch_opts(cfg: dict, meta: dict) -> dict:
    """The kernel meta-parameters plus Triton's launch options that the config sets (None: Triton's default)."""
    return dict(meta, **{k: cfg[k] for k in ("num_stages", "maxnreg") if cfg.get(k) is not None})


def _time_kernel(cfg: dict, u, delta, z, A, seg=None) -> bool:
    """Whether the forward (or, given the saved states' spacing seg, the backward) runs the time-parallel
    kernel (the config's "kernel" key)."""
    if cfg["kernel"] == "channel":
        return False
    from mambakit.ops import _triton_scan_time as tk

    ok = tk.supports(u, delta, z, A) and (seg is None or seg & (seg - 1) == 0)
    if cfg["kernel"] == "time" and not ok:
        raise ValueError("selective scan: the time-parallel kernel needs u, delta and z contiguous along the "
                         f"sequence and d_state <= {tk.FWD_TIME_CONFIG['max_n']}; set "
                         "FWD_CONFIG / BWD_CONFIG['kernel'] to 'auto' or 'channel' for these inputs")
    return ok


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, softplus, store_states, **overrides):
    """Returns out (like u; contiguous (b, d, l) when cl_copy copied u), last_state (b, d, n) fp32, the saved
    states (b, nseg, d, n) fp32 or None, and the steps between saved states (the backward needs it).
    ``overrides``: keys of FWD_CONFIG.

    With a time split (parts > 1): pass 1 runs parts 0..parts-2 from a zero state, giving each part's end
    state and the product of its dA (0 when a packed sequence starts inside); pass 2 combines them in order
    into every part's true start state; pass 3 is the ordinary forward of all parts from those states."""
    cfg = _auto_tiles(_config(FWD_CONFIG, **overrides), u, _NARROW_FWD)
    u, delta, z = _contiguous_if_channels_last(cfg, u, delta, z)
    if _time_kernel(cfg, u, delta, z, A):
        from mambakit.ops import _triton_scan_time as tk

        return tk.scan_fwd_time(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, softplus, store_states)
    b, d, l = u.shape
    n = A.shape[1]
    meta = _blocks(u, A, B, cfg, cfg["chunk"])
    seg = max(meta["CHUNK"], min(cfg["seg"], triton.next_power_of_2(max(l, 1))))
    parts, part_len = _time_split(cfg, u, meta["BLOCK_D"], seg)
    out = _empty_like(u)
    last = _empty(b, d, n, device=u.device, dtype=torch.float32)
    states = _empty(b, triton.cdiv(l, seg), d, n, device=u.device, dtype=torch.float32) if store_states else None
    z_, seq_ = _opt(z, u), _opt(seq_idx, u)
    nd = triton.cdiv(d, meta["BLOCK_D"])

    def launch(grid, h0_, s_hp, last_, s_l, decay, pass1, store):
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, _opt(D, u), z_, _opt(delta_bias, u), h0_, seq_, out, last_, _opt(states, last),
            decay, l, d, n, d // (B.shape[1] if B.dim() == 4 else 1), part_len,
            *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B), *_bc_strides(C),
            *z_.stride(), *out.stride(), h0_.stride(0), s_hp, *h0_.stride()[-2:],
            *(seq_.stride()[:2] if seq_idx is not None else (0, 0)), *s_l,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_H0=h0_ is not last, HAS_SEQ=seq_idx is not None, CONST_BC=B.dim() == 2, STORE_STATES=store,
            PASS1=pass1, PREFETCH=_prefetch(cfg, u), SEG=seg, **_launch_opts(cfg, meta),
        )

    if parts == 1:
        launch((nd, b, 1), _opt(h0, last), 0, last, (d * n, 0), last, False, store_states)
        return out, last, states, seg
    ends, decay = (_empty(b, parts, d, n, device=u.device, dtype=torch.float32) for _ in range(2))
    launch((nd, b, parts - 1), last, 0, ends, ends.stride()[:2], decay, True, False)
    starts = _combine_parts(ends, decay, None if h0 is None else h0.contiguous(), reverse=False)
    launch((nd, b, parts), starts, starts.stride(1), last, (d * n, 0), last, False, store_states)
    return out, last, states, seg


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, seq_idx, states, seg, dout, dlast, softplus, **overrides):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0): du, ddelta, dz contiguous in the inputs'
    dtypes, the rest fp32 with dB/dC in B's layout (the caller casts). ``overrides``: keys of BWD_CONFIG.

    With a time split (parts > 1; part_len a multiple of the forward's seg): pass 1 runs the reverse
    recurrence of g alone over parts 1..parts-1 from a zero gradient; pass 2 combines them backwards into the
    gradient arriving at every part's end; pass 3 is the ordinary backward of all parts from those."""
    cfg = _auto_tiles(_config(BWD_CONFIG, **overrides), u, _NARROW_BWD)
    u, delta, z, dout = _contiguous_if_channels_last(cfg, u, delta, z, dout)
    if _time_kernel(cfg, u, delta, z, A, seg):
        from mambakit.ops import _triton_scan_time_bwd as tb

        if dout.stride(2) != 1 and dout.shape[2] > 1:
            dout = dout.contiguous()  # e.g. out_proj's gradient (channels-last): one memory-bound copy
        return tb.scan_bwd_time(u, delta, A, B, C, D, z, delta_bias, seq_idx, states, seg, dout, dlast, softplus)
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1] if B.dim() == 4 else 1
    meta = _blocks(u, A, B, cfg, min(cfg["chunk"], seg))
    parts, part_len = _time_split(cfg, u, meta["BLOCK_D"], seg)
    dev, f32 = u.device, torch.float32
    du = _empty(b, d, l, device=dev, dtype=u.dtype)
    ddt = _empty(b, d, l, device=dev, dtype=delta.dtype)
    dz = _empty(b, d, l, device=dev, dtype=z.dtype) if z is not None else None
    const = B.dim() == 2
    bp = b * parts  # the partial sums are per (batch row, part)
    dB = _empty(bp, d, n, device=dev, dtype=f32) if const else torch.zeros(b, g, n, l, device=dev, dtype=f32)
    dC = _empty_like(dB) if const else torch.zeros_like(dB)
    dA, dh0 = (_empty(bp, d, n, device=dev, dtype=f32) for _ in range(2))
    dD, dbias = (_empty(bp, d, device=dev, dtype=f32) for _ in range(2))
    nd = triton.cdiv(d, meta["BLOCK_D"])
    scratch = _empty(bp * nd * (seg // meta["CHUNK"]) * meta["BLOCK_D"] * meta["NK"] * meta["NJ"],
                          device=dev, dtype=f32)
    z_, seq_ = _opt(z, u), _opt(seq_idx, u)
    dlast_ = dlast.to(f32).contiguous() if dlast is not None else None

    def launch(grid, part0, dl, s_gl, g_only, dh0_, decay):
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, _opt(D, u), z_, _opt(delta_bias, u), seq_, states, dout, _opt(dl, dh0), scratch,
            du, ddt, _opt(dz, du), dA, dB, dC, dD, dbias, dh0_, decay,
            l, d, n, d // g, g, part_len, part0, parts,
            *u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B), *_bc_strides(C),
            *z_.stride(), *dout.stride(), *(seq_.stride()[:2] if seq_idx is not None else (0, 0)), *s_gl,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_DLAST=dl is not None, HAS_SEQ=seq_idx is not None, CONST_BC=const, G_ONLY=g_only, SEG=seg,
            **_launch_opts(cfg, meta),
        )

    if parts == 1:
        launch((nd, b, 1), 0, dlast_, (d * n, 0), False, dh0, dh0)
    else:
        g_end, decay = (_empty(b, parts, d, n, device=dev, dtype=f32) for _ in range(2))
        launch((nd, b, parts - 1), 1, None, (0, 0), True, g_end, decay)
        g_in = _combine_parts(g_end, decay, dlast_, reverse=True)
        launch((nd, b, parts), 0, g_in, g_in.stride()[:2], False, dh0, dh0)
    dh0 = dh0.view(b, parts, d, n)[:, 0]
    if const:
        dB, dC = dB.sum(0), dC.sum(0)
    elif B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return du, ddt, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0
