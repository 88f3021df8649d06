"""Time-parallel Triton backward of the Mamba-1 selective scan (imported lazily: needs Triton).

The kernels of ``_triton_selective_scan`` put channels across lanes and walk time inside each thread; these
put time across lanes, like the official CUDA kernel, and pair with a time-parallel forward that saves the
state before every chunk of seg steps. Both walk a program's chunks from the last to the first, recompute the
forward states of each chunk from its saved start state, and run the reverse recurrence
g_t = dL/dh_t = dy_t C_t + dA_{t+1} g_{t+1} (dy = dout silu(z)), per state n:
w = g (h - dt u B_n) (= g_t dA_t h_{t-1} = dL/d(dt A_n)) gives ddt += w A_n and dA[:, n] += sum_t w dt;
g B_n gives du = dt sum_n g B_n and ddt += u sum_n g B_n; h C_n gives y for dz; dB_t = g dt u, dC_t = dy h.
Packed sequences (seq_idx): dA = 0 where a new sequence starts, so no state and no gradient crosses the
boundary (w = 0 there). Past the end of the sequence dt = 0 (dA = 1, dy = 0): the gradient passes through.

Two kernels (BWD_TIME_CONFIG steps):

- ``_scan_bwd_time_kt_kernel`` (steps = K, the default 8): the layout of the (T, K) forward. DB (block_d)
  channels of one batch row per program, one warp each when T = 32, a (DB, T, K) tile per chunk of T K steps
  (chunk, default the forward's seg), row i of a channel holding the K contiguous steps i K .. i K + K - 1.
  The forward states and g come from two-level scans (in each thread along K, then the row aggregates across
  lanes); g's in-thread scan is written out column by column (``_rev_rows8``) because Triton's reverse=True
  scan also reverses the lanes (32 shuffles a state); dA_{t+1} comes from delta loaded one step later. g at
  the step after the chunk (dlast for the last chunk) is carried in dh0 and becomes dh0 = g_0 dA_0 in the
  first chunk. Per-step dB, dC are summed over the program's channels and added with relaxed fp32 atomics
  into ``copies`` partial copies (program p into copy p % copies, summed by the launcher: fewer atomics on
  one address) in a slot order that makes each 16-byte vector reduction of a warp cover 512 contiguous bytes
  (``_atomic_rows``, ``_unpermute``); with 4 channels a warp (the busy-grid plan) their sums are a
  reduce-scatter across the channels' lanes instead (``_atomic_quad``, config quad). ptxas (sm_90a, bf16,
  n 16, K 8, T 32): 255 registers, 128 bytes of stack, ~7,200 instructions a chunk (about 450 a state for 8
  steps a thread). block_d 2 with rows of 16 (one warp; the forward saving a state every 128 steps,
  FWD_TIME_CONFIG seg) halves the atomics' bytes and instructions (``_atomic_pair``) for ~7,800 instructions
  a chunk (H200, notes/gpu_run8: 4.767 ms at b4 against 4.652 with 4 channels).
- ``_scan_bwd_time_kernel`` (steps = None; the previous default): BLOCK_D channels a program as a
  (BLOCK_D, CHUNK) tile over lanes and warps along time, ``tl.associative_scan`` over the whole chunk, g's
  reverse scan on triples (dA of the segment's first step, product of its other dA, value;
  ``_reverse_combine``) instead of a shift by one lane, the carries of all states in a (BLOCK_D, NP) register
  tile, the states in a run-time loop (``_state_grad``; unrolled with the unroll key). Its per-step dB, dC are
  summed over BLOCK_D channels before the atomics.

Constant B/C ((d, n)): per-channel sums in registers, written once per program as (b, d, n) partials that the
launcher sums over b (like dA, dD, ddelta_bias).

Config (BWD_TIME_CONFIG, overridable per call, so that variants can be timed on a GPU):
- steps: K (a power of two) for the (T, K) kernel, None for the tile kernel; prefetch: the (T, K) kernel
  issues the next state's loads before this state's stores (the compiler cannot move them across stores it
  does not know to be disjoint); copies: partial copies of per-step dB/dC, capped at ~128 MB for the two;
- block_d: channels per program (a power of two; halved until it divides d and d / ngroups);
- chunk: steps per chunk (None or less than the forward's seg: seg); a power of two and a multiple of seg,
  capped at the sequence length rounded up to a power of two (not below seg);
- num_warps: None gives block_d T / 32 for the (T, K) kernel, T * block_d / 256 for the tile kernel (8
  elements of a tile per thread), between 1 and 16;
- unroll (tile kernel): False runs the states in a run-time loop; True unrolls it, which spills: ptxas for
  sm_90, bf16, n = 16, chunk 1024, block_d 1, 4 warps gives 255 registers + 592 bytes of stack unrolled,
  255 + 8 as a loop;
- a_ahead ((T, K) kernel): 1 loads A[:, n] one state ahead with B and C, 2 two states ahead (see below);
- num_stages, maxnreg: Triton's launch options (None: its default).

All offsets that scale with batch, channels or time are int64. Everything inside is fp32 (bf16/fp16 loads
are cast). u, delta, z and dout must have stride 1 along the sequence (any batch and channel strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops import _triton_selective_scan as k
from mambakit.ops._triton_scan_time import _kt_bc, _kt_scans, _load_dt, _tile_index, busy_grid, pairs_ok
from mambakit.ops._triton_selective_scan import _recurrence_combine, _reverse_combine, _seq_reset, _softplus
from mambakit.ops.causal_conv1d import _join8, _split8

# Measured on an H200 (bf16, n 16, b4 d3072 l4096 fwd+bwd with the (T, K) forward, do_bench medians):
# notes/gpu_run7/call3: the (T, K) backward with these defaults 4.93 ms, the tile backward (steps None, chunk
# 512, maxnreg 128, the previous default) 5.62; block_d 2: 7.12, block_d 4: 7.44 (the cross-warp sums and
# layout changes cost more than the halved atomics save); b1 d3072 l65536 20.0 ms (block_d 2: 28.0).
# notes/gpu_run7/call2 (before the slot order): copies 1 6.70, 4 5.65, 16 5.31, 64 5.21; maxnreg 128 with
# 16 copies 6.38, 168 5.36; constant B/C (no per-step atomics) 2.93 (call1): the atomics are the main cost.
# block_d None: 1, or on a busy grid (_triton_scan_time.busy_grid) with the forward's seg of 64 or 128 steps
# and no chunk set, as many channels as fill one warp with rows of `steps` (4 at seg 64, 2 at seg 128).
# shift_da ((T, K) kernel, steps 8): dA_{t+1} of g's reverse scan taken from dA shifted by one step (in-thread
# columns, one lane gather for each row's last step, delta after the chunk for the last row) instead of a
# second exp2 of delta loaded one step later; pairs ((T, K) kernel, lengths a multiple of the chunk): bf16 B
# and C read as int32 pairs (as the forward's). H200 (notes/gpu_run10/call1): shift_da 4.768, shift_da + pairs
# 4.906 against 4.655, so both are off.
# quad ((T, K) kernel, 4 channels of 8-step rows: the busy-grid plan): their dB/dC summed by a reduce-scatter
# (``_atomic_quad``: each lane ends with 2 distinct steps, one 8-byte vector reduction) instead of a sum over
# the channel axis followed by a shared-memory layout change for ``_atomic_rows``. Offline SASS 8024 -> 7784
# instructions, BAR / STS / LDSM 64 each -> 0, FSEL 236 -> 620, REDG 64 -> 32. H200, b4 d3072 l4096 fwd+bwd,
# same process (notes/gpu_run11/call4): 4.638 -> 4.468 ms (-3.7%; gradients within the atomics' order noise,
# 2.1e-5 against 3.1e-5 between two default runs), with pairs 4.522: on. quad "bfly" (``_atomic_quad_bfly``):
# the same reduce-scatter by pair sums over one channel bit, since Triton lowers _atomic_quad's tl.gather via
# lane permutations into and out of its own layout (SHFL.IDX 564 of the 874 shuffles): offline 7784 -> 7448
# instructions, SHFL 874 -> 746, FSEL 620 -> 236; H200 (notes/gpu_run12/call1) 4.616 against 4.534: off.
# ahead ((T, K) kernel, not with shift_da): as the forward's (-4.7% there), the next chunk's u, delta, delta
# one step later, dout and z loaded `ahead` states before the end of the state loop instead of at the chunk's
# start. Offline (ahead 4): 7784 -> 8000 instructions and a 40 -> 176-byte stack (at 255 registers the
# prefetched tiles spill). H200, b4 d3072 l4096 fwd+bwd, same process (notes/gpu_run12/call1): 4.534 -> 4.202
# ms (-7.3%; quad bfly 4.616, bfly + ahead 4 4.511); call2: 4.158 against ahead 0 4.457 and ahead 8 4.275;
# call3: b1 d3072 l65536 (one channel a warp) 19.06 against ahead 0 19.86. ahead 4 is the default.
# Measured, slower, and then removed (their code is in commit 81caf05; notes/gpu_run12, b4 fwd+bwd against the
# default of the same process):
# - prefetch 2 (the next chunk's first state loaded at the last state, so that no chunk starts on a wait for
#   its saved state; offline 8000 -> 8120 instructions, a 216-byte stack): 4.296 against 4.158;
# - a_evict "evict_last" (call2's Nsight Compute profile: 10% of the stall samples wait on the loads of A,
#   which ptxas sinks to 44-160 instructions before their use, and which seem not to hit L1): 4.225 against 4.161;
# - a_lanes (A of a channel held over its row lanes, loaded once, one lane sum a state: offline 8320
#   instructions, a 408-byte stack): 5.051 against 4.161;
# - quad False (with ahead 4): 4.889 against 4.161.
# Next, not timed (off): a_ahead 2. The SASS shows where ptxas puts the prefetched loads: it sinks each one down
# to the end of the basic block it is issued in (just before the state's carry store and the atomics' branches),
# so a load issued one state ahead lands 60-180 instructions before its use. Issued two states ahead (A of state
# n + 2 at state n, cyclically: A does not depend on the chunk), it lands 370-510 before, for 8 more
# instructions (8000 -> 8008) and a 176 -> 184-byte stack. Tested through the interpreter.
# Also measured and kept at the default (gpu_run11/call1-2): maxnreg 224 / 192 5.198 / 5.68 against 4.68
# (spilling to local memory at 255 registers beats more warps); block_d 8 / 16 / 32 (cross-warp sums) 7.16 /
# 7.75 / 8.55 against 4.637.
BWD_TIME_CONFIG = dict(steps=8, prefetch=True, copies=64, block_d=None, chunk=None, num_warps=None, unroll=False,
                       num_stages=None, maxnreg=None, shift_da=False, pairs=False, quad=True,
                       ahead=4, a_ahead=1)


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _add4(a1, b1, c1, d1, a2, b2, c2, d2):
    return a1 + a2, b1 + b2, c1 + c2, d1 + d2


@triton.jit
def _column(X, offs_n, n):
    """Column n of a (BLOCK_D, NP) tile as (BLOCK_D,)."""
    return tl.sum(tl.where(offs_n[None, :] == n, X, 0.0), axis=1)


@triton.jit
def _set_column(X, offs_n, n, v):
    return tl.where(offs_n[None, :] == n, v[:, None], X)


@triton.jit
def _state_grad(n, G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc, dt, dtu, dy, reset, t, mask_t, mask_d, d64,
                offs_n, first, last, ones, A_ptr, B_ptr, C_ptr, B_row, C_row, st_ptr, dB_ptr, dC_ptr, dBC_row, L,
                s_Ad, s_An, s_Bx, s_Bn, s_Bl, s_Cx, s_Cn, s_Cl, s_stn,
                HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr):
    """One chunk of state n: recompute its states, run g's reverse scan and add state n's terms to the
    accumulators (BLOCK_D, NP column n of G, dA_acc, dB_acc, dC_acc; (BLOCK_D, CHUNK) ddt_acc, gB_acc, y_acc).
    Per-step dB/dC go out with atomics here."""
    A_n = tl.load(A_ptr + d64 * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if CONST_BC:  # B, C: (d, n), s_Bx the channel stride
        B_n = tl.load(B_ptr + d64 * s_Bx + n * s_Bn, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        C_n = tl.load(C_ptr + d64 * s_Cx + n * s_Cn, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    else:
        B_n = tl.load(B_row + n * s_Bn + t * s_Bl, mask=mask_t, other=0.0).to(tl.float32)[None, :]
        C_n = tl.load(C_row + n * s_Cn + t * s_Cl, mask=mask_t, other=0.0).to(tl.float32)[None, :]
    dA = tl.exp2(dt * (A_n * 1.4426950408889634))  # exp(x) = exp2(x log2 e)
    if HAS_SEQ:
        dA = tl.where(reset, 0.0, dA)
    dBu = dtu * B_n
    h_in = tl.load(st_ptr + n * s_stn, mask=mask_d, other=0.0)[:, None]
    _, hs = tl.associative_scan((dA, tl.where(first, dBu + dA * h_in, dBu)), 1, _recurrence_combine)
    cg = dy * C_n
    cg = tl.where(last, cg + _column(G, offs_n, n)[:, None], cg)  # gradient from the next chunk
    _, _, g = tl.associative_scan((dA, ones, cg), 1, _reverse_combine, reverse=True)  # g_t = dL/dh_t
    w = g * (hs - dBu)  # g_t dA_t h_{t-1} = dL/d(dt_t A_n)
    ddt_acc += w * A_n
    gB_acc += g * B_n
    if HAS_Z:
        y_acc += hs * C_n
    into = tl.where(first, g * dA, 0.0)  # g_0 dA_0: into the state before this chunk
    if CONST_BC:
        g_in, dA_n, dB_n, dC_n = tl.reduce((into, w * dt, g * dtu, dy * hs), 1, _add4)
        dB_acc = _set_column(dB_acc, offs_n, n, _column(dB_acc, offs_n, n) + dB_n)
        dC_acc = _set_column(dC_acc, offs_n, n, _column(dC_acc, offs_n, n) + dC_n)
    else:  # per-step dB, dC summed over this program's channels first: one atomic per (t, n)
        g_in, dA_n = tl.reduce((into, w * dt), 1, _add2)
        tl.atomic_add(dB_ptr + dBC_row + n * L + t, tl.sum(g * dtu, axis=0), mask=mask_t, sem="relaxed")
        tl.atomic_add(dC_ptr + dBC_row + n * L + t, tl.sum(dy * hs, axis=0), mask=mask_t, sem="relaxed")
    G = _set_column(G, offs_n, n, g_in)
    dA_acc = _set_column(dA_acc, offs_n, n, _column(dA_acc, offs_n, n) + dA_n)
    return G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc


@triton.jit
def _scan_bwd_time_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, DIM_PER_GROUP, NGROUPS,
    s_ub, s_ud, s_dtb, s_dtd, s_zb, s_zd, s_gb, s_gd, s_Ad, s_An,
    s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_stb, s_stc, s_std, s_stn, s_sb, s_sl,
    NSTATE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr, SEGS_PER_CHUNK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (cdiv(DIM, BLOCK_D), b). u, delta, z, dout: (b, d, l) with stride 1 along l; du, ddt, dz:
    contiguous (b, d, l); states: (b, cdiv(l, seg), d, n), chunk c starting at checkpoint c * SEGS_PER_CHUNK;
    dlast, dh0, dA (and dB, dC when constant): contiguous (b, d, n) fp32 (dA, dB, dC per-batch partials);
    per-step dB, dC: zeroed contiguous (b, g, n, l) fp32 (atomics); dD, dbias: (b, d) partials."""
    pid_d, pid_b, offs_d, mask_d, d64, offs_t, offs_n, mask_s = _tile_index(DIM, NSTATE, BLOCK_D, CHUNK, NP)
    bdn = (pid_b * DIM + d64)[:, None] * NSTATE + offs_n[None, :]  # (BLOCK_D, NP) in (b, d, n)
    if HAS_DLAST:
        G = tl.load(dlast_ptr + bdn, mask=mask_s, other=0.0)  # dL/dh arriving at the end of the chunk
    else:
        G = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dB_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d64, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + pid_b * s_ub + d64[:, None] * s_ud  # (BLOCK_D, 1) pointers to step 0
    dt_row = dt_ptr + pid_b * s_dtb + d64[:, None] * s_dtd
    z_row = z_ptr + pid_b * s_zb + d64[:, None] * s_zd
    g_row = dout_ptr + pid_b * s_gb + d64[:, None] * s_gd
    out_row = (pid_b * DIM + d64[:, None]) * L  # (BLOCK_D, 1) in contiguous (b, d, l)
    seq_row = seq_ptr + pid_b * s_sb
    st_row = states_ptr + pid_b * s_stb + d64 * s_std  # (BLOCK_D,)
    if not CONST_BC:  # a program never straddles two groups of B/C
        group = ((pid_d * BLOCK_D) // DIM_PER_GROUP).to(tl.int64)
        B_row = B_ptr + pid_b * s_Bb + group * s_Bx
        C_row = C_ptr + pid_b * s_Cb + group * s_Cx
        dBC_row = (pid_b * NGROUPS + group) * NSTATE * L
    else:  # placeholders
        B_row = B_ptr
        C_row = C_ptr
        dBC_row = pid_b * 0
    first = (offs_t == 0)[None, :]
    last = (offs_t == CHUNK - 1)[None, :]
    ones = tl.full([BLOCK_D, CHUNK], 1.0, dtype=tl.float32)
    nchunks = tl.cdiv(L, CHUNK)
    for i in range(nchunks):
        c = (nchunks - 1 - i).to(tl.int64)
        t = c * CHUNK + offs_t  # (CHUNK,) int64
        mask_t = t < L
        m2 = mask_d[:, None] & mask_t[None, :]
        u, x, dt = _load_dt(u_row, dt_row, t, m2, bias, HAS_BIAS, SOFTPLUS)  # dt 0 past the end
        if SOFTPLUS:  # softplus is linear above 20, as in torch; only this factor of x stays live
            dsp = tl.where(x > 20.0, 1.0, tl.sigmoid(x))
        dy = tl.load(g_row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_row + t[None, :], mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zv)
            dzf = dy * sz * (1.0 + zv * (1.0 - sz))  # dz = dout y d silu(z)/dz = dzf y
            dy = dy * zv * sz  # dL/d(y + D u)
        if HAS_SEQ:
            reset = _seq_reset(seq_row, t, mask_t, s_sl)[None, :]
        else:
            reset = first  # placeholder
        dtu = dt * u
        ddt_acc = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n w A_n
        gB_acc = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n g B_n
        y_acc = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n h C_n
        st_ptr = st_row + (c * SEGS_PER_CHUNK) * s_stc  # the state before step c * CHUNK
        if UNROLL:  # NSTATE copies of the body: the compiler may interleave (and hoist loads across) states
            for n in tl.static_range(NSTATE):
                G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc = _state_grad(
                    n, G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc, dt, dtu, dy, reset, t, mask_t, mask_d, d64,
                    offs_n, first, last, ones, A_ptr, B_ptr, C_ptr, B_row, C_row, st_ptr, dB_ptr, dC_ptr, dBC_row, L,
                    s_Ad, s_An, s_Bx, s_Bn, s_Bl, s_Cx, s_Cn, s_Cl, s_stn, HAS_Z, HAS_SEQ, CONST_BC)
        else:  # a run-time loop: one state's tiles live at a time
            for n in range(NSTATE):
                G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc = _state_grad(
                    n, G, dA_acc, dB_acc, dC_acc, ddt_acc, gB_acc, y_acc, dt, dtu, dy, reset, t, mask_t, mask_d, d64,
                    offs_n, first, last, ones, A_ptr, B_ptr, C_ptr, B_row, C_row, st_ptr, dB_ptr, dC_ptr, dBC_row, L,
                    s_Ad, s_An, s_Bx, s_Bn, s_Bl, s_Cx, s_Cn, s_Cl, s_stn, HAS_Z, HAS_SEQ, CONST_BC)
        du = gB_acc * dt
        ddt = ddt_acc + gB_acc * u
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            y = y_acc
            if HAS_D:
                y += Dv[:, None] * u
            tl.store(dz_ptr + out_row + t[None, :], (dzf * y).to(dz_ptr.dtype.element_ty), mask=m2)
        if SOFTPLUS:
            ddt *= dsp
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + out_row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + out_row + t[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    tl.store(dh0_ptr + bdn, G, mask=mask_s)
    tl.store(dA_ptr + bdn, dA_acc, mask=mask_s)
    if CONST_BC:
        tl.store(dB_ptr + bdn, dB_acc, mask=mask_s)
        tl.store(dC_ptr + bdn, dC_acc, mask=mask_s)
    tl.store(dD_ptr + pid_b * DIM + d64, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * DIM + d64, dbias_acc, mask=mask_d)


@triton.jit
def _atomic_rows(base, v, rows, n_valid, T: tl.constexpr, K: tl.constexpr):
    """Adds the (T, K) tile v of a chunk's steps (row i: steps i K .. i K + K - 1; those past n_valid masked)
    into base with relaxed fp32 atomics, issued as 16-byte vector reductions of 4 steps a lane. With K = 8
    the chunk's slots are permuted so that each instruction covers 512 contiguous bytes: steps i K + j with
    j < 4 go to slot 4 i + j, the others to 4 T + 4 i + j - 4 (``_unpermute`` restores the order); the tile
    is split in registers into its two (T, 4) halves (an atomic on the whole tile would make Triton move it
    into a 4-wide layout through shuffles)."""
    if K == 8:
        lo, hi = tl.split(tl.permute(tl.reshape(v, (T, 2, 4)), (0, 2, 1)))
        j = tl.arange(0, 4)[None, :]
        step = rows[:, None] * K + j
        slot = rows[:, None] * 4 + j
        tl.atomic_add(base + slot, lo, mask=step < n_valid, sem="relaxed")
        tl.atomic_add(base + 4 * T + slot, hi, mask=step + 4 < n_valid, sem="relaxed")
    else:
        offs = rows[:, None] * K + tl.arange(0, K)[None, :]
        tl.atomic_add(base + offs, v, mask=offs < n_valid, sem="relaxed")


@triton.jit
def _atomic_pair(base, v, rows, n_valid, T: tl.constexpr):
    """``_atomic_rows`` (K = 8) of the sum of a (2, T, 8) tile over its two channels, the work split between
    them: channel 0's lanes add the first 4 steps of each row, channel 1's the last 4, each lane one 16-byte
    vector reduction of its own 4 values plus the partner channel's (``tl.gather`` across channels: 4
    shuffles when both channels share a warp). A sum over the channel axis instead leaves a result that
    Triton spreads as 8-byte pieces (twice the reduction instructions)."""
    lo, hi = tl.split(tl.permute(tl.reshape(v, (2, T, 2, 4)), (0, 1, 3, 2)))  # (2, T, 4): steps j, 4 + j
    ch = tl.arange(0, 2)[:, None, None]
    keep = tl.where(ch == 0, lo, hi)
    other = tl.gather(tl.where(ch == 0, hi, lo), (1 - ch) + tl.zeros([2, T, 4], dtype=tl.int32), 0)
    j = tl.arange(0, 4)[None, None, :]
    r = rows[None, :, None]
    step = r * 8 + ch * 4 + j
    tl.atomic_add(base + ch * (4 * T) + r * 4 + j, keep + other, mask=step < n_valid, sem="relaxed")


@triton.jit
def _atomic_quad(base, v, rows, n_valid, T: tl.constexpr):
    """``_atomic_rows`` (K = 8) of the sum of a (4, T, 8) tile over its four channels as a reduce-scatter:
    channels c and c ^ 1 exchange the half of the row's steps the other keeps (4 values a lane), then c and
    c ^ 2 the half of that (2), so that each lane ends with 2 steps of the full sum, no two lanes the same,
    and adds them with one 8-byte vector reduction into ``_atomic_rows``' slots. 6 shuffles and 6 adds a lane
    instead of the 16 and 16 of a sum over the channel axis (a butterfly that leaves every lane all 8)."""
    lo, hi = tl.split(tl.permute(tl.reshape(v, (4, T, 2, 4)), (0, 1, 3, 2)))  # (4, T, 4): steps j, 4 + j
    ch = tl.arange(0, 4)[:, None, None]
    odd = (ch & 1) == 1  # keeps the row's last 4 steps
    s1 = tl.where(odd, hi, lo) + tl.gather(tl.where(odd, lo, hi), (ch ^ 1) + tl.zeros([4, T, 4], dtype=tl.int32), 0)
    p, q = tl.split(tl.permute(tl.reshape(s1, (4, T, 2, 2)), (0, 1, 3, 2)))  # (4, T, 2): its steps 0-1, 2-3
    up = (ch & 2) == 2  # keeps steps 2-3 of its half
    s2 = tl.where(up, q, p) + tl.gather(tl.where(up, p, q), (ch ^ 2) + tl.zeros([4, T, 2], dtype=tl.int32), 0)
    half = ch & 1
    quarter = ch >> 1
    j = tl.arange(0, 2)[None, None, :]
    r = rows[None, :, None]
    step = r * 8 + half * 4 + quarter * 2 + j
    tl.atomic_add(base + half * (4 * T) + r * 4 + quarter * 2 + j, s2, mask=step < n_valid, sem="relaxed")


@triton.jit
def _atomic_quad_bfly(base, v, rows, n_valid, T: tl.constexpr):
    """``_atomic_quad`` with the exchanges as pair sums over one channel bit (``tl.sum`` over a size-2 axis: one
    butterfly shuffle a value, in the tile's own layout) instead of ``tl.gather``, which Triton lowers through
    lane permutations into and out of a layout of its own (about 3 shuffles a value): all 8 steps summed over
    the pair c, c ^ 1 and each lane keeps its half, then its 4 over c, c ^ 2 and it keeps 2. 12 shuffles and
    12 adds a lane (the plain sum over the channel axis: 16 and 16)."""
    v4 = tl.reshape(v, (2, 2, T, 8))  # channel 2 a + b: (a, b, row, step)
    s1 = tl.broadcast_to(tl.expand_dims(tl.sum(v4, axis=1), 1), (2, 2, T, 8))  # over b: c and c ^ 1
    lo, hi = tl.split(tl.permute(tl.reshape(s1, (2, 2, T, 2, 4)), (0, 1, 2, 4, 3)))  # (2, 2, T, 4)
    b = tl.arange(0, 2)[None, :, None, None]
    a = tl.arange(0, 2)[:, None, None, None]
    k1 = tl.where(b == 1, hi, lo)  # b keeps steps 4 b .. 4 b + 3
    s2 = tl.broadcast_to(tl.expand_dims(tl.sum(k1, axis=0), 0), (2, 2, T, 4))  # over a: c and c ^ 2
    p, q = tl.split(tl.permute(tl.reshape(s2, (2, 2, T, 2, 2)), (0, 1, 2, 4, 3)))  # (2, 2, T, 2)
    k2 = tl.where(a == 1, q, p)  # a keeps steps 2 a, 2 a + 1 of its half
    j = tl.arange(0, 2)[None, None, None, :]
    r = rows[None, None, :, None]
    step = r * 8 + b * 4 + a * 2 + j
    tl.atomic_add(base + b * (4 * T) + r * 4 + a * 2 + j, k2, mask=step < n_valid, sem="relaxed")


def _unpermute(x: torch.Tensor, l: int, T: int, K: int) -> torch.Tensor:
    """The step order of ``_atomic_rows``' slots: x (..., nchunks * T * K) -> (..., l)."""
    if K == 8:
        x = x.unflatten(-1, (-1, 2, T, 4)).transpose(-3, -2).flatten(-4)
    return x[..., :l]


@triton.jit
def _rstep(a, b, s, p):
    """One step of a reverse first-order scan: (g, product of a) before a step from those after it."""
    return b + a * s, a * p


@triton.jit
def _rev_rows8(a, b, R: tl.constexpr):
    """The reverse first-order scan g_j = b_j + a_j g_{j+1} inside each row of (R, 8) tiles, from g = 0 after
    the row, written out column by column (Triton's reverse=True scan reverses the lanes too: 32 shuffles a
    state). Returns the row aggregates (product of a, g at column 0; (R, 1)) and the (R, 8) tiles of the
    partial g and of the product of a from each column to the row's end."""
    a0, a1, a2, a3, a4, a5, a6, a7 = _split8(a, R, 8)
    b0, b1, b2, b3, b4, b5, b6, b7 = _split8(b, R, 8)
    s6, p6 = _rstep(a6, b6, b7, a7)
    s5, p5 = _rstep(a5, b5, s6, p6)
    s4, p4 = _rstep(a4, b4, s5, p5)
    s3, p3 = _rstep(a3, b3, s4, p4)
    s2, p2 = _rstep(a2, b2, s3, p3)
    s1, p1 = _rstep(a1, b1, s2, p2)
    s0, p0 = _rstep(a0, b0, s1, p1)
    return p0, s0, _join8(s0, s1, s2, s3, s4, s5, s6, b7, R, 8), _join8(p0, p1, p2, p3, p4, p5, p6, a7, R, 8)


@triton.jit
def _kt_bwd_chunk_in(u_base, dt_base, g_base, z_base, t, L, HAS_Z: tl.constexpr):
    """A chunk's u, delta, delta one step later, dout and z (u again without z) at steps t, as loaded."""
    m2 = t < L
    u = tl.load(u_base + t, mask=m2, other=0.0)
    x = tl.load(dt_base + t, mask=m2, other=0.0)
    xn = tl.load(dt_base + t + 1, mask=(t + 1) < L, other=0.0)
    dy = tl.load(g_base + t, mask=m2, other=0.0)
    zv = u
    if HAS_Z:
        zv = tl.load(z_base + t, mask=m2, other=0.0)
    return u, x, xn, dy, zv


@triton.jit
def _kt_bwd_chunk_ptrs(c, B_base, C_base, st_row, offs, rows, d3, L, s_stc, T: tl.constexpr, K: tl.constexpr,
                       SEGS_PER_CHUNK: tl.constexpr, PAIRS: tl.constexpr):
    """Of chunk c: its steps t (1, T, K) and the same as a (DB, T, K) tile (B and C are loaded in the tiles'
    layout, the same steps for every channel), the B / C pointers of state 0 (whole chunks of bf16 B / C as
    int32 pairs with PAIRS: (DB, T, K / 2) pointers), the step mask and the pointers (DB, T) to the state
    saved before the chunk."""
    CHUNK: tl.constexpr = T * K
    t = c * CHUNK + offs
    tb = t + d3 * 0
    Bq = B_base
    Cq = C_base
    if PAIRS:
        tp = c * (CHUNK // 2) + rows[None, :, None] * (K // 2) + tl.arange(0, K // 2)[None, None, :] + d3 * 0
        Bq = B_base.to(tl.pointer_type(tl.int32)) + tp
        Cq = C_base.to(tl.pointer_type(tl.int32)) + tp
    return t, tb, Bq, Cq, t < L, st_row + (c * SEGS_PER_CHUNK) * s_stc


@triton.jit
def _kt_bwd_state_in(n, A_ptr, B_base, C_base, st_ptr, carry, d_idx, t, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl,
                     s_stn, CONST_BC: tl.constexpr, PAIRS: tl.constexpr = False, T: tl.constexpr = 1,
                     K: tl.constexpr = 1, DB: tl.constexpr = 0, LOAD_A: tl.constexpr = True):
    """What state n of a chunk loads: A[d, n] (DB,), B_n, C_n ((DB, T, K) tiles of the program's group, the same
    for every channel, or (DB, 1, 1) when constant; in B's and C's dtypes), the state saved before the chunk
    and g at the step after it (both (DB, T), equal along T)."""
    if LOAD_A:
        A_n = tl.load(A_ptr + d_idx * s_Ad + n * s_An).to(tl.float32)
    else:  # placeholder (A_AHEAD 2: the state loop loads A)
        A_n = tl.zeros([DB], dtype=tl.float32)
    B_n, C_n = _kt_bc(n, B_base, C_base, t, m2, s_Bn, s_Bl, s_Cn, s_Cl, CONST_BC, False, PAIRS, T, K, DB)
    return A_n, B_n, C_n, tl.load(st_ptr + n * s_stn), tl.load(carry + n)


@triton.jit
def _scan_bwd_time_kt_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, states_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, DIM_PER_GROUP, NGROUPS,
    s_ub, s_ud, s_dtb, s_dtd, s_zb, s_zd, s_gb, s_gd, s_Ad, s_An,
    s_Bb, s_Bx, s_Bn, s_Bl, s_Cb, s_Cx, s_Cn, s_Cl,
    s_stb, s_stc, s_std, s_stn, s_sb, s_sl,
    NSTATE: tl.constexpr, NP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, HAS_SEQ: tl.constexpr, CONST_BC: tl.constexpr,
    T: tl.constexpr, K: tl.constexpr, DB: tl.constexpr, SEGS_PER_CHUNK: tl.constexpr, PREFETCH: tl.constexpr,
    COPIES: tl.constexpr, SHIFT_DA: tl.constexpr = False, PAIRS: tl.constexpr = False, QUAD: tl.constexpr = 0,
    AHEAD: tl.constexpr = 0, A_AHEAD: tl.constexpr = 1,
):
    """The backward as the (T, K) forward: DB channels (of one B/C group) of one batch row per program, grid
    (d / DB, b), a (DB, T, K) tile per chunk of T K steps (a multiple of the forward's checkpoint spacing),
    the chunks from the last to the first; row i of a channel (one thread when T = 32) holds the K contiguous
    steps i K .. i K + K - 1. Per state n:
    - the forward states h (as ``_scan_time_fwd_kt_kernel``: the scan along K in each thread, the scan of the
      row aggregates across lanes, the chunk's saved start state);
    - g_t = dL/dh_t = dy_t C_n,t + dA_{t+1} g_{t+1} by the same two-level scan run in reverse on the pairs
      (dA_{t+1}, dy_t C_n,t): dA_{t+1} comes from delta loaded once more, one step later (no shift across
      lanes; with SHIFT_DA from dA shifted one step instead: the next in-thread column, the next row's first
      by a lane gather, the step after the chunk from its delta), and g at the step after the chunk (dlast
      for the last chunk) is carried in dh0 (every lane of a channel stores and reloads the same value, as
      the forward's carry);
    - w = g (h - dt u B) (= g_t dA_t h_{t-1}) into ddt (w A_n) and dA (sum of w dt, a (DB, NP) register
      accumulator), g B into du and ddt, h C into dz, and per-step dB = g dt u, dC = dy h summed over the DB
      channels and added with relaxed fp32 atomics (``_atomic_rows``; with DB = 2 and K = 8
      ``_atomic_pair``, which splits the sums between the two channels) into copy pid % COPIES of dB, dC;
      constant B/C: per-channel sums instead.
    In the first chunk the carry becomes dh0 = g_0 dA_0. Arguments as ``_scan_bwd_time_kernel``'s."""
    CHUNK: tl.constexpr = T * K
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    LP = tl.cdiv(L, CHUNK) * CHUNK  # per-step dB, dC: (COPIES, b, g, n, LP) in ``_atomic_rows``' slot order
    d_idx = pid_d.to(tl.int64) * DB + tl.arange(0, DB)  # (DB,): DB divides DIM / NGROUPS
    d2 = d_idx[:, None]
    d3 = d_idx[:, None, None]
    rows = tl.arange(0, T)
    cols = tl.arange(0, K)
    offs = rows[None, :, None] * K + cols[None, None, :]  # (1, T, K)
    first_col = (cols == 0)[None, None, :]
    last_col = (cols == K - 1)[None, None, :]
    zeros2 = tl.zeros([DB, T], dtype=tl.int32)
    prev_row = zeros2 + tl.maximum(rows - 1, 0)[None, :]
    next_row = zeros2 + tl.minimum(rows + 1, T - 1)[None, :]
    first_row = (rows == 0)[None, :]
    last_row = (rows == T - 1)[None, :]
    offs_n = tl.arange(0, NP)[None, :]
    bias = tl.zeros([DB, 1, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + d3).to(tl.float32)
    Dv = tl.zeros([DB, 1, 1], dtype=tl.float32)
    if HAS_D:
        Dv += tl.load(D_ptr + d3).to(tl.float32)
    if CONST_BC:
        B_base = B_ptr + d3 * s_Bx  # (DB, 1, 1)
        C_base = C_ptr + d3 * s_Cx
        dBC_base = 0  # placeholder
    else:
        group = ((pid_d * DB) // DIM_PER_GROUP).to(tl.int64)
        B_base = B_ptr + pid_b * s_Bb + group * s_Bx
        C_base = C_ptr + pid_b * s_Cb + group * s_Cx
        # COPIES partial copies of dB, dC (fewer atomics on one address): program pid_d adds into copy
        # pid_d % COPIES
        dBC_base = (((pid_d % COPIES) * tl.num_programs(1) + pid_b) * NGROUPS + group) * NSTATE * LP
    u_base = u_ptr + pid_b * s_ub + d3 * s_ud  # (DB, 1, 1)
    dt_base = dt_ptr + pid_b * s_dtb + d3 * s_dtd
    z_base = z_ptr + pid_b * s_zb + d3 * s_zd
    g_base = dout_ptr + pid_b * s_gb + d3 * s_gd
    o_base = (pid_b * DIM + d3) * L  # contiguous (b, d, l) outputs
    seq_base = seq_ptr + pid_b * s_sb
    bdn = (pid_b * DIM + d2) * NSTATE  # (DB, 1) in (b, d, n)
    carry = dh0_ptr + bdn + zeros2  # (DB, T), equal along T: g after the current chunk
    for n in tl.static_range(NSTATE):
        g_end = tl.zeros([DB, T], dtype=tl.float32)
        if HAS_DLAST:
            g_end = tl.load(dlast_ptr + bdn + n + zeros2)
        tl.store(carry + n, g_end)
    st_row = states_ptr + pid_b * s_stb + d2 * s_std + zeros2  # (DB, T)
    x0 = tl.load(dt_ptr + pid_b * s_dtb + d2 * s_dtd + zeros2).to(tl.float32)
    if HAS_BIAS:
        x0 += tl.reshape(bias, (DB, 1))
    dt0 = x0  # dt at step 0, (DB, T) (no packed-sequence start there)
    if SOFTPLUS:
        dt0 = _softplus(x0)
    if A_AHEAD == 2:  # A of states 0 and 1 (the state loop loads each state's two states ahead, cyclically)
        A_q0 = tl.load(A_ptr + d_idx * s_Ad).to(tl.float32)
        A_q1 = tl.load(A_ptr + d_idx * s_Ad + (1 % NSTATE) * s_An).to(tl.float32)
    dA_acc = tl.zeros([DB, NP], dtype=tl.float32)
    dBc_acc = tl.zeros([DB, NP], dtype=tl.float32)
    dCc_acc = tl.zeros([DB, NP], dtype=tl.float32)
    dD_acc = tl.zeros([DB], dtype=tl.float32)
    dbias_acc = tl.zeros([DB], dtype=tl.float32)
    nchunks = tl.cdiv(L, CHUNK)
    if AHEAD > 0:  # the last chunk's inputs, as loaded (the state loop loads each next one's)
        u_raw, x_raw, xn_raw, dy_raw, z_raw = _kt_bwd_chunk_in(u_base, dt_base, g_base, z_base,
                                                                (nchunks - 1) * CHUNK + offs, L, HAS_Z)
    for i in range(pid_b * 0, nchunks):
        c = nchunks - 1 - i
        t, tb, Bq, Cq, m2, st_ptr = _kt_bwd_chunk_ptrs(c, B_base, C_base, st_row, offs, rows, d3, L, s_stc, T, K,
                                                       SEGS_PER_CHUNK, PAIRS)
        mn = (t + 1) < L
        if AHEAD == 0:  # (AHEAD > 0, never with SHIFT_DA: loaded during the previous chunk's state loop)
            u_raw, x_raw, xn_raw, dy_raw, z_raw = _kt_bwd_chunk_in(u_base, dt_base, g_base, z_base, t, L, HAS_Z)
        u = u_raw.to(tl.float32)
        x = x_raw.to(tl.float32)
        dy = dy_raw.to(tl.float32)
        if HAS_Z:
            zv = z_raw.to(tl.float32)
        if SHIFT_DA:  # delta at the step after the chunk only ((DB, 1)); dA_{t+1} is dA shifted by one step
            t_after = (c + 1) * CHUNK
            xn = tl.load(dt_base + t_after, mask=(t_after + d3 * 0) < L, other=0.0)
            xn = tl.reshape(xn, (DB, 1)).to(tl.float32)
        else:
            xn = xn_raw.to(tl.float32)  # delta one step later: dA_{t+1}
        if HAS_SEQ:
            reset = _seq_reset(seq_base, t, m2, s_sl)
            reset_n = _seq_reset(seq_base, t + 1, mn, s_sl)
        if PREFETCH:
            A_n, B_n, C_n, h_start, g_end = _kt_bwd_state_in(0, A_ptr, Bq, Cq, st_ptr, carry, d_idx, tb,
                                                             m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl, s_stn,
                                                             CONST_BC, PAIRS, T, K, DB, A_AHEAD == 1)
        if HAS_BIAS:
            x += bias
            if SHIFT_DA:
                xn += tl.reshape(bias, (DB, 1))
            else:
                xn += bias
        dt = x
        dtn = xn
        if SOFTPLUS:
            dt = _softplus(x)
            dtn = _softplus(xn)
        dt = tl.where(m2, dt, 0.0)
        if SHIFT_DA:
            dtn = tl.where((c + 1) * CHUNK < L, dtn, 0.0)
        else:
            dtn = tl.where(mn, dtn, 0.0)  # past the end: dA = 1, the gradient passes through
        dtu = dt * u
        if HAS_Z:
            dy = dy * zv * tl.sigmoid(zv)  # dL/d(y + D u)
        ddt_acc = tl.zeros([DB, T, K], dtype=tl.float32)  # sum_n w A_n
        gB_acc = tl.zeros([DB, T, K], dtype=tl.float32)  # sum_n g B_n
        y_acc = tl.zeros([DB, T, K], dtype=tl.float32)  # sum_n h C_n
        for n in tl.static_range(NSTATE):
            if AHEAD > 0:
                if n == max(0, NSTATE - AHEAD):  # the next chunk's (the first chunk reloads its own)
                    u_raw, x_raw, xn_raw, dy_raw, z_raw = _kt_bwd_chunk_in(
                        u_base, dt_base, g_base, z_base, tl.maximum(c - 1, 0) * CHUNK + offs, L, HAS_Z)
            if PREFETCH:
                if n + 1 < NSTATE:  # the next state's loads, before this state's stores
                    A_nx, B_nx, C_nx, h_nx, g_nx = _kt_bwd_state_in(
                        n + 1, A_ptr, Bq, Cq, st_ptr, carry, d_idx, tb, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn,
                        s_Cl, s_stn, CONST_BC, PAIRS, T, K, DB, A_AHEAD == 1)
            else:
                A_n, B_n, C_n, h_start, g_end = _kt_bwd_state_in(n, A_ptr, Bq, Cq, st_ptr, carry, d_idx,
                                                                 tb, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl, s_stn,
                                                                 CONST_BC, PAIRS, T, K, DB, A_AHEAD == 1)
            if A_AHEAD == 2:  # issued here, ptxas sinks the load only to the end of this state's first block
                A_n = A_q0
                A_q0 = A_q1
                A_q1 = tl.load(A_ptr + d_idx * s_Ad + ((n + 2) % NSTATE) * s_An).to(tl.float32)
            Bf = B_n.to(tl.float32)
            Cf = C_n.to(tl.float32)
            A3 = A_n[:, None, None]
            a2 = A_n[:, None] * 1.4426950408889634  # exp(x) = exp2(x log2 e)
            dA = tl.exp2(dt * a2[:, :, None])
            if SHIFT_DA:  # K == 8: columns 1..7 of dA, then the next row's column 0 (after the chunk: dtn)
                a0, a1_, a2_, a3, a4, a5, a6, a7 = _split8(tl.reshape(dA, (DB * T, K)), DB * T, K)
                nxt = tl.where(last_row, tl.exp2(dtn * a2), tl.gather(tl.reshape(a0, (DB, T)), next_row, 1))
                dAn = tl.reshape(_join8(a1_, a2_, a3, a4, a5, a6, a7, tl.reshape(nxt, (DB * T, 1)), DB * T, K),
                                 (DB, T, K))
            else:
                dAn = tl.exp2(dtn * a2[:, :, None])
            if HAS_SEQ:
                dA = tl.where(reset, 0.0, dA)
                dAn = tl.where(reset_n, 0.0, dAn)
            dBu = dtu * Bf
            cA, hs, pa, pb = _kt_scans(dA, dBu, last_col, 2)  # the forward states
            ends = pb + pa * h_start
            pre = tl.where(first_row, h_start, tl.gather(ends, prev_row, 1))
            h = hs + cA * pre[:, :, None]
            # g, the same scan in reverse (Triton passes the later aggregate first: the same combine)
            cg = dy * Cf
            if K == 8:
                qa, qb, gs, cR = _rev_rows8(tl.reshape(dAn, (DB * T, K)), tl.reshape(cg, (DB * T, K)), DB * T)
                qa = tl.reshape(qa, (DB, T))
                qb = tl.reshape(qb, (DB, T))
                gs = tl.reshape(gs, (DB, T, K))
                cR = tl.reshape(cR, (DB, T, K))
            else:
                cR, gs = tl.associative_scan((dAn, cg), 2, _recurrence_combine, reverse=True)
                qa = tl.sum(tl.where(first_col, cR, 0.0), axis=2)
                qb = tl.sum(tl.where(first_col, gs, 0.0), axis=2)
            sa, sb = tl.associative_scan((qa, qb), 1, _recurrence_combine, reverse=True)
            starts = sb + sa * g_end  # g at each row's first step
            post = tl.where(last_row, g_end, tl.gather(starts, next_row, 1))
            g = gs + cR * post[:, :, None]
            g_first = tl.gather(starts, zeros2, 1)  # g at the chunk's first step
            if c == 0:  # then dh0 = dL/dh_{-1} = dA_0 g_0, stored in place (a read-modify-write of the
                # carry after the loop would race between warps)
                g_first *= tl.exp2(dt0 * a2)
            tl.store(carry + n, g_first)
            w = g * (h - dBu)  # g_t dA_t h_{t-1} = dL/d(dt_t A_n)
            ddt_acc += w * A3
            gB_acc += g * Bf
            if HAS_Z:
                y_acc += h * Cf
            dA_acc = tl.where(offs_n == n, dA_acc + tl.sum(tl.sum(w * dt, axis=2), axis=1)[:, None], dA_acc)
            if CONST_BC:
                dBc_acc = tl.where(offs_n == n, dBc_acc + tl.sum(tl.sum(g * dtu, axis=2), axis=1)[:, None], dBc_acc)
                dCc_acc = tl.where(offs_n == n, dCc_acc + tl.sum(tl.sum(dy * h, axis=2), axis=1)[:, None], dCc_acc)
            elif DB == 2 and K == 8:  # the two channels' sums split between them (see _atomic_pair)
                _atomic_pair(dB_ptr + dBC_base + n * LP + c * CHUNK, g * dtu, rows, L - c * CHUNK, T)
                _atomic_pair(dC_ptr + dBC_base + n * LP + c * CHUNK, dy * h, rows, L - c * CHUNK, T)
            elif QUAD == 2:  # quad "bfly": the reduce-scatter by pair sums (see _atomic_quad_bfly)
                _atomic_quad_bfly(dB_ptr + dBC_base + n * LP + c * CHUNK, g * dtu, rows, L - c * CHUNK, T)
                _atomic_quad_bfly(dC_ptr + dBC_base + n * LP + c * CHUNK, dy * h, rows, L - c * CHUNK, T)
            elif QUAD:  # DB == 4, K == 8: the four channels' sums as a reduce-scatter (see _atomic_quad)
                _atomic_quad(dB_ptr + dBC_base + n * LP + c * CHUNK, g * dtu, rows, L - c * CHUNK, T)
                _atomic_quad(dC_ptr + dBC_base + n * LP + c * CHUNK, dy * h, rows, L - c * CHUNK, T)
            else:  # summed over the program's channels first
                _atomic_rows(dB_ptr + dBC_base + n * LP + c * CHUNK, tl.sum(g * dtu, axis=0), rows,
                             L - c * CHUNK, T, K)
                _atomic_rows(dC_ptr + dBC_base + n * LP + c * CHUNK, tl.sum(dy * h, axis=0), rows,
                             L - c * CHUNK, T, K)
            if PREFETCH:
                if n + 1 < NSTATE:
                    A_n, B_n, C_n, h_start, g_end = A_nx, B_nx, C_nx, h_nx, g_nx
        # u, delta, z and dout again (cache hits) rather than live in registers through the state loop
        u = tl.load(u_base + t, mask=m2, other=0.0).to(tl.float32)
        du = gB_acc * dt
        ddt = ddt_acc + gB_acc * u
        if HAS_D:
            du += Dv * dy
            dD_acc += tl.sum(tl.sum(dy * u, axis=2), axis=1)
        if HAS_Z:
            zv = tl.load(z_base + t, mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zv)
            y = y_acc
            if HAS_D:
                y += Dv * u
            dzf = tl.load(g_base + t, mask=m2, other=0.0).to(tl.float32) * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + o_base + t, (dzf * y).to(dz_ptr.dtype.element_ty), mask=m2)  # dout y dsilu(z)
        if SOFTPLUS:
            x = tl.load(dt_base + t, mask=m2, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += bias
            ddt *= tl.where(x > 20.0, 1.0, tl.sigmoid(x))  # softplus is linear above 20, as in torch
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(tl.sum(ddt, axis=2), axis=1)
        tl.store(du_ptr + o_base + t, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + o_base + t, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    nmask = offs_n < NSTATE
    tl.store(dA_ptr + bdn + offs_n, dA_acc, mask=nmask)
    if CONST_BC:
        tl.store(dB_ptr + bdn + offs_n, dBc_acc, mask=nmask)
        tl.store(dC_ptr + bdn + offs_n, dCc_acc, mask=nmask)
    tl.store(dD_ptr + pid_b * DIM + d_idx, dD_acc)
    tl.store(dbias_ptr + pid_b * DIM + d_idx, dbias_acc)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

def _a_ahead(v) -> int:
    """BWD_TIME_CONFIG a_ahead (how many states ahead A[:, n] is loaded: 1 or 2)."""
    if v not in (1, 2):
        raise ValueError(f"BWD_TIME_CONFIG a_ahead={v!r}: use 1 (the next state's, with its B and C) or 2")
    return v


def _meta(cfg: dict, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg: int) -> dict:
    """BLOCK_D, CHUNK, SEGS_PER_CHUNK, NP and num_warps from a config; ValueError for an impossible one."""
    d, l = u.shape[1], u.shape[2]
    if seg < 1 or seg & (seg - 1):
        raise ValueError(f"seg={seg}: the time-parallel backward needs a power-of-two checkpoint spacing")
    chunk = max(cfg["chunk"] or seg, seg)
    if chunk & (chunk - 1) or chunk % seg:
        raise ValueError(f"chunk={chunk} must be a power of two and a multiple of the forward's seg={seg} "
                         "(each chunk starts at a saved state)")
    chunk = max(seg, min(chunk, triton.next_power_of_2(max(l, 1))))
    block_d = cfg["block_d"]
    if block_d is None:
        steps = cfg.get("steps") or 0
        fill = 32 * steps // seg if steps and chunk == seg else 0  # channels that fill a warp of seg-step rows
        block_d = fill if fill in (2, 4) and busy_grid(u.shape[0], d, u.device) else 1
    block_d = min(block_d, triton.next_power_of_2(d))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d={cfg['block_d']} must be a power of two")
    block_d = k._group_block_d(block_d, d, B)
    np_ = max(2, triton.next_power_of_2(A.shape[1]))
    if cfg.get("steps"):  # the (T, K) kernel
        steps = cfg["steps"]
        if steps & (steps - 1):
            raise ValueError(f"BWD_TIME_CONFIG steps={steps} (the (T, K) backward) must be a power of two")
        while d % block_d:  # the (T, K) kernel has no channel mask
            block_d //= 2
        kk = min(steps, chunk // 2)
        rows = chunk // kk
        copies = 1 if cfg.get("copies") is None else cfg["copies"]
        if copies < 1:
            raise ValueError(f"BWD_TIME_CONFIG copies={copies} must be at least 1")
        # at most ~128 MB of copies for dB and dC together (1M tokens, n 16: 2 copies)
        g = B.shape[1] if B.dim() == 4 else 1
        copies = max(1, min(copies, (1 << 27) // max(1, 8 * u.shape[0] * g * A.shape[1] * l)))
        return dict(T=rows, K=kk, DB=block_d, SEGS_PER_CHUNK=chunk // seg, NP=np_,
                    PREFETCH=bool(cfg.get("prefetch", True)), COPIES=min(copies, d // block_d),
                    SHIFT_DA=bool(cfg.get("shift_da")) and kk == 8,
                    PAIRS=bool(cfg.get("pairs")) and kk % 2 == 0 and l % chunk == 0,  # and pairs_ok(B, C)
                    QUAD=(2 if cfg.get("quad") == "bfly" else 1) if cfg.get("quad") and kk == 8 and block_d == 4 else 0,
                    AHEAD=int(cfg.get("ahead") or 0) if not (cfg.get("shift_da") and kk == 8) else 0,
                    A_AHEAD=_a_ahead(cfg.get("a_ahead", 1)),
                    num_warps=cfg["num_warps"] or max(1, block_d * rows // 32))
    warps = cfg["num_warps"] or max(1, min(16, chunk * block_d // 256))
    return dict(BLOCK_D=block_d, CHUNK=chunk, SEGS_PER_CHUNK=chunk // seg, NP=np_, UNROLL=bool(cfg["unroll"]),
                num_warps=warps)


def _check(u, delta, z, dout, states, seg, A) -> None:
    for name, t in (("u", u), ("delta", delta), ("z", z), ("dout", dout)):
        if t is not None and t.shape[2] > 1 and t.stride(2) != 1:
            raise ValueError(f"scan_bwd_time needs {name} with stride 1 along seqlen (got strides {t.stride()}): "
                             "pass .contiguous() or use scan_bwd for channels-last inputs")
    b, d, l = u.shape
    want = (b, triton.cdiv(l, seg), d, A.shape[1])
    if tuple(states.shape) != want or states.dtype != torch.float32:
        raise ValueError(f"states has shape {tuple(states.shape)} {states.dtype}, expected {want} float32: the "
                         f"state before every {seg}-step chunk (scan_fwd(..., store_states=True))")


def scan_bwd_time(u, delta, A, B, C, D, z, delta_bias, seq_idx, states, seg, dout, dlast, softplus, **overrides):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0), exactly as ``scan_bwd`` returns them:
    du, ddelta, dz contiguous (b, d, l) in the inputs' dtypes; dA (d, n), dB/dC in B's layout ((d, n), (b, n, l)
    or (b, g, n, l)), dD, ddelta_bias (d,) and dh0 (b, d, n), all fp32 (the caller casts).

    u, delta, z, dout: (b, d, l) with stride 1 along l. states: (b, cdiv(l, seg), d, n) fp32, the state
    before every seg-th step (the forward's checkpoints). dlast: (b, d, n) or None. ``overrides``: keys of
    BWD_TIME_CONFIG."""
    unknown = set(overrides) - set(BWD_TIME_CONFIG)
    if unknown:
        raise ValueError(f"unknown scan_bwd_time config keys {sorted(unknown)}; known: {sorted(BWD_TIME_CONFIG)}")
    cfg = k._config(BWD_TIME_CONFIG, **overrides)
    _check(u, delta, z, dout, states, seg, A)
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1] if B.dim() == 4 else 1
    meta = _meta(cfg, u, A, B, seg)
    if meta.get("PAIRS"):
        meta["PAIRS"] = pairs_ok(B, C)
    dev, f32 = u.device, torch.float32
    du = k._empty(b, d, l, device=dev, dtype=u.dtype)
    ddt = k._empty(b, d, l, device=dev, dtype=delta.dtype)
    dz = k._empty(b, d, l, device=dev, dtype=z.dtype) if z is not None else None
    const = B.dim() == 2
    copies = meta.get("COPIES", 1)
    lp = l if "K" not in meta else triton.cdiv(l, meta["T"] * meta["K"]) * meta["T"] * meta["K"]
    dB = k._empty(b, d, n, device=dev, dtype=f32) if const else torch.zeros(copies, b, g, n, lp, device=dev, dtype=f32)
    dC = k._empty_like(dB) if const else torch.zeros_like(dB)
    dA, dh0 = (k._empty(b, d, n, device=dev, dtype=f32) for _ in range(2))
    dD, dbias = (k._empty(b, d, device=dev, dtype=f32) for _ in range(2))
    dlast_ = dlast.to(f32).contiguous() if dlast is not None else None
    z_, seq_ = k._opt(z, u), k._opt(seq_idx, u)
    if "K" in meta:
        kernel, grid = _scan_bwd_time_kt_kernel, (d // meta["DB"], b)
    else:
        kernel, grid = _scan_bwd_time_kernel, (triton.cdiv(d, meta["BLOCK_D"]), b)
    kernel[grid](
        u, delta, A, B, C, k._opt(D, u), z_, k._opt(delta_bias, u), seq_, states, dout, k._opt(dlast_, dh0),
        du, ddt, k._opt(dz, du), dA, dB, dC, dD, dbias, dh0,
        l, d, d // g, g,
        *u.stride()[:2], *delta.stride()[:2], *z_.stride()[:2], *dout.stride()[:2], *A.stride(),
        *k._bc_strides(B), *k._bc_strides(C), *states.stride(),
        *(seq_.stride()[:2] if seq_idx is not None else (0, 0)),
        NSTATE=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_DLAST=dlast is not None, HAS_SEQ=seq_idx is not None, CONST_BC=const,
        **k._launch_opts(cfg, meta),
    )
    if const:
        dB, dC = dB.sum(0), dC.sum(0)
    else:
        dB, dC = (x[0] if copies == 1 else x.sum(0) for x in (dB, dC))
        if "K" in meta:
            dB, dC = (_unpermute(x, l, meta["T"], meta["K"]) for x in (dB, dC))
    if not const and B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return du, ddt, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0
