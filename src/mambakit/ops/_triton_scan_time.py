"""Time-parallel Triton forward of the Mamba-1 selective scan (imported lazily: needs Triton).

The kernels of ``_triton_selective_scan.py`` put channels on the GPU's lanes and walk time inside each thread;
that walk is latency-bound. Here lanes run along time, as in the official CUDA kernel. Two kernels:

- ``_scan_time_fwd_kt_kernel`` (the default, config steps = K > 0): one channel of one batch row per program,
  walking the sequence in chunks of T * K steps held as a (T, K) tile: row i (one thread) owns the K
  contiguous steps i K .. i K + K - 1, which it loads with one 16-byte access per tensor (K = 8 in bf16). Per
  state n (a static loop over the constexpr NSTATE): dA = exp(dt A_n), dBu = dt u B_n, the scan along K
  inside the thread (first-order-recurrence combine), the scan of the T row aggregates across lanes, the
  exclusive row prefix from the previous lane (``tl.gather``), then h = hs + cumprod(dA) prefix and
  y += h C_n. With config agg (the default) a row's aggregates come first (its decay exp2(A_n sum(dt)), its
  state from zero) and, after the lane scan, each row walks its steps again from its true incoming state.
  The state carried between chunks lives in ``last`` (every lane stores and reloads the same
  value); the next state's loads are issued before this state's stores (prefetch), since the compiler cannot
  move them above stores it does not know to be disjoint.
- ``_scan_time_fwd_kernel`` (steps = None): BLOCK_D channels a program as a (BLOCK_D, CHUNK) tile spread over
  lanes and warps along time, ``tl.associative_scan`` over the whole chunk, the carried state in a (BLOCK_D,
  NP) register tensor. The previous default.

Measured on an H200 (notes/gpu_run6, bf16, n 16, do_bench medians): b4 d3072 l4096 fwd 0.70 ms with the
default (K 8, T 32: one warp a program, 256-step chunks, maxnreg 128; 1.05 ms without the prefetch; 0.89 ms
without maxnreg, which ptxas then gives 168 registers: 12 warps an SM instead of 16; T 64 0.92, K 16 1.05,
K 4 1.10); the tile kernel 1.04 ms. b1 d3072 l65536: 3.46 ms (T 64 4.30, tile kernel 5.0).
Tried and dropped (notes/gpu_run9): 2 channels a program sharing the B/C tile loads and their widening to
fp32 ((2, T, K) tiles): b4 1.25-1.44 ms against 0.706, b1 5.3-6.5 against 3.44 (the doubled tiles do not fit
the registers of 16 warps an SM); maxnreg 80 at b1 (one wave of 3072 programs instead of 1.45) 3.43 against
3.55 in the same run, within the spread, 96 4.77; maxnreg 96 at b4 0.80.

Needs u, delta and z contiguous along time (stride 1 along l): the dispatcher in ``_triton_selective_scan``
sends channels-last inputs to the channel-parallel kernel. The saved states (for the backward) are the state
before every chunk, in the format of ``_triton_selective_scan.scan_fwd`` with seg = CHUNK.

All offsets that scale with batch, channels or time are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops import _triton_selective_scan as _k
from mambakit.ops._triton_selective_scan import _recurrence_combine, _seq_reset, _softplus
from mambakit.ops.causal_conv1d import _join8, _split8
from mambakit.ops.dispatch import num_sms

# steps: K > 0 runs the (T, K) kernel _scan_time_fwd_kt_kernel with K steps a row and T = rows (None: 32
# num_warps) rows, T / 32 warps (at least 1), chunks of T K steps, block_d must be 1; prefetch: its loads of the
# next state ahead of this state's stores. steps None runs the (BLOCK_D, CHUNK) tile kernel: chunk, steps per
# program iteration; num_warps, warps a program (chunk / (32 num_warps) steps a thread); block_d, channels a
# program. max_n: larger d_state goes to the channel-parallel kernel (the state loop is unrolled: only
# d_state <= 16, Mamba-1's default, was measured on a GPU). num_stages, maxnreg: Triton's launch options.
# seg ((T, K) kernel): steps between the states saved for the backward, steps times a power of two, at most
# the chunk (None: BUSY_SEG on a busy grid, see below, else the chunk); a smaller seg lets the backward run
# smaller chunks. even ((T, K) kernel): lengths that are a multiple of the chunk load and store without masks;
# pairs (with even): bf16 B and C per step are read as int32 pairs and widened with one shift or mask an element.
# bc_f32 ((T, K) kernel): 16-bit B and C per step are widened to fp32 once before the launch (2 x b n l x 4 bytes),
# so that the d programs a batch row load fp32 instead of each widening them on the integer pipe (offline SASS
# 2688 -> 2488 instructions, SHF + LOP3 321 -> 71, but a 56-byte stack); H200 (notes/gpu_run11/call1) b4 0.795
# against 0.696, b1 3.956 against 3.445: off.
# ahead ((T, K) kernel): the next chunk's u and delta, and this chunk's z, loaded `ahead` states before the end
# of the state loop instead of at the chunk's start. Nsight Compute (gpu_run10/call2) put 28% of the forward's
# long-scoreboard stall samples (7% of all) on the first use of a chunk's u / delta. Offline SASS unchanged
# (2688 / 2696, 16-byte stack); H200, same process (gpu_run11/call3, outputs bit-identical): b4 default 0.695,
# ahead 1 0.743, 2 0.746, 4 0.662, 8 0.666, 16 (at state 0) 0.703; b1 3.443 / 3.739 / 3.784 / 3.289 / 3.279 /
# 3.481, hence 4.
# agg (K = 8): a row's aggregates first (its decay exp2(A_n sum(dt)), its state from zero), the lane scan, then
# one exact pass over the row's steps from its true incoming state (no cumulative dA, no fix-up, no masked sums).
# Offline SASS (scripts/sass_count.py mamba1-fwd, sm_90, b4 d3072 l4096): 2992 instructions -> 2912 with even
# -> 2776 with even + pairs; agg 2888, agg + even + pairs 2688. H200, bf16, fwd ms, each row one process
# (notes/gpu_run10): call1 default 0.704 / even 0.736 / even + pairs 0.693 at b4, 3.358 / 3.708 / 3.422 at b1;
# call3 default 0.715 / agg 0.704 / agg + even + pairs 0.693 at b4, 3.566 / 3.473 / 3.462 at b1 (fwd+bwd b4
# 4.723 / 4.814 / 4.695, the backward unchanged), hence all three on. Nsight Compute of the former default at b4
# (call2): 69% of issue slots busy (IPC 2.77), 16 warps an SM (128 registers), stalls long scoreboard 27% (B/C
# loads a state ahead), the ALU pipe (bf16 widening, selects) the busiest at 45%.
# ahead2 ((T, K) kernel, whole chunks of bf16 B / C pairs; not yet timed, off): A and the B / C pairs loaded
# raw two states ahead (cyclically into the next chunk) and widened at their use, instead of one state ahead
# and widened at once. ptxas sinks each load down to the next store (the state's carry), so a load issued one
# state ahead lands just before its use (offline SASS: 128-bit loads a median 109 instructions before their
# first consumer, scalar loads 41); two states ahead, 198 and 99. 2696 -> 2704 instructions, the 16-byte stack
# gone (the prefetched state is held as pairs, 8 registers instead of 16). Tested through the interpreter.
FWD_TIME_CONFIG = dict(steps=8, rows=32, prefetch=True, maxnreg=128, seg=None, chunk=512, num_warps=1, block_d=1,
                       num_stages=None, max_n=16, even=True, pairs=True, agg=True, bc_f32=False,
                       ahead=4, ahead2=False)
# Busy grids (b * d >= BUSY_CHANNELS_PER_SM channels an SM): the forward saves a state every BUSY_SEG steps and
# the backward (BWD_TIME_CONFIG block_d None) runs 4 channels of 64-step chunks in one warp, its dB/dC summed
# over them before the atomics. H200, bf16, n 16, fwd+bwd ms (notes/gpu_run8): b4 d3072 l4096 (93 channels an
# SM) 4.939 / 4.940 -> 4.652 / 4.658 (2 channels, seg 128: 4.767; 8 channels, seg 32: 6.55), but b1 d3072
# l65536 (23 an SM, 768 programs of 4 channels) 19.9 -> 24.0, hence the threshold; the forward is unchanged
# (0.70 ms) and its saved states take 4x the memory (50 MB at b4 d3072 l4096).
BUSY_CHANNELS_PER_SM = 64
BUSY_SEG = 64


def busy_grid(batch: int, dim: int, device) -> bool:
    """Whether a scan over batch x dim channels takes the busy-grid plan above."""
    return batch * dim >= BUSY_CHANNELS_PER_SM * num_sms(device)


@triton.jit
def _tile_index(DIM, NSTATE, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, NP: tl.constexpr):
    """Of a program of grid (channel blocks, b): pid_d, pid_b (int64), its channels (BLOCK_D,) with their mask
    and int64 copy, the step and state offsets (CHUNK,), (NP,), and the (BLOCK_D, NP) state mask."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, NP)
    mask_s = mask_d[:, None] & (offs_n < NSTATE)[None, :]
    return pid_d, pid_b, offs_d, mask_d, offs_d.to(tl.int64), tl.arange(0, CHUNK), offs_n, mask_s


