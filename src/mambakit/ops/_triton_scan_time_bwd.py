"""Time-parallel Triton backward of the Mamba-1 selective scan (imported lazily: needs Triton).

The kernels of ``_triton_selective_scan`` put channels across lanes and walk time inside each thread; this one
puts time across lanes, like the official CUDA kernel, and pairs with a time-parallel forward that saves the
state before every chunk of T steps.

One program per (block of BLOCK_D channels, batch row), grid (cdiv(d, BLOCK_D), b). It walks its chunks of
T steps (T = CHUNK, a power of two and a multiple of the forward's checkpoint spacing seg) from the last to
the first. Per chunk it loads (BLOCK_D, T) tiles of u, delta, z and dout, recomputes dt (bias, softplus),
dt u and dy = dout silu(z), and then, one iteration per state n (``_state_grad``; a run-time loop, or
unrolled with the unroll key):
- recomputes dA = exp(dt A_n), dBu = dt u B_n and the forward states h_t with ``tl.associative_scan`` along
  time (first-order-recurrence combine), the chunk's saved start state folded into its first step;
- runs the reverse scan g_t = dL/dh_t = dy_t C_t + dA_{t+1} g_{t+1}. It reads the *next* step's dA, so it
  scans triples (dA of the segment's first step, product of its other dA, value) with
  ``_reverse_combine`` instead of shifting dA by one lane. The gradient arriving from the next chunk
  (dA_T g_T, or dlast for the last chunk) is added at the chunk's last step; it passes through the masked
  steps past the end of the sequence, where dt = 0 gives dA = 1 and dy = 0. The carries of all states live
  in a (BLOCK_D, NP) register tile (column n read with a masked sum, written back with ``tl.where``);
  after the first chunk it is dh0;
- accumulates w = g (h - dBu) (= g_t dA_t h_{t-1}, dL/d(dt A_n)): ddt += w A_n, sum_n g B_n (for du = dt
  sum_n g B_n and ddt += u sum_n g B_n), dA[:, n] += sum_t w dt, and y = sum_n h C_n for dz.
Packed sequences (seq_idx): dA = 0 where a new sequence starts, so no state and no gradient crosses the
boundary (and dA's gradient there is w = 0). After the state loop: the D skip, dz, the softplus gradient and
the stores of du, ddelta, dz; dD and ddelta_bias are summed per program.

dB and dC per step ((b, g, n, l) fp32): a program's channels all belong to one group, so each step's
g dt u and dy h are first summed over the program's BLOCK_D channels (``tl.sum`` over the tile's channel
axis) and only the (T,) sums are added with relaxed fp32 atomics: b * cdiv(d, BLOCK_D) * l * n atomics each
for dB and dC, BLOCK_D times fewer than one per channel. Constant B/C ((d, n)): per-channel sums in
registers, written once per program as (b, d, n) partials that the launcher sums over b (like dA, dD, dbias).

Config (BWD_TIME_CONFIG, overridable per call, so that variants can be timed on a GPU):
- block_d: channels per program (a power of two; halved until it divides d / ngroups);
- chunk: T, steps per chunk (None or less than the forward's seg: seg); a power of two, capped at the
  sequence length rounded up to a power of two (not below seg);
- num_warps: None gives T * block_d / 256 (8 elements of a tile per thread), between 1 and 16;
- unroll: False runs the states in a run-time loop; True unrolls it (tl.static_range), which lets the
  compiler interleave states but spills: ptxas for sm_90, bf16, n = 16, chunk 1024, block_d 1, 4 warps
  (8 elements a thread) gives 255 registers + 592 bytes of stack unrolled, 255 + 8 as a loop; with 8 warps
  (4 elements a thread) the loop takes 176 registers and no stack; block_d 2 at 16 warps
  hits the 128-register cap of 512 threads (24 bytes of stack);
- num_stages, maxnreg: Triton's launch options (None: its default).

All offsets that scale with batch, channels or time are int64. Everything inside is fp32 (bf16/fp16 loads
are cast). u, delta, z and dout must have stride 1 along the sequence (any batch and channel strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops import _triton_selective_scan as k
from mambakit.ops._triton_scan_time import _load_dt, _tile_index
from mambakit.ops._triton_selective_scan import _recurrence_combine, _reverse_combine, _seq_reset, _softplus

# Measured on an H200 (notes/gpu_run5/call4, bf16, n 16, after the time-parallel forward with 512-step chunks):
# b4 d3072 l4096 fwd+bwd 6.13 ms with these defaults (channel-parallel backward 7.53; block_d 2: 14.8,
# chunk 1024: 9.46, 8 warps: 10.1, 2 warps: 6.42, unrolled: 9.44); b1 d3072 l65536 27.8 ms (36.6).
# With the (T, K) forward (256-step checkpoints; notes/gpu_run6): b4 fwd+bwd 5.68 ms with these defaults
# (chunk 512, 2 warps, maxnreg 128; 4 warps 5.80, without maxnreg 5.87, chunk 256 6.39, chunk 1024 6.04).
BWD_TIME_CONFIG = dict(steps=8, prefetch=True, copies=64, block_d=1, chunk=None, num_warps=None, unroll=False,
                       num_stages=None, maxnreg=None)


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


def _unpermute(x: torch.Tensor, l: int, T: int, K: int) -> torch.Tensor:
    """The step order of ``_atomic_rows``' slots: x (..., nchunks * T * K) -> (..., l)."""
    if K == 8:
        x = x.unflatten(-1, (-1, 2, T, 4)).transpose(-3, -2).flatten(-4)
    return x[..., :l]