@triton.jit
def _load_dt(u_base, dt_base, t, m2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, x (delta + bias) and dt = softplus(x) of a (BLOCK_D, CHUNK) tile at steps t, fp32; dt is 0 at masked
    steps (past the end: dA = 1, dBu = 0, so the state and its gradient pass through)."""
    u = tl.load(u_base + t[None, :], mask=m2, other=0.0).to(tl.float32)
    x = tl.load(dt_base + t[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += bias[:, None]
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    return u, x, tl.where(m2, dt, 0.0)


@triton.jit
def _scan_time_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr, out_ptr, last_ptr, states_ptr,
    L, DIM, DIM_PER_GROUP,
    s_ub, s_ud, s_dtb, s_dtd, s_Ad, s_An, s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_zb, s_zd, s_ob, s_od, s_hb, s_hd, s_hn, s_sb, s_sl,
    NSTATE: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr, STORE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (channel blocks, b). u, delta, z, out: stride 1 along time. B/C: (d, n) when CONST_BC (s_Bx the
    channel stride), else (b, g, n, l) with s_Bx the group stride (a program never straddles two groups).
    h0, last: (b, d, n); states: (b, cdiv(L, CHUNK), d, n) contiguous, the state before every chunk."""
    pid_d, pid_b, offs_d, mask_d, d64, offs_t, offs_n, mask_s = _tile_index(DIM, NSTATE, BLOCK_D, CHUNK, NP)
    st_off = d64[:, None] * NSTATE + offs_n[None, :]
    LOG2E: tl.constexpr = 1.4426950408889634
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    Dv = bias
    if HAS_D:
        Dv = tl.load(D_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    if CONST_BC:
        B_base = B_ptr + d64 * s_Bx  # (BLOCK_D,)
        C_base = C_ptr + d64 * s_Cx
    else:
        group = ((pid_d * BLOCK_D) // DIM_PER_GROUP).to(tl.int64)
        B_base = B_ptr + pid_b * s_Bb + group * s_Bx  # scalar
        C_base = C_ptr + pid_b * s_Cb + group * s_Cx
    u_base = u_ptr + pid_b * s_ub + d64[:, None] * s_ud
    dt_base = dt_ptr + pid_b * s_dtb + d64[:, None] * s_dtd
    z_base = z_ptr + pid_b * s_zb + d64[:, None] * s_zd
    o_base = out_ptr + pid_b * s_ob + d64[:, None] * s_od
    seq_base = seq_ptr + pid_b * s_sb
    if HAS_H0:
        H = tl.load(h0_ptr + pid_b * s_hb + d64[:, None] * s_hd + offs_n[None, :] * s_hn, mask=mask_s,
                    other=0.0).to(tl.float32)
    else:
        H = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    st_ptr = states_ptr + pid_b * tl.cdiv(L, CHUNK) * DIM * NSTATE + st_off
    last_t = (offs_t == CHUNK - 1)[None, :]
    for c in range(pid_b * 0, tl.cdiv(L, CHUNK)):  # int64 chunk index: t = c * CHUNK needs no cast
        t = c * CHUNK + offs_t
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        if STORE_STATES:
            tl.store(st_ptr + c * (DIM * NSTATE), H, mask=mask_s)
        u, _, dt = _load_dt(u_base, dt_base, t, m2, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        if HAS_D:
            y = Dv[:, None] * u
        if HAS_SEQ:
            reset = _seq_reset(seq_base, t, mask_t, s_sl)[None, :]
        H_next = H
        for n in tl.static_range(NSTATE):
            a_n = tl.load(A_ptr + d64 * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32) * LOG2E
            if CONST_BC:
                B_n = tl.load(B_base + n * s_Bn, mask=mask_d, other=0.0).to(tl.float32)[:, None]
                C_n = tl.load(C_base + n * s_Cn, mask=mask_d, other=0.0).to(tl.float32)[:, None]
            else:
                B_n = tl.load(B_base + n * s_Bn + t * s_Bl, mask=mask_t, other=0.0).to(tl.float32)[None, :]
                C_n = tl.load(C_base + n * s_Cn + t * s_Cl, mask=mask_t, other=0.0).to(tl.float32)[None, :]
            dA = tl.exp2(dt * a_n[:, None])
            if HAS_SEQ:
                dA = tl.where(reset, 0.0, dA)
            cA, hs = tl.associative_scan((dA, dtu * B_n), 1, _recurrence_combine)
            h_start = tl.sum(tl.where(offs_n[None, :] == n, H, 0.0), axis=1)
            h = hs + cA * h_start[:, None]
            y += h * C_n
            h_end = tl.sum(tl.where(last_t, h, 0.0), axis=1)
            H_next = tl.where(offs_n[None, :] == n, h_end[:, None], H_next)
        H = H_next
        if HAS_Z:
            zv = tl.load(z_base + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(o_base + t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + pid_b * DIM * NSTATE + st_off, H, mask=mask_s)


@triton.jit
def _ld(ptrs, m2, EVEN: tl.constexpr):
    """tl.load of a chunk's tile: masked past the sequence's end, unless EVEN (the length is a multiple of the
    chunk, so no step is past it)."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=m2, other=0.0)


@triton.jit
def _kt_chunk_in(u_base, dt_base, t, L, EVEN: tl.constexpr):
    """A chunk's u and delta at steps t, as loaded (``_ld``: masked past L unless EVEN)."""
    return _ld(u_base + t, t < L, EVEN), _ld(dt_base + t, t < L, EVEN)


@triton.jit
def _bf16_pairs(ptrs, T: tl.constexpr, K: tl.constexpr, DB: tl.constexpr = 0):
    """A (T, K) bf16 tile ((DB, T, K) with DB > 0) read as (T, K / 2) int32 pairs (4-byte aligned pointers),
    widened to fp32 with one shift or mask per element: the low half is the even step, the high half the odd."""
    return _widen_pairs(tl.load(ptrs), T, K, DB)


@triton.jit
def _widen_pairs(v, T: tl.constexpr, K: tl.constexpr, DB: tl.constexpr = 0):
    """Loaded (T, K / 2) int32 pairs of bf16 ((DB, T, K / 2) with DB > 0) as a (T, K) fp32 tile, one shift or
    mask per element: the low half is the even step, the high half the odd."""
    lo = (v << 16).to(tl.float32, bitcast=True)
    hi = (v & -65536).to(tl.float32, bitcast=True)
    if DB > 0:
        tile = tl.reshape(tl.join(lo, hi), (DB, T, K))
    else:
        tile = tl.reshape(tl.join(lo, hi), (T, K))
    return tile


@triton.jit
def _pair_ptrs(base, c, rows, T: tl.constexpr, K: tl.constexpr):
    """The (T, K / 2) int32 pointers of chunk c's bf16 pairs in state 0's row at base (whole chunks)."""
    tp = c * (T * K // 2) + rows[:, None] * (K // 2) + tl.arange(0, K // 2)[None, :]
    return base.to(tl.pointer_type(tl.int32)) + tp


@triton.jit
def _kt_bc(n, B_base, C_base, t, m2, s_Bn, s_Bl, s_Cn, s_Cl, CONST_BC: tl.constexpr, EVEN: tl.constexpr = False,
           PAIRS: tl.constexpr = False, T: tl.constexpr = 1, K: tl.constexpr = 1, DB: tl.constexpr = 0):
    """B_n, C_n of a chunk in B's and C's dtypes (fp32 with PAIRS: bf16 read as int32 pairs, T x K tiles):
    tiles at steps t, or B_base / C_base's shape when constant (B_base, C_base then point at the channel's row
    of (d, n))."""
    if CONST_BC:
        B_n, C_n = tl.load(B_base + n * s_Bn), tl.load(C_base + n * s_Cn)
    elif PAIRS:  # B_base, C_base: the int32 pointers of the chunk's pairs of state 0
        B_n, C_n = _bf16_pairs(B_base + n * (s_Bn // 2), T, K, DB), _bf16_pairs(C_base + n * (s_Cn // 2), T, K, DB)
    else:
        B_n, C_n = _ld(B_base + n * s_Bn + t * s_Bl, m2, EVEN), _ld(C_base + n * s_Cn + t * s_Cl, m2, EVEN)
    return B_n, C_n


@triton.jit
def _kt_state_in(n, A_ptr, B_base, C_base, carry, d64, t, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl,
                 CONST_BC: tl.constexpr, EVEN: tl.constexpr = False, PAIRS: tl.constexpr = False,
                 T: tl.constexpr = 1, K: tl.constexpr = 1, LOAD_ABC: tl.constexpr = True):
    """What state n of a chunk loads: A[d, n] log2(e), B_n, C_n (``_kt_bc``) and the carried state (without
    LOAD_ABC only the carried state, and 0.0 placeholders: AHEAD2 loads the others two states ahead)."""
    a_n = 0.0
    B_n = 0.0
    C_n = 0.0
    if LOAD_ABC:
        a_n = tl.load(A_ptr + d64 * s_Ad + n * s_An).to(tl.float32) * 1.4426950408889634
        B_n, C_n = _kt_bc(n, B_base, C_base, t, m2, s_Bn, s_Bl, s_Cn, s_Cl, CONST_BC, EVEN, PAIRS, T, K)
    return a_n, B_n, C_n, tl.load(carry + n)


@triton.jit
def _kt_abc_raw(m: tl.constexpr, c, n_chunks, A_ptr, B_base, C_base, d64, rows, s_Ad, s_An, s_Bn, s_Cn,
                NSTATE: tl.constexpr, T: tl.constexpr, K: tl.constexpr):
    """AHEAD2: A[d, n] and the int32 pairs of B_n, C_n, as loaded (widened at the use), of the state m states
    after state 0 of chunk c: state m % NSTATE of chunk c + m // NSTATE (the last chunk's again past the end,
    unused)."""
    cc = tl.minimum(c + m // NSTATE, n_chunks - 1)
    n: tl.constexpr = m % NSTATE
    Bp = _pair_ptrs(B_base, cc, rows, T, K) + n * (s_Bn // 2)
    Cp = _pair_ptrs(C_base, cc, rows, T, K) + n * (s_Cn // 2)
    return tl.load(A_ptr + d64 * s_Ad + n * s_An), tl.load(Bp), tl.load(Cp)


@triton.jit
def _cols8(t, T: tl.constexpr):
    """The 8 columns (T,) of a (T, 8) tile whose rows each sit in one thread (free register renames)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(t, T, 8)
    return (tl.reshape(c0, (T,)), tl.reshape(c1, (T,)), tl.reshape(c2, (T,)), tl.reshape(c3, (T,)),
            tl.reshape(c4, (T,)), tl.reshape(c5, (T,)), tl.reshape(c6, (T,)), tl.reshape(c7, (T,)))


@triton.jit
def _uncols8(t0, t1, t2, t3, t4, t5, t6, t7, T: tl.constexpr):
    """Inverse of _cols8: 8 columns (T,) -> the (T, 8) tile."""
    return _join8(t0[:, None], t1[:, None], t2[:, None], t3[:, None], t4[:, None], t5[:, None], t6[:, None],
                  t7[:, None], T, 8)


@triton.jit
def _walk2(h, a0, b0, c0, y0, a1, b1, c1, y1):
    """Two steps of h_t = a_t h_{t-1} + b_t from h, each adding h_t c_t to its column of y."""
    h = a0 * h + b0
    y0 += h * c0
    h = a1 * h + b1
    return h, y0, y1 + h * c1


@triton.jit
def _kt_scans(dA, dBu, last_col, AX: tl.constexpr):
    """The two scans of h_t = dA_t h_{t-1} + dBu_t over a chunk of (..., T, K) tiles whose last axis AX runs
    along a row's K steps and axis AX - 1 along the T rows: along K inside each thread from a zero state
    (cumulative dA, partial states), then of the row aggregates across lanes (pa, pb: the state after each
    row is pb + pa h_start, with h_start the state before the chunk)."""
    cA, hs = tl.associative_scan((dA, dBu), AX, _recurrence_combine)
    ra = tl.sum(tl.where(last_col, cA, 0.0), axis=AX)  # each row's aggregate
    rb = tl.sum(tl.where(last_col, hs, 0.0), axis=AX)
    pa, pb = tl.associative_scan((ra, rb), AX - 1, _recurrence_combine)
    return cA, hs, pa, pb


@triton.jit
def _scan_time_fwd_kt_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr, out_ptr, last_ptr, states_ptr,
    L, DIM, DIM_PER_GROUP,
    s_ub, s_ud, s_dtb, s_dtd, s_Ad, s_An, s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_zb, s_zd, s_ob, s_od, s_hb, s_hd, s_hn, s_sb, s_sl,
    NSTATE: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr, STORE_STATES: tl.constexpr,
    T: tl.constexpr, K: tl.constexpr, PREFETCH: tl.constexpr, SEG_ROWS: tl.constexpr, EVEN: tl.constexpr = False,
    PAIRS: tl.constexpr = False, AGG: tl.constexpr = False, AHEAD: tl.constexpr = 0, AHEAD2: tl.constexpr = False,
):
    """One channel per program, grid (d, b), chunks of T * K steps as a (T, K) tile: row i (one thread when
    T = 32 num_warps and K elements fill a 16-byte load) holds the K contiguous steps i K .. i K + K - 1.
    Per state: the scan along K (inside a thread), the scan of the T row aggregates (across lanes), the
    exclusive row prefix by ``tl.gather`` from the previous row, then h = hs + cumprod(dA) prefix.

    The state carried from chunk to chunk lives in last (b, d, n) fp32: every lane stores the same value and
    reads back its own store (uniform loads, no barrier). Those stores would keep the compiler from moving the
    next state's loads above them (it cannot tell that B and C do not alias last), so with PREFETCH state
    n + 1's loads are issued in program order before state n's work. Arguments as ``_scan_time_fwd_kernel``'s
    (BLOCK_D = 1).

    AGG (K = 8): the aggregates first, then one exact pass. A row's decay is exp2(A_n sum(dt)) (the row sum of
    dt is shared by the states), its state from zero a 7-FMA walk of its columns; after the lane scan of the
    row aggregates each row walks its 8 steps again from its true incoming state, so h and y come from one
    FMA each a step: no cumulative product of dA, no per-step fix-up, no masked row sums.

    AHEAD > 0: the next chunk's u and delta (as loaded, 16-bit in bf16) are loaded AHEAD states before the
    end of this chunk's state loop (the last chunk reloads itself), and this chunk's z at the same point
    instead of at its start, so that a chunk does not begin by waiting for memory and z is not held through
    the loop."""
    CHUNK: tl.constexpr = T * K
    d64 = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, T)
    cols = tl.arange(0, K)
    offs = rows[:, None] * K + cols[None, :]  # (T, K) step inside the chunk
    last_col = (cols == K - 1)[None, :]
    prev_row = tl.maximum(rows - 1, 0)
    first_row = rows == 0
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d64).to(tl.float32)
    if CONST_BC:
        B_base = B_ptr + d64 * s_Bx
        C_base = C_ptr + d64 * s_Cx
    else:
        group = (d64 // DIM_PER_GROUP).to(tl.int64)
        B_base = B_ptr + pid_b * s_Bb + group * s_Bx
        C_base = C_ptr + pid_b * s_Cb + group * s_Cx
    u_base = u_ptr + pid_b * s_ub + d64 * s_ud
    dt_base = dt_ptr + pid_b * s_dtb + d64 * s_dtd
    z_base = z_ptr + pid_b * s_zb + d64 * s_zd
    o_base = out_ptr + pid_b * s_ob + d64 * s_od
    seq_base = seq_ptr + pid_b * s_sb
    carry = last_ptr + pid_b * DIM * NSTATE + d64 * NSTATE + rows * 0  # (T,) all equal
    for n in tl.static_range(NSTATE):
        h_init = tl.zeros([T], dtype=tl.float32)
        if HAS_H0:
            h_init = tl.load(h0_ptr + pid_b * s_hb + d64 * s_hd + n * s_hn + rows * 0).to(tl.float32)
        tl.store(carry + n, h_init)
    SEG: tl.constexpr = SEG_ROWS * K  # steps between saved states (the state before every SEG_ROWS-th row)
    st_ptr = states_ptr + pid_b * tl.cdiv(L, SEG) * DIM * NSTATE + d64 * NSTATE + rows * 0
    n_chunks = tl.cdiv(L, CHUNK)
    if AHEAD2:  # A and B / C pairs of states 0 and 1 (the state loop loads each state's two states ahead)
        A_r0, B_r0, C_r0 = _kt_abc_raw(0, 0, n_chunks, A_ptr, B_base, C_base, d64, rows, s_Ad, s_An, s_Bn, s_Cn,
                                       NSTATE, T, K)
        A_r1, B_r1, C_r1 = _kt_abc_raw(1, 0, n_chunks, A_ptr, B_base, C_base, d64, rows, s_Ad, s_An, s_Bn, s_Cn,
                                       NSTATE, T, K)
    if AHEAD > 0:  # chunk 0's u and delta, as loaded (the loop loads each next chunk's)
        u_raw, x_raw = _kt_chunk_in(u_base, dt_base, offs, L, EVEN)
    for c in range(pid_b * 0, n_chunks):
        t = c * CHUNK + offs
        m2 = t < L
        Bq = B_base
        Cq = C_base
        if PAIRS:  # the chunk's bf16 B / C as int32 pairs, (T, K / 2) pointers of state 0
            Bq = _pair_ptrs(B_base, c, rows, T, K)
            Cq = _pair_ptrs(C_base, c, rows, T, K)
        if AHEAD == 0:
            u_raw, x_raw = _kt_chunk_in(u_base, dt_base, t, L, EVEN)
            if HAS_Z:
                zv = _ld(z_base + t, m2, EVEN).to(tl.float32)
        u = u_raw.to(tl.float32)
        x = x_raw.to(tl.float32)
        if HAS_SEQ:
            reset = _seq_reset(seq_base, t, m2, s_sl)
        if PREFETCH:
            a_n, B_n, C_n, h_start = _kt_state_in(0, A_ptr, Bq, Cq, carry, d64, t, m2, s_Ad, s_An, s_Bn,
                                                  s_Bl, s_Cn, s_Cl, CONST_BC, EVEN, PAIRS, T, K, not AHEAD2)
        if HAS_BIAS:
            x += bias
        dt = x
        if SOFTPLUS:
            dt = _softplus(x)
        if not EVEN:
            dt = tl.where(m2, dt, 0.0)
        dtu = dt * u
        y = tl.zeros([T, K], dtype=tl.float32)
        if HAS_D:
            y = Dv * u
        if AGG:  # columns (T,) of the chunk: y, dt's row sums, and (with seq_idx) which rows hold a reset
            y0, y1, y2, y3, y4, y5, y6, y7 = _cols8(y, T)
            q0, q1, q2, q3, q4, q5, q6, q7 = _cols8(dt, T)
            sdt = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
            if HAS_SEQ:
                r0, r1, r2, r3, r4, r5, r6, r7 = _cols8(reset.to(tl.int32), T)
                row_reset = (((r0 | r1) | (r2 | r3)) | ((r4 | r5) | (r6 | r7))) != 0
        for n in tl.static_range(NSTATE):
            if AHEAD > 0:
                if n == max(0, NSTATE - AHEAD):  # the next chunk's u, delta (the last reloads its own) and z
                    u_raw, x_raw = _kt_chunk_in(u_base, dt_base, tl.minimum(c + 1, n_chunks - 1) * CHUNK + offs,
                                                L, EVEN)
                    if HAS_Z:
                        z_raw = _ld(z_base + t, m2, EVEN)
            if PREFETCH:
                if n + 1 < NSTATE:  # the next state's loads, before this state's stores
                    a_nx, B_nx, C_nx, h_nx = _kt_state_in(n + 1, A_ptr, Bq, Cq, carry, d64, t, m2, s_Ad,
                                                          s_An, s_Bn, s_Bl, s_Cn, s_Cl, CONST_BC, EVEN, PAIRS, T, K,
                                                          not AHEAD2)
            else:
                a_n, B_n, C_n, h_start = _kt_state_in(n, A_ptr, Bq, Cq, carry, d64, t, m2, s_Ad, s_An,
                                                      s_Bn, s_Bl, s_Cn, s_Cl, CONST_BC, EVEN, PAIRS, T, K, not AHEAD2)
            if AHEAD2:  # issued here, ptxas sinks a load only down to this state's carry store: a state early
                a_n = A_r0.to(tl.float32) * 1.4426950408889634
                B_n = _widen_pairs(B_r0, T, K)
                C_n = _widen_pairs(C_r0, T, K)
                A_r0, B_r0, C_r0 = A_r1, B_r1, C_r1
                A_r1, B_r1, C_r1 = _kt_abc_raw(n + 2, c, n_chunks, A_ptr, B_base, C_base, d64, rows, s_Ad, s_An,
                                               s_Bn, s_Cn, NSTATE, T, K)
            dA = tl.exp2(dt * a_n)
            if HAS_SEQ:
                dA = tl.where(reset, 0.0, dA)
            if AGG:
                a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(dA, T)
                b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(dtu * B_n.to(tl.float32), T)
                rb = a7 * (a6 * (a5 * (a4 * (a3 * (a2 * (a1 * b0 + b1) + b2) + b3) + b4) + b5) + b6) + b7
                ra = tl.exp2(sdt * a_n)  # the row's decay, prod exp2(dt a_n)
                if HAS_SEQ:
                    ra = tl.where(row_reset, 0.0, ra)
                pa, pb = tl.associative_scan((ra, rb), 0, _recurrence_combine)
            else:
                cA, hs, pa, pb = _kt_scans(dA, dtu * B_n.to(tl.float32), last_col, 1)
            if STORE_STATES:
                if SEG_ROWS == T:
                    tl.store(st_ptr + c * (DIM * NSTATE) + n, h_start, mask=first_row)
            ends = pb + pa * h_start  # (T,) the state after each row
            pre = tl.where(first_row, h_start, tl.gather(ends, prev_row, 0))
            if STORE_STATES:
                if SEG_ROWS < T:  # several saved states a chunk: the state before rows 0, SEG_ROWS, ...
                    tl.store(st_ptr + (c * (T // SEG_ROWS) + rows // SEG_ROWS) * (DIM * NSTATE) + n, pre,
                             mask=(rows % SEG_ROWS == 0) & (c * CHUNK + rows * K < L))
            if AGG:  # the row's 8 steps again from its true incoming state
                if CONST_BC:
                    cc = C_n.to(tl.float32)
                    c0, c1, c2, c3, c4, c5, c6, c7 = cc, cc, cc, cc, cc, cc, cc, cc
                else:
                    c0, c1, c2, c3, c4, c5, c6, c7 = _cols8(C_n.to(tl.float32), T)
                h, y0, y1 = _walk2(pre, a0, b0, c0, y0, a1, b1, c1, y1)
                h, y2, y3 = _walk2(h, a2, b2, c2, y2, a3, b3, c3, y3)
                h, y4, y5 = _walk2(h, a4, b4, c4, y4, a5, b5, c5, y5)
                h, y6, y7 = _walk2(h, a6, b6, c6, y6, a7, b7, c7, y7)
            else:
                h = hs + cA * pre[:, None]
                y += h * C_n.to(tl.float32)
            tl.store(carry + n, tl.gather(ends, rows * 0 + (T - 1), 0))
            if PREFETCH:
                if n + 1 < NSTATE:
                    a_n, B_n, C_n, h_start = a_nx, B_nx, C_nx, h_nx
        if AGG:
            y = _uncols8(y0, y1, y2, y3, y4, y5, y6, y7, T)
        if HAS_Z:
            if AHEAD > 0:
                zv = z_raw.to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        if EVEN:
            tl.store(o_base + t, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(o_base + t, y.to(out_ptr.dtype.element_ty), mask=m2)


def pairs_ok(B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether per-step bf16 B and C can be read as int32 pairs (config key pairs): contiguous along the
    sequence with 4-byte aligned rows."""
    return all(x.dim() >= 3 and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.data_ptr() % 4 == 0
               and all(st % 2 == 0 for st in x.stride()[:-1]) for x in (B, C))


def supports(u, delta, z, A, cfg=None) -> bool:
    """Whether the time-parallel kernel takes these inputs: u, delta, z contiguous along time (or length 1)
    and d_state at most max_n."""
    cfg = cfg or FWD_TIME_CONFIG
    along_time = all(t is None or t.shape[2] == 1 or t.stride(2) == 1 for t in (u, delta, z))
    return along_time and A.shape[1] <= cfg["max_n"]


def _launch_meta(cfg: dict, u: torch.Tensor, B: torch.Tensor) -> dict:
    d, l = u.shape[1], u.shape[2]
    if cfg.get("steps"):
        if cfg["block_d"] != 1:
            raise ValueError("selective scan: FWD_TIME_CONFIG steps (the (T, K) kernel) needs block_d=1")
        k = cfg["steps"]
        rows = cfg.get("rows") or 32 * cfg["num_warps"]
        rows = max(2, min(rows, triton.next_power_of_2(triton.cdiv(max(l, 1), k))))
        seg = cfg.get("seg") or rows * k
        if cfg.get("seg") is None and BUSY_SEG % k == 0 and rows * k > BUSY_SEG \
                and busy_grid(u.shape[0], d, u.device):
            seg = BUSY_SEG
        if seg % k or (seg // k) & (seg // k - 1):
            raise ValueError(f"selective scan: FWD_TIME_CONFIG seg={seg} must be steps={k} times a power of two")
        return _k._launch_opts(cfg, dict(T=rows, K=k, CHUNK=rows * k, num_warps=max(1, rows // 32),
                                         PREFETCH=bool(cfg.get("prefetch", True)),
                                         SEG_ROWS=max(1, min(rows, seg // k))))
    block_d = _k._group_block_d(cfg["block_d"], d, B)
    chunk = max(16, min(cfg["chunk"], triton.next_power_of_2(max(l, 1))))
    warps = max(1, min(cfg["num_warps"], chunk * block_d // 32))
    return _k._launch_opts(cfg, dict(BLOCK_D=block_d, CHUNK=chunk, num_warps=warps))


def scan_fwd_time(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, softplus, store_states, **overrides):
    """Like ``_triton_selective_scan.scan_fwd`` (out, last_state, saved states or None, steps between saved
    states) for inputs that ``supports`` accepts. ``overrides``: keys of FWD_TIME_CONFIG."""
    cfg = _k._config(FWD_TIME_CONFIG, **overrides)
    b, d, l = u.shape
    n = A.shape[1]
    if cfg.get("bc_f32") and cfg.get("steps") and B.dim() >= 3 and B.dtype != torch.float32:
        B, C = B.float(), C.float()  # widened once, not by each of the d channels' programs
    meta = _launch_meta(cfg, u, B)
    seg = meta["SEG_ROWS"] * meta["K"] if "K" in meta else meta["CHUNK"]  # steps between saved states
    out = _k._empty(b, d, l, device=u.device, dtype=u.dtype)
    last = _k._empty(b, d, n, device=u.device, dtype=torch.float32)
    states = _k._empty(b, triton.cdiv(l, seg), d, n, device=u.device, dtype=torch.float32) \
        if store_states else None
    h0_, z_, seq_ = _k._opt(h0, last), _k._opt(z, u), _k._opt(seq_idx, u)
    if "K" in meta:
        kernel, grid = _scan_time_fwd_kt_kernel, (d, b)
        meta = {k: v for k, v in meta.items() if k != "CHUNK"}
        if cfg.get("even"):  # no masks: every chunk is whole
            meta["EVEN"] = l % (meta["T"] * meta["K"]) == 0
        if cfg.get("pairs") and meta.get("EVEN") and meta["K"] % 2 == 0:
            meta["PAIRS"] = pairs_ok(B, C)
        if cfg.get("agg") and meta["K"] == 8:
            meta["AGG"] = True
        if cfg.get("ahead"):
            meta["AHEAD"] = int(cfg["ahead"])
        if cfg.get("ahead2") and meta.get("PAIRS") and B.dim() >= 3:  # whole chunks of bf16 B / C pairs only
            meta["AHEAD2"] = True
    else:
        kernel, grid = _scan_time_fwd_kernel, (triton.cdiv(d, meta["BLOCK_D"]), b)
    kernel[grid](
        u, delta, A, B, C, _k._opt(D, u), z_, _k._opt(delta_bias, u), h0_, seq_, out, last, _k._opt(states, last),
        l, d, d // (B.shape[1] if B.dim() == 4 else 1),
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *A.stride(), *_k._bc_strides(B),
        *_k._bc_strides(C), z_.stride(0), z_.stride(1), out.stride(0), out.stride(1),
        h0_.stride(0), h0_.stride(1), h0_.stride(2),
        *(seq_.stride()[:2] if seq_idx is not None else (0, 0)),
        NSTATE=n, NP=max(2, triton.next_power_of_2(n)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None, CONST_BC=B.dim() == 2, STORE_STATES=store_states,
        **meta,
    )
    return out, last, states, seg