@triton.jit
def _cols8(v, T: tl.constexpr):
    """The 8 columns (T,) of a (T, 8) tile, through register-local reshapes and splits."""
    x0, x1 = tl.split(tl.reshape(v, (T, 2, 2, 2)))  # column 4 a + 2 b + c: split c, then b, then a
    x00, x01 = tl.split(x0)
    x10, x11 = tl.split(x1)
    c0, c4 = tl.split(x00)
    c2, c6 = tl.split(x01)
    c1, c5 = tl.split(x10)
    c3, c7 = tl.split(x11)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, T: tl.constexpr):
    """The (T, 8) tile of 8 columns (the inverse of ``_cols8``)."""
    x00 = tl.join(c0, c4)
    x01 = tl.join(c2, c6)
    x10 = tl.join(c1, c5)
    x11 = tl.join(c3, c7)
    return tl.reshape(tl.join(tl.join(x00, x01), tl.join(x10, x11)), (T, 8))


@triton.jit
def _rev_rows8(a, b, T: tl.constexpr):
    """The reverse first-order scan g_j = b_j + a_j g_{j+1} inside each row of (T, 8) tiles, from g = 0 after
    the row, written out column by column (Triton's reverse=True scan reverses the lanes too, 32 shuffles a
    state). Returns the row aggregates (product of a, g at column 0) and the (T, 8) tile of (g, product of a
    from the column to the row's end) packed for ``_rev_rows8_fix``."""
    a0, a1, a2, a3, a4, a5, a6, a7 = _cols8(a, T)
    b0, b1, b2, b3, b4, b5, b6, b7 = _cols8(b, T)
    s6 = b6 + a6 * b7
    p6 = a6 * a7
    s5 = b5 + a5 * s6
    p5 = a5 * p6
    s4 = b4 + a4 * s5
    p4 = a4 * p5
    s3 = b3 + a3 * s4
    p3 = a3 * p4
    s2 = b2 + a2 * s3
    p2 = a2 * p3
    s1 = b1 + a1 * s2
    p1 = a1 * p2
    s0 = b0 + a0 * s1
    p0 = a0 * p1
    return p0, s0, (_join8(s0, s1, s2, s3, s4, s5, s6, b7, T), _join8(p0, p1, p2, p3, p4, p5, p6, a7, T))


@triton.jit
def _rev_rows8_fix(sp, post, T: tl.constexpr):
    """g of every step from ``_rev_rows8``'s partial sums and g after each row (T,)."""
    return sp[0] + sp[1] * post[:, None]


@triton.jit
def _kt_bwd_state_in(n, A_ptr, B_base, C_base, st_ptr, carry, d64, t, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl,
                     s_stn, CONST_BC: tl.constexpr):
    """What state n of a chunk loads: A[d, n], B_n, C_n ((T, K) tiles, or scalars when constant, in B's and
    C's dtypes), the state saved before the chunk and g at the step after it (both (T,), equal in all lanes)."""
    A_n = tl.load(A_ptr + d64 * s_Ad + n * s_An).to(tl.float32)
    if CONST_BC:
        B_n = tl.load(B_base + n * s_Bn)
        C_n = tl.load(C_base + n * s_Cn)
    else:
        B_n = tl.load(B_base + n * s_Bn + t * s_Bl, mask=m2, other=0.0)
        C_n = tl.load(C_base + n * s_Cn + t * s_Cl, mask=m2, other=0.0)
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
    T: tl.constexpr, K: tl.constexpr, SEGS_PER_CHUNK: tl.constexpr, PREFETCH: tl.constexpr,
    COPIES: tl.constexpr,
):
    """The backward as the (T, K) forward: one channel of one batch row per program, grid (d, b), chunks of
    T * K steps (a multiple of the forward's checkpoint spacing) from the last to the first, row i (one thread
    when T = 32 num_warps) holding the K contiguous steps i K .. i K + K - 1. Per state n:
    - the forward states h (as ``_scan_time_fwd_kt_kernel``: the scan along K in each thread, the scan of the
      row aggregates across lanes, the chunk's saved start state);
    - g_t = dL/dh_t = dy_t C_n,t + dA_{t+1} g_{t+1} by the same two-level scan run in reverse on the pairs
      (dA_{t+1}, dy_t C_n,t): dA_{t+1} comes from delta loaded once more, one step later (no shift across
      lanes), and g at the step after the chunk (dlast for the last chunk) is carried in dh0 (every lane stores
      and reloads the same value, as the forward's carry);
    - w = g (h - dt u B) (= g_t dA_t h_{t-1}) into ddt (w A_n) and dA (sum of w dt, a (NP,) register
      accumulator), g B into du and ddt, h C into dz, and per-step dB = g dt u, dC = dy h with relaxed fp32
      atomics (16-byte vector reductions of K contiguous steps; constant B/C: per-program sums instead).
    After the last (first in time) chunk, dh0 = g_0 dA_0. Arguments as ``_scan_bwd_time_kernel``'s."""
    CHUNK: tl.constexpr = T * K
    d64 = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    LP = tl.cdiv(L, CHUNK) * CHUNK  # per-step dB, dC: (COPIES, b, g, n, LP) in ``_atomic_rows``' slot order
    rows = tl.arange(0, T)
    cols = tl.arange(0, K)
    offs = rows[:, None] * K + cols[None, :]
    first_col = (cols == 0)[None, :]
    last_col = (cols == K - 1)[None, :]
    prev_row = tl.maximum(rows - 1, 0)
    next_row = tl.minimum(rows + 1, T - 1)
    first_row = rows == 0
    last_row = rows == T - 1
    offs_n = tl.arange(0, NP)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d64).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d64).to(tl.float32)
    if CONST_BC:
        B_base = B_ptr + d64 * s_Bx
        C_base = C_ptr + d64 * s_Cx
        dBC_base = dB_ptr  # placeholder
    else:
        group = (d64 // DIM_PER_GROUP).to(tl.int64)
        B_base = B_ptr + pid_b * s_Bb + group * s_Bx
        C_base = C_ptr + pid_b * s_Cb + group * s_Cx
        # COPIES partial copies of dB, dC: channel d adds into copy d % COPIES (fewer atomics on one address)
        dBC_base = (((d64 % COPIES) * tl.num_programs(1) + pid_b) * NGROUPS + group) * NSTATE * LP
    u_base = u_ptr + pid_b * s_ub + d64 * s_ud
    dt_base = dt_ptr + pid_b * s_dtb + d64 * s_dtd
    z_base = z_ptr + pid_b * s_zb + d64 * s_zd
    g_base = dout_ptr + pid_b * s_gb + d64 * s_gd
    o_base = (pid_b * DIM + d64) * L  # contiguous (b, d, l) outputs
    seq_base = seq_ptr + pid_b * s_sb
    carry = dh0_ptr + (pid_b * DIM + d64) * NSTATE + rows * 0  # (T,) all equal: g after the current chunk
    for n in tl.static_range(NSTATE):
        g_end = tl.zeros([T], dtype=tl.float32)
        if HAS_DLAST:
            g_end = tl.load(dlast_ptr + (pid_b * DIM + d64) * NSTATE + n + rows * 0)
        tl.store(carry + n, g_end)
    st_row = states_ptr + pid_b * s_stb + d64 * s_std + rows * 0
    x0 = tl.load(dt_base + rows * 0).to(tl.float32) + bias  # dt at step 0 (no packed-sequence start there)
    dt0 = x0
    if SOFTPLUS:
        dt0 = _softplus(x0)
    dA_acc = tl.zeros([NP], dtype=tl.float32)
    dBc_acc = tl.zeros([NP], dtype=tl.float32)
    dCc_acc = tl.zeros([NP], dtype=tl.float32)
    dD_acc = 0.0
    dbias_acc = 0.0
    nchunks = tl.cdiv(L, CHUNK)
    for i in range(pid_b * 0, nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + offs  # (T, K) int64
        m2 = t < L
        mn = (t + 1) < L
        st_ptr = st_row + (c * SEGS_PER_CHUNK) * s_stc
        u = tl.load(u_base + t, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(dt_base + t, mask=m2, other=0.0).to(tl.float32)
        xn = tl.load(dt_base + t + 1, mask=mn, other=0.0).to(tl.float32)  # delta one step later: dA_{t+1}
        dy = tl.load(g_base + t, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_base + t, mask=m2, other=0.0).to(tl.float32)
        if HAS_SEQ:
            reset = _seq_reset(seq_base, t, m2, s_sl)
            reset_n = _seq_reset(seq_base, t + 1, mn, s_sl)
        if PREFETCH:
            A_n, B_n, C_n, h_start, g_end = _kt_bwd_state_in(0, A_ptr, B_base, C_base, st_ptr, carry, d64, t, m2,
                                                             s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl, s_stn, CONST_BC)
        if HAS_BIAS:
            x += bias
            xn += bias
        dt = x
        dtn = xn
        if SOFTPLUS:
            dt = _softplus(x)
            dtn = _softplus(xn)
        dt = tl.where(m2, dt, 0.0)
        dtn = tl.where(mn, dtn, 0.0)  # past the end: dA = 1, the gradient passes through
        dtu = dt * u
        if HAS_Z:
            dy = dy * zv * tl.sigmoid(zv)  # dL/d(y + D u)
        ddt_acc = tl.zeros([T, K], dtype=tl.float32)  # sum_n w A_n
        gB_acc = tl.zeros([T, K], dtype=tl.float32)  # sum_n g B_n
        y_acc = tl.zeros([T, K], dtype=tl.float32)  # sum_n h C_n
        for n in tl.static_range(NSTATE):
            if PREFETCH:
                if n + 1 < NSTATE:  # the next state's loads, before this state's stores
                    A_nx, B_nx, C_nx, h_nx, g_nx = _kt_bwd_state_in(
                        n + 1, A_ptr, B_base, C_base, st_ptr, carry, d64, t, m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl,
                        s_stn, CONST_BC)
            else:
                A_n, B_n, C_n, h_start, g_end = _kt_bwd_state_in(n, A_ptr, B_base, C_base, st_ptr, carry, d64, t,
                                                                 m2, s_Ad, s_An, s_Bn, s_Bl, s_Cn, s_Cl, s_stn,
                                                                 CONST_BC)
            Bf = B_n.to(tl.float32)
            Cf = C_n.to(tl.float32)
            a2 = A_n * 1.4426950408889634  # exp(x) = exp2(x log2 e)
            dA = tl.exp2(dt * a2)
            dAn = tl.exp2(dtn * a2)
            if HAS_SEQ:
                dA = tl.where(reset, 0.0, dA)
                dAn = tl.where(reset_n, 0.0, dAn)
            dBu = dtu * Bf
            # forward states
            cA, hs = tl.associative_scan((dA, dBu), 1, _recurrence_combine)
            ra = tl.sum(tl.where(last_col, cA, 0.0), axis=1)
            rb = tl.sum(tl.where(last_col, hs, 0.0), axis=1)
            pa, pb = tl.associative_scan((ra, rb), 0, _recurrence_combine)
            ends = pb + pa * h_start
            pre = tl.where(first_row, h_start, tl.gather(ends, prev_row, 0))
            h = hs + cA * pre[:, None]
            # g, the same scan in reverse (Triton passes the later aggregate first: the same combine)
            if K == 8:
                qa, qb, g = _rev_rows8(dAn, dy * Cf, T)
            else:
                cR, gs = tl.associative_scan((dAn, dy * Cf), 1, _recurrence_combine, reverse=True)
                qa = tl.sum(tl.where(first_col, cR, 0.0), axis=1)
                qb = tl.sum(tl.where(first_col, gs, 0.0), axis=1)
            sa, sb = tl.associative_scan((qa, qb), 0, _recurrence_combine, reverse=True)
            starts = sb + sa * g_end  # g at each row's first step
            post = tl.where(last_row, g_end, tl.gather(starts, next_row, 0))
            if K == 8:
                g = _rev_rows8_fix(g, post, T)
            else:
                g = gs + cR * post[:, None]
            g_first = tl.gather(starts, rows * 0, 0)  # g at the chunk's first step
            if c == 0:  # then dh0 = dL/dh_{-1} = dA_0 g_0, stored in place (a read-modify-write of the
                # carry after the loop would race between warps)
                g_first *= tl.exp2(dt0 * a2)
            tl.store(carry + n, g_first)
            w = g * (h - dBu)  # g_t dA_t h_{t-1} = dL/d(dt_t A_n)
            ddt_acc += w * A_n
            gB_acc += g * Bf
            if HAS_Z:
                y_acc += h * Cf
            dA_acc = tl.where(offs_n == n, dA_acc + tl.sum(tl.sum(w * dt, axis=1), axis=0), dA_acc)
            if CONST_BC:
                dBc_acc = tl.where(offs_n == n, dBc_acc + tl.sum(tl.sum(g * dtu, axis=1), axis=0), dBc_acc)
                dCc_acc = tl.where(offs_n == n, dCc_acc + tl.sum(tl.sum(dy * h, axis=1), axis=0), dCc_acc)
            else:
                _atomic_rows(dB_ptr + dBC_base + n * LP + c * CHUNK, g * dtu, rows, L - c * CHUNK, T, K)
                _atomic_rows(dC_ptr + dBC_base + n * LP + c * CHUNK, dy * h, rows, L - c * CHUNK, T, K)
            if PREFETCH:
                if n + 1 < NSTATE:
                    A_n, B_n, C_n, h_start, g_end = A_nx, B_nx, C_nx, h_nx, g_nx
        # u, delta, z and dout again (cache hits) rather than live in registers through the state loop
        u = tl.load(u_base + t, mask=m2, other=0.0).to(tl.float32)
        du = gB_acc * dt
        ddt = ddt_acc + gB_acc * u
        if HAS_D:
            du += Dv * dy
            dD_acc += tl.sum(tl.sum(dy * u, axis=1), axis=0)
        if HAS_Z:
            zv = tl.load(z_base + t, mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zv)
            y = y_acc
            if HAS_D:
                y += Dv * u
            dzf = tl.load(g_base + t, mask=m2, other=0.0).to(tl.float32) * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + o_base + t, (dzf * y).to(dz_ptr.dtype.element_ty), mask=m2)  # dout y dsilu(z)
        if SOFTPLUS:
            x = tl.load(dt_base + t, mask=m2, other=0.0).to(tl.float32) + bias
            ddt *= tl.where(x > 20.0, 1.0, tl.sigmoid(x))  # softplus is linear above 20, as in torch
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(tl.sum(ddt, axis=1), axis=0)
        tl.store(du_ptr + o_base + t, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + o_base + t, ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    nmask = offs_n < NSTATE
    bdn = (pid_b * DIM + d64) * NSTATE + offs_n
    tl.store(dA_ptr + bdn, dA_acc, mask=nmask)
    if CONST_BC:
        tl.store(dB_ptr + bdn, dBc_acc, mask=nmask)
        tl.store(dC_ptr + bdn, dCc_acc, mask=nmask)
    tl.store(dD_ptr + pid_b * DIM + d64, dD_acc)
    tl.store(dbias_ptr + pid_b * DIM + d64, dbias_acc)

# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

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
    block_d = min(cfg["block_d"], triton.next_power_of_2(d))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d={cfg['block_d']} must be a power of two")
    block_d = k._group_block_d(block_d, d, B)
    np_ = max(2, triton.next_power_of_2(A.shape[1]))
    if cfg.get("steps"):  # the (T, K) kernel
        steps = cfg["steps"]
        if steps & (steps - 1) or cfg["block_d"] != 1:
            raise ValueError(f"BWD_TIME_CONFIG steps={steps} (the (T, K) backward) must be a power of two, with "
                             f"block_d=1 (got {cfg['block_d']})")
        kk = min(steps, chunk // 2)
        rows = chunk // kk
        copies = cfg.get("copies") or 1
        if copies < 1:
            raise ValueError(f"BWD_TIME_CONFIG copies={copies} must be at least 1")
        # at most ~128 MB of copies for dB and dC together (1M tokens, n 16: 2 copies)
        g = B.shape[1] if B.dim() == 4 else 1
        copies = max(1, min(copies, (1 << 27) // max(1, 8 * u.shape[0] * g * A.shape[1] * l)))
        return dict(T=rows, K=kk, SEGS_PER_CHUNK=chunk // seg, NP=np_, PREFETCH=bool(cfg.get("prefetch", True)),
                    COPIES=min(copies, d), num_warps=cfg["num_warps"] or max(1, rows // 32))
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
        kernel, grid = _scan_bwd_time_kt_kernel, (d, b)
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
