"""Fused decode step: one Mamba layer's token in 3 (Mamba-2) or 4 (Mamba-1) launches instead of 6 or 7.

At batch 1 a CUDA-graph decode step is bound by the number of kernels, not by bytes: every launch costs a few
microseconds however little it does, and the unfused step launches one kernel per op (residual add + RMSNorm,
in_proj, conv update, [x_proj, dt_proj,] state update, [gated norm,] out_proj). The fused step:

    Mamba-2: [add + RMSNorm + in_proj + conv window + conv]  [state update (ops.state_update's kernel)]
             [gated RMSNorm + out_proj]
    Mamba-1: [add + RMSNorm + in_proj + conv window + conv]  [x_proj]
             [dt_proj + softplus + state update + D + gate]  [out_proj]

Linear layers are matrix-vector products. By default (``_gemv_whole_kernel``, K <= MAX_WHOLE_K) a program
holds the whole weight rows of its outputs in registers (as two power-of-two tiles, so that K = 2560 is not
padded to 4096) and reads each input row once, normalising it there; at batch 1 with long rows (K >
GEMV_CONFIG["loop_min_k"]) the programs are persistent and load their next block of rows ahead;
``_gemv_kernel`` instead streams K through a pipelined tl.dot (larger K, or GEMV_CONFIG["kernel"] = "dot").
On sm_90+ every fused kernel is launched with programmatic dependent launch: it loads its parameters, then
waits for the previous kernel (``_grid_wait``), so the weight read overlaps the previous kernel's tail. The
program that produces a conv channel's new input (in in_proj) also shifts that channel's window and computes
its conv + SiLU output, so every window column has one owner and nothing reads a window that another program
is writing.

Numerics follow the unfused ops: statistics and accumulation in fp32, and intermediates are rounded to the
activation dtype where the unfused step stores them (normalised input, conv output, dt_proj output), so the
fused and unfused steps differ only in summation order.

The fused path serves small batches on the GPU (``fused_decode_applies``); larger batches are matrix products
that cuBLAS does better, and the CPU runs the unfused ops. Mamba-2 layers above MAX_FUSED_WEIGHT (larger than
2.7b's, not measured) keep cuBLAS' in_proj (LARGE_MAMBA2_STEP). Reading order: references (the unfused ops
composed) -> Triton kernels -> launchers -> public functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_conv1d import causal_conv1d_update
from .dispatch import num_sms, pdl_supported, use_triton
from .norms import rms_norm_fn, rmsnorm_fn
from .state_update import selective_state_update

try:
    import triton
    import triton.language as tl

    from .state_update import _grid_wait, _normalize, _softplus, _update_triton
except ImportError:  # the references need no Triton
    triton = None

# Measured on an H200 (notes/gpu_run4, CUDA graphs, fp16): with the whole-K GEMV and PDL a batch-1 token takes
# 0.26 ms (Mamba-1 130m, unfused 0.68) and 0.25 ms (Mamba-2 130m, unfused 0.56); batch 2 wins too (0.31 / 0.40
# vs 0.75 / 0.54 ms), batch 4 is even for Mamba-2 (0.59 vs 0.57). At 2.8b see MAX_FUSED_WEIGHT.
MAX_FUSED_BATCH = 2  # rows per fused step (the kernels take up to 16, the dot's row tile)
# Mamba-2 in_proj weight elements (130m: 2.6M, 2.7b: 27M) above which LARGE_MAMBA2_STEP is used. With the
# whole-row GEMV split into power-of-two tiles (GEMV_CONFIG split) the fused step wins at 2.7b: H200, b1 CUDA
# graphs (notes/gpu_run9/call1) 1.955 / 2.088 ms/token fused over two captures against 2.642 / 2.683 unfused
# (with one padded tile it lost: 2.72 vs 3.0). Larger layers (d_model 4096: 76M) were not measured, so they
# keep cuBLAS' in_proj (LARGE_MAMBA2_STEP). Mamba-1 ignores this limit (2.8b fused: 2.13-2.31 vs 3.13 ms
# unfused).
MAX_FUSED_WEIGHT = 1 << 25
# Mamba-2 layers above MAX_FUSED_WEIGHT: "unfused" runs the unfused step (7 kernels a layer at 2.7b: norm,
# in_proj, conv, state update, gated norm, out_proj and cuBLAS' split-K reduce); "fused_out" keeps the norm and
# cuBLAS' in_proj but fuses the gated norm into the out_proj GEMV (5 kernels). scripts/gpu_check_generate.py
# times both. H200, 2.7b, b1 CUDA graphs (notes/gpu_run8): unfused 2.49-2.69 ms/token over 6 captures,
# fused_out 2.47-2.63 over 3 with one padded tile; split tiles (gpu_run9): fused_out 2.432 / 2.408.
LARGE_MAMBA2_STEP = "fused_out"
# GEMV launch. kernel: "whole" (_gemv_whole_kernel: a program holds its rows' whole weight slice, loaded before
# the grid-dependency wait, for K <= MAX_WHOLE_K), "loop" (the same kernel on a persistent grid of
# loop_programs_per_sm programs an SM at batch 1, each loading its next block while reducing the current one)
# or "dot" (_gemv_kernel: K streamed through a pipelined tl.dot).
# whole / loop: weight elements per block and programs per SM aimed at, split (a row as two power-of-two tiles
# instead of one padded one); dot: programs per SM, K slice per dot, pipeline depth; both: warps. pdl:
# programmatic dependent launch on sm_90+ (each fused kernel starts while the previous one finishes and waits
# for it only after loading its parameters). scripts/gpu_check_generate.py and gpu_bench_decode_ops.py time
# variants of these. H200, fp16, us a call with a fresh weight each call (HBM rates; gpu_run9/call1 --sweep),
# elements 32768, 4 warps: Mamba-2 2.7b in_proj (add + norm + conv window, 54 MB) 21.28 -> 17.03 with split
# (cuBLAS alone 16.11), its gated norm + out_proj (26 MB) 12.72 -> 10.03 (cuBLAS alone 11.68), Mamba-1 2.8b
# in_proj 19.77 -> 17.08; a plain (2560, 5120) linear 8.2-8.6 either way. 8 warps, other elements and the dot
# kernel were slower at every shape.
# loop_min_k: with kernel "whole", batch-1 GEMVs with K above it take the loop kernel (loop_elements weights a
# block, loop_programs_per_sm programs an SM; None: never). Long rows make blocks of a few outputs, and the loop
# normalises the input row once a program instead of once a block: H200, us a call (gpu_run9/call3 --sweep),
# Mamba-2 2.7b gated norm + out_proj (2560, 5120) 9.67 -> 8.91, a plain (2560, 5120) linear 8.13 -> 7.19 with
# 16384 elements and 4 programs an SM; at K = 2560 (in_proj) the loop lost (17.35 at best vs 16.26).
GEMV_CONFIG = dict(kernel="whole", elements=32768, whole_programs_per_sm=2, split=True, loop_min_k=4096,
                   loop_elements=16384, loop_programs_per_sm=4, programs_per_sm=4, block_k=256, num_stages=3,
                   num_warps=4, pdl=True)
MAX_WHOLE_K = 8192  # the whole kernel keeps a (rows, K rounded up to one or two powers of two) tile in registers
UPDATE_TILE = 4096  # state elements per program of the Mamba-1 state update kernel
# True: the state updates load the SSM state before their grid-dependency wait (under PDL the read overlaps
# in_proj's or x_proj's tail). Safe in the decode step: the kernel before never touches the state, and the
# state's last writer, this layer's update a token earlier, has finished (PDL lets a kernel start only once the
# one before it has waited for its own predecessor). H200, b1 CUDA graphs, ms/token, alternated captures in one
# run (notes/gpu_run9/call4), True vs False: Mamba-2 2.7b 1.94-1.99 vs 2.00-2.03, Mamba-1 130m 0.249-0.257 vs
# 0.257-0.285, but Mamba-2 130m 0.245-0.282 vs 0.209-0.246 and Mamba-1 2.8b 1.87-2.08 vs 1.85-1.94: no gain
# shown across the four, so it stays off. The GPU decode tests pass both ways.
EARLY_STATE = False


def fused_decode_applies(x: torch.Tensor, in_proj_weight: torch.Tensor | None = None) -> bool:
    """True when a decode step on ``x`` (batch, 1, d_model) should take the fused path: Triton's backend,
    a small batch, a dtype the kernels compute in fp32 (not fp64) and, when given, an in_proj weight small
    enough that the step is bound by launches rather than by reading weights."""
    return (x.dim() == 3 and x.shape[0] <= MAX_FUSED_BATCH and x.dtype != torch.float64 and use_triton(x)
            and (in_proj_weight is None or in_proj_weight.numel() <= MAX_FUSED_WEIGHT))


# ----------------------------------------------------------------------------------------------------------
# References: the unfused ops composed (the specification)
# ----------------------------------------------------------------------------------------------------------

def norm_linear_ref(x, weight, norm_weight, eps, residual=None, residual_in_fp32=False, bias=None,
                    conv_state=None, conv_start=0, conv_weight=None, conv_bias=None):
    """out = linear(rmsnorm(x + residual)); with a conv window, it takes out[:, conv_start:conv_start + c] and
    the new conv + SiLU output is returned too.

    x, residual: (b, k); weight: (n, k); norm_weight: (k,); conv_state: (b, c, w); conv_weight: (c, w).
    Returns (out (b, n), residual out (b, k) in the dtype ``rms_norm_fn(..., prenorm=True)`` gives), plus
    conv_out (b, c) in out's dtype when conv_state is given.
    """
    h, res = rms_norm_fn(x, norm_weight, None, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32,
                         eps=eps)
    out = F.linear(h, weight, bias)
    if conv_state is None:
        return out, res
    conv_out = causal_conv1d_update(out[:, conv_start:conv_start + conv_state.shape[1]], conv_state, conv_weight,
                                    conv_bias, activation="silu")  # shifts the window in place
    return out, res, conv_out


def gated_norm_linear_ref(y, z, norm_weight, eps, group_size, norm_before_gate, weight, bias=None):
    """linear(gated RMSNorm(y, z)): y, z (b, k) -> (b, n)."""
    return F.linear(rmsnorm_fn(y, norm_weight, None, z=z, eps=eps, group_size=group_size,
                               norm_before_gate=norm_before_gate), weight, bias)


def mamba2_state_update(zxbcdt, xBC, ssm_state, A, D, dt_bias, dt_limit, ngroups, dt_start, z_start=None):
    """Mamba-2's state update from the conv output xBC (b, h*p + 2*g*n) and in_proj's output zxbcdt (dt, z):
    ``selective_state_update`` (one Triton kernel on the GPU) on views of them, so it needs no kernel here.

    ssm_state: (b, h, p, n) updated in place; A, dt_bias: (h,) fp32; D: (h,) or (h, p); z_start: where z's
    columns start when the state update gates (no gated norm after it). Returns y (b, h*p) in xBC's dtype.
    A dt_limit other than (0, inf) costs a softplus and a clamp before the kernel, as in the unfused step.
    """
    b, h, p, n = ssm_state.shape
    x, B, C = torch.split(xBC, [h * p, ngroups * n, ngroups * n], dim=-1)
    dt = zxbcdt[:, dt_start:dt_start + h]
    if tuple(dt_limit) != (0.0, float("inf")):
        dt, dt_bias = F.softplus(dt.float() + dt_bias).clamp(*dt_limit), None
    z = None if z_start is None else zxbcdt[:, z_start:z_start + h * p].reshape(b, h, p)
    args = (ssm_state, x.reshape(b, h, p), dt, A, B.reshape(b, ngroups, n), C.reshape(b, ngroups, n), D, z, dt_bias)
    if use_triton(xBC):  # the op's kernel, launched with PDL like the fused kernels around it
        y = _update_triton(*_normalize(*args, None), dt_bias is not None, pdl=_pdl(xBC.device),
                           early_state=EARLY_STATE)
    else:
        y = selective_state_update(*args[:7], z=z, dt_bias=dt_bias, dt_softplus=dt_bias is not None)
    return y.reshape(b, h * p)


def mamba1_state_update_ref(x, x_dbl, dt_proj_weight, dt_bias, ssm_state, A, D, z):
    """Mamba-1's dt_proj + state update: x (b, d) the conv output, x_dbl (b, r + 2n) x_proj's [dt, B, C];
    dt_proj_weight: (d, r); dt_bias, D: (d,) fp32; A: (d, n) fp32; z: (b, d) or None; ssm_state: (b, d, n).
    Returns y (b, d) in x's dtype."""
    n = ssm_state.shape[-1]
    dt, B, C = torch.split(x_dbl, [dt_proj_weight.shape[1], n, n], dim=-1)
    return selective_state_update(ssm_state, x, F.linear(dt, dt_proj_weight), A, B, C, D, z=z, dt_bias=dt_bias,
                                  dt_softplus=True)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gemv_input(k, mask_k, offs_m, mask_m, x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm,
                    PRO: tl.constexpr, HAS_RES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
        """The input slice (rows offs_m, columns k) before normalisation, fp32, and the gate silu(z) (PRO 2):
        (BLOCK_M, BLOCK_K) tiles for the products, (BLOCK_S,) slices of one row for the statistics."""
        m64 = offs_m.to(tl.int64)
        m2 = mask_m & mask_k
        gate = tl.zeros(m2.shape, dtype=tl.float32)
        v = tl.load(x_ptr + m64 * s_xm + k, mask=m2, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(r_ptr + m64 * s_rm + k, mask=m2, other=0.0).to(tl.float32)
        if PRO == 2:
            zv = tl.load(z_ptr + m64 * s_zm + k, mask=m2, other=0.0).to(tl.float32)
            gate = zv * tl.sigmoid(zv)
            if not NORM_BEFORE_GATE:
                v = v * gate
        return v, gate

    @triton.jit
    def _gemv_kernel(
        x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, ro_ptr, win_ptr, cw_ptr, cb_ptr, co_ptr,
        M, N, K, eps, GROUP, NGROUPS, SHIFT_START, SHIFT_COLS,
        s_xm, s_rm, s_zm, s_wn, s_om, s_rom, s_wb, s_wc, s_wk, s_cwc, s_cwk, s_com,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_CB: tl.constexpr, SHIFT: tl.constexpr, D_CONV: tl.constexpr, BLOCK_J: tl.constexpr, NG: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
    ):
        """out (M, N) = prologue(input) @ w.T (+ bias). PRO: 0 plain input, 1 RMSNorm of x (+ residual; program 0
        writes the sum to ro), 2 gated RMSNorm per group of GROUP channels (NGROUPS <= NG). SHIFT: output
        columns SHIFT_START.. SHIFT_START + SHIFT_COLS enter the window (M, SHIFT_COLS, D_CONV), and the conv +
        SiLU of the new window goes to co (M, SHIFT_COLS).

        The statistics come first, a row (ROWS <= BLOCK_M of them, M real) in slices of BLOCK_S; the products are
        one tl.dot per K slice on rows padded to BLOCK_M (16, the dot's minimum), so the weight loads are
        software-pipelined over NUM_STAGES slices."""
        _grid_wait(PDL)
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        m64 = offs_m.to(tl.int64)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        n64 = offs_n.to(tl.int64)
        ar_k = tl.arange(0, BLOCK_K)
        ar_s = tl.arange(0, BLOCK_S)
        g_ar = tl.arange(0, NG)
        rstd = tl.zeros([BLOCK_M, NG], dtype=tl.float32)  # per row and group (one group for PRO 1)
        if PRO == 1 or PRO == 2:
            span = K if PRO == 1 else GROUP
            for m in tl.static_range(ROWS):
                if m < M:
                    for g in range(NGROUPS if PRO == 2 else 1):
                        ss = tl.zeros([BLOCK_S], dtype=tl.float32)
                        for k0 in range(0, span, BLOCK_S):
                            k = g * span + k0 + ar_s
                            mk = (k0 + ar_s) < span
                            v, _ = _gemv_input(k, mk, tl.zeros([BLOCK_S], dtype=tl.int32) + m, True,
                                               x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm,
                                               PRO, HAS_RES, NORM_BEFORE_GATE)
                            ss += v * v
                            if PRO == 1 and pid == 0:
                                tl.store(ro_ptr + m * s_rom + k, v.to(ro_ptr.dtype.element_ty), mask=mk)
                        r = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / span + eps)
                        rstd = tl.where((offs_m[:, None] == m) & (g_ar[None, :] == g), r, rstd)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + ar_k
            mask_k = k < K
            v, gate = _gemv_input(k[None, :], mask_k[None, :], offs_m[:, None], mask_m[:, None],
                                  x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm,
                                  PRO, HAS_RES, NORM_BEFORE_GATE)
            if PRO == 1 or PRO == 2:
                if NG == 1:
                    r = rstd
                else:
                    in_g = (k // GROUP)[None, None, :] == g_ar[None, :, None]  # (1, NG, BLOCK_K)
                    r = tl.sum(tl.where(in_g, rstd[:, :, None], 0.0), axis=1)  # (BLOCK_M, BLOCK_K)
                v = v * r * tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
                if PRO == 2 and NORM_BEFORE_GATE:
                    v = v * gate
            # the unfused op stores its output in the activation dtype: the dot takes it rounded the same way
            a = v.to(out_ptr.dtype.element_ty).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + n64[None, :] * s_wn + k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                        other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + m64[:, None] * s_om + n64[None, :], out, mask=mask_m[:, None] & mask_n[None, :])
        if SHIFT:
            if (pid * BLOCK_N < SHIFT_START + SHIFT_COLS) & (pid * BLOCK_N + BLOCK_N > SHIFT_START):
                c = offs_n - SHIFT_START
                j = tl.arange(0, BLOCK_J)[None, None, :]
                mc2 = (mask_n & (c >= 0) & (c < SHIFT_COLS))[None, :] & mask_m[:, None]  # (BLOCK_M, BLOCK_N)
                mc = mc2[:, :, None]
                c64 = tl.where(mask_n & (c >= 0), c, 0).to(tl.int64)
                ptrs = win_ptr + m64[:, None, None] * s_wb + c64[None, :, None] * s_wc + j * s_wk
                old = tl.load(ptrs + s_wk, mask=mc & (j < D_CONV - 1), other=0.0)
                new = tl.where(j == D_CONV - 1, out[:, :, None].to(win_ptr.dtype.element_ty), old)
                tl.debug_barrier()  # every old value is read before any is overwritten
                tl.store(ptrs, new, mask=mc & (j < D_CONV))
                cw = tl.load(cw_ptr + c64[None, :, None] * s_cwc + j * s_cwk, mask=mc & (j < D_CONV),
                             other=0.0).to(tl.float32)
                conv = tl.sum(new.to(tl.float32) * cw, axis=2)  # (BLOCK_M, BLOCK_N)
                if HAS_CB:
                    conv += tl.load(cb_ptr + c64, mask=mask_n & (c >= 0) & (c < SHIFT_COLS),
                                    other=0.0).to(tl.float32)[None, :]
                conv = conv * tl.sigmoid(conv)
                tl.store(co_ptr + m64[:, None] * s_com + c64[None, :], conv.to(co_ptr.dtype.element_ty), mask=mc2)

    @triton.jit
    def _whole_row(m, k, mask_k, pid, x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom,
                   PRO: tl.constexpr, HAS_RES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
        """Columns k of input row m for the whole-row kernels, fp32, before normalisation (program 0 stores the
        residual sum for PRO 1), and the gate silu(z) (PRO 2; applied already unless NORM_BEFORE_GATE)."""
        v, gate = _gemv_input(k, mask_k, k * 0 + m, True, x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm,
                              PRO, HAS_RES, NORM_BEFORE_GATE)
        if PRO == 1:
            if pid == 0:
                tl.store(ro_ptr + m * s_rom + k, v.to(ro_ptr.dtype.element_ty), mask=mask_k)
        return v, gate

    @triton.jit
    def _whole_scale(v, gate, r, nw, out_ptr, w_ptr, PRO: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
        """The normalised slice (v * rstd r * norm weight (* gate)), rounded as the unfused op stores it, fp32."""
        if PRO != 0:
            v = v * r * nw
            if PRO == 2 and NORM_BEFORE_GATE:
                v = v * gate
        return v.to(out_ptr.dtype.element_ty).to(w_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _whole_inputs(m, pid, k, mask_k, k2, mask_k2, nw, nw2, K, eps, GROUP,
                      x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom, out_ptr, w_ptr,
                      PRO: tl.constexpr, HAS_RES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, NG: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr):
        """Input row m normalised (statistics over the whole row, or per group of GROUP channels for PRO 2) and
        rounded as the unfused op stores it: its two tiles (columns k, k2; the second 0.0 without BLOCK_K2)."""
        v, gate = _whole_row(m, k, mask_k, pid, x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom,
                             PRO, HAS_RES, NORM_BEFORE_GATE)
        a2 = 0.0
        if BLOCK_K2 > 0:
            v2, gate2 = _whole_row(m, k2, mask_k2, pid, x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom,
                                   PRO, HAS_RES, NORM_BEFORE_GATE)
        r = 1.0
        r2 = 1.0
        if PRO == 1:
            ss = tl.sum(v * v, axis=0)
            if BLOCK_K2 > 0:
                ss += tl.sum(v2 * v2, axis=0)
            r = 1.0 / tl.sqrt(ss / K + eps)
            r2 = r
        if PRO == 2:  # per group of GROUP channels
            r = tl.zeros([BLOCK_K], dtype=tl.float32)
            if BLOCK_K2 > 0:
                r2 = tl.zeros([BLOCK_K2], dtype=tl.float32)
            for g in tl.static_range(NG):
                in_g = (k >= g * GROUP) & (k < g * GROUP + GROUP)
                sg = tl.sum(tl.where(in_g, v * v, 0.0), axis=0)
                if BLOCK_K2 > 0:
                    in_g2 = (k2 >= g * GROUP) & (k2 < g * GROUP + GROUP)
                    sg += tl.sum(tl.where(in_g2, v2 * v2, 0.0), axis=0)
                rg = 1.0 / tl.sqrt(sg / GROUP + eps)
                r = tl.where(in_g, rg, r)
                if BLOCK_K2 > 0:
                    r2 = tl.where(in_g2, rg, r2)
        a = _whole_scale(v, gate, r, nw, out_ptr, w_ptr, PRO, NORM_BEFORE_GATE)
        if BLOCK_K2 > 0:
            a2 = _whole_scale(v2, gate2, r2, nw2, out_ptr, w_ptr, PRO, NORM_BEFORE_GATE)
        return a, a2

    @triton.jit
    def _whole_weights(blk, N, w_ptr, s_wn, k, mask_k, k2, mask_k2, BLOCK_N: tl.constexpr,
                       BLOCK_K2: tl.constexpr):
        """The weight rows of output block blk as one or two tiles (BLOCK_N, BLOCK_K[2]); all masked (no
        memory read) past the last block. Also returns the block's outputs and their mask."""
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
        w = tl.load(rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w2 = w
        if BLOCK_K2 > 0:
            w2 = tl.load(rows + k2[None, :], mask=mask_n[:, None] & mask_k2[None, :], other=0.0)
        return w, w2, offs_n, mask_n

    @triton.jit
    def _whole_dot(w, w2, a, a2, BLOCK_K2: tl.constexpr):
        """(BLOCK_N,) fp32: the weight tiles reduced against the normalised input's tiles."""
        acc = tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        if BLOCK_K2 > 0:
            acc += tl.sum(w2.to(tl.float32) * a2[None, :], axis=1)
        return acc

    @triton.jit
    def _whole_shift(m, out, blk, own, c64, cw, cb, win_ptr, co_ptr, SHIFT_START, SHIFT_COLS, s_wb, s_wc, s_wk,
                     s_com, HAS_CB: tl.constexpr, D_CONV: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
        """Outputs out (BLOCK_N,) of block blk that enter the conv window (columns SHIFT_START ..) shift it and
        give the conv + SiLU output; own, c64, cw, cb: those outputs' ``_conv_params``."""
        if (blk * BLOCK_N < SHIFT_START + SHIFT_COLS) & (blk * BLOCK_N + BLOCK_N > SHIFT_START):
            j = tl.arange(0, BLOCK_J)[None, :]
            ptrs = win_ptr + m * s_wb + c64[:, None] * s_wc + j * s_wk
            old = tl.load(ptrs + s_wk, mask=own[:, None] & (j < D_CONV - 1), other=0.0)
            new = tl.where(j == D_CONV - 1, out[:, None].to(win_ptr.dtype.element_ty), old)
            tl.debug_barrier()  # every old value is read before any is overwritten
            tl.store(ptrs, new, mask=own[:, None] & (j < D_CONV))
            conv = tl.sum(new.to(tl.float32) * cw, axis=1)
            if HAS_CB:
                conv += cb
            conv = conv * tl.sigmoid(conv)
            tl.store(co_ptr + m * s_com + c64, conv.to(co_ptr.dtype.element_ty), mask=own)

    @triton.jit
    def _conv_params(offs_n, mask_n, cw_ptr, cb_ptr, SHIFT_START, SHIFT_COLS, s_cwc, s_cwk,
                     HAS_CB: tl.constexpr, D_CONV: tl.constexpr, BLOCK_J: tl.constexpr):
        """Of the outputs offs_n: which enter the conv window (own), their window columns (c64, int64), conv
        weights (BLOCK_N, BLOCK_J) and bias (BLOCK_N,)."""
        c = offs_n - SHIFT_START
        own = mask_n & (c >= 0) & (c < SHIFT_COLS)
        c64 = tl.where(own, c, 0).to(tl.int64)
        j = tl.arange(0, BLOCK_J)[None, :]
        cw = tl.load(cw_ptr + c64[:, None] * s_cwc + j * s_cwk, mask=own[:, None] & (j < D_CONV),
                     other=0.0).to(tl.float32)
        cb = 0.0
        if HAS_CB:
            cb = tl.load(cb_ptr + c64, mask=own, other=0.0).to(tl.float32)
        return own, c64, cw, cb

    @triton.jit
    def _gemv_whole_kernel(
        x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, ro_ptr, win_ptr, cw_ptr, cb_ptr, co_ptr,
        N, K, eps, GROUP, SHIFT_START, SHIFT_COLS,
        s_xm, s_rm, s_zm, s_wn, s_om, s_rom, s_wb, s_wc, s_wk, s_cwc, s_cwk, s_com,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_CB: tl.constexpr, SHIFT: tl.constexpr, D_CONV: tl.constexpr, BLOCK_J: tl.constexpr, NG: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
        LOOP: tl.constexpr, PDL: tl.constexpr,
    ):
        """out (ROWS, N) = prologue(input) @ w.T (+ bias), the same contract as _gemv_kernel, for
        K <= BLOCK_K + BLOCK_K2.

        A program owns blocks of BLOCK_N outputs and holds a block's whole (BLOCK_N, K) weight slice, the first
        loaded with the other parameters before the grid-dependency wait: under PDL the weight read, most of
        this kernel's bytes, overlaps the previous kernel. Each input row is then read once, normalised in
        registers (statistics over the whole row, or per group of GROUP channels for PRO 2) and reduced against
        the slice in fp32. The row is held as one power-of-two tile of BLOCK_K columns or, with BLOCK_K2 > 0,
        as two (columns 0 .. BLOCK_K - 1 and BLOCK_K .. BLOCK_K + BLOCK_K2 - 1): K = 2560 takes 2048 + 512
        registers a row instead of 4096, 37.5% of them masked.

        LOOP False: one block a program (grid = the blocks). LOOP True (ROWS 1): a persistent grid, each
        program walking blocks pid, pid + grid, ... and loading the next block's weights before reducing the
        current one, so its loads stay in flight between blocks (no wave tail, no program restarts)."""
        pid = tl.program_id(0)
        k = tl.arange(0, BLOCK_K)
        mask_k = k < K
        k2 = k
        mask_k2 = mask_k
        if BLOCK_K2 > 0:
            k2 = BLOCK_K + tl.arange(0, BLOCK_K2)
            mask_k2 = k2 < K
        # parameters only before the wait
        w, w2, offs_n, mask_n = _whole_weights(pid, N, w_ptr, s_wn, k, mask_k, k2, mask_k2, BLOCK_N, BLOCK_K2)
        nw = 0.0
        nw2 = 0.0
        if PRO != 0:
            nw = tl.load(nw_ptr + k, mask=mask_k, other=0.0).to(tl.float32)
            if BLOCK_K2 > 0:
                nw2 = tl.load(nw_ptr + k2, mask=mask_k2, other=0.0).to(tl.float32)
        if not LOOP:
            bias = 0.0
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if SHIFT:
                own, c64, cw, cb = _conv_params(offs_n, mask_n, cw_ptr, cb_ptr, SHIFT_START, SHIFT_COLS, s_cwc,
                                                s_cwk, HAS_CB, D_CONV, BLOCK_J)
        _grid_wait(PDL)
        if LOOP:
            a, a2 = _whole_inputs(0, pid, k, mask_k, k2, mask_k2, nw, nw2, K, eps, GROUP,
                                  x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom, out_ptr, w_ptr,
                                  PRO, HAS_RES, NORM_BEFORE_GATE, NG, BLOCK_K, BLOCK_K2)
            nblk = tl.cdiv(N, BLOCK_N)
            step = tl.num_programs(0)
            for blk in range(pid, nblk, step):
                wn, wn2, offs_nn, mask_nn = _whole_weights(blk + step, N, w_ptr, s_wn, k, mask_k, k2, mask_k2,
                                                           BLOCK_N, BLOCK_K2)  # the next block's, ahead
                acc = _whole_dot(w, w2, a, a2, BLOCK_K2)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                out = acc.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offs_n.to(tl.int64), out, mask=mask_n)
                if SHIFT:
                    own, c64, cw, cb = _conv_params(offs_n, mask_n, cw_ptr, cb_ptr, SHIFT_START, SHIFT_COLS, s_cwc,
                                                    s_cwk, HAS_CB, D_CONV, BLOCK_J)
                    _whole_shift(0, out, blk, own, c64, cw, cb, win_ptr, co_ptr, SHIFT_START, SHIFT_COLS,
                                 s_wb, s_wc, s_wk, s_com, HAS_CB, D_CONV, BLOCK_J, BLOCK_N)
                w, w2, offs_n, mask_n = wn, wn2, offs_nn, mask_nn
        else:
            n64 = offs_n.to(tl.int64)
            for m in tl.static_range(ROWS):
                a, a2 = _whole_inputs(m, pid, k, mask_k, k2, mask_k2, nw, nw2, K, eps, GROUP,
                                      x_ptr, s_xm, r_ptr, s_rm, z_ptr, s_zm, ro_ptr, s_rom, out_ptr, w_ptr,
                                      PRO, HAS_RES, NORM_BEFORE_GATE, NG, BLOCK_K, BLOCK_K2)
                acc = _whole_dot(w, w2, a, a2, BLOCK_K2) + bias  # (BLOCK_N,)
                out = acc.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + m * s_om + n64, out, mask=mask_n)
                if SHIFT:
                    _whole_shift(m, out, pid, own, c64, cw, cb, win_ptr, co_ptr, SHIFT_START, SHIFT_COLS,
                                 s_wb, s_wc, s_wk, s_com, HAS_CB, D_CONV, BLOCK_J, BLOCK_N)

    @triton.jit
    def _m1_update_kernel(
        x_ptr, xd_ptr, z_ptr, wdt_ptr, bias_ptr, st_ptr, A_ptr, D_ptr, out_ptr,
        DIM, NSTATE, R,
        s_xb, s_xdb, s_zb, s_wdd, s_wdr, s_sb, s_sd, s_sn, s_Ad, s_An, s_ob,
        HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EARLY_STATE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One program per (block of channels, batch row): dt = dt_proj(x_dbl[:r]) + bias, softplus, the Mamba-1
        state update (A per channel and state) and y = <state, C> + D x (* silu(z)), x the conv output.
        The parameters (dt_proj's weight, bias, A, D) load before the grid-dependency wait (PDL)."""
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < DIM
        d64 = offs_d.to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < NSTATE
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        mask_dn = mask_d[:, None] & mask_n[None, :]
        dty = xd_ptr.dtype.element_ty
        wdt = tl.load(wdt_ptr + d64[:, None] * s_wdd + offs_r[None, :] * s_wdr,
                      mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + d64[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        s_ptrs = st_ptr + pid_b * s_sb + d64[:, None] * s_sd + offs_n[None, :] * s_sn
        if EARLY_STATE:  # see decode.EARLY_STATE
            s = tl.load(s_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
        _grid_wait(PDL)
        xv = tl.load(x_ptr + pid_b * s_xb + d64, mask=mask_d, other=0.0).to(tl.float32)
        xd = xd_ptr + pid_b * s_xdb
        dt_in = tl.load(xd + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        dt = tl.sum(wdt * dt_in[None, :], axis=1).to(dty).to(tl.float32)  # dt_proj's output, as stored unfused
        if HAS_BIAS:
            dt += bias
        dt = _softplus(dt)
        Bv = tl.load(xd + R + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Cv = tl.load(xd + R + NSTATE + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if not EARLY_STATE:
            s = tl.load(s_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
        s = s * tl.exp(dt[:, None] * A) + (dt * xv)[:, None] * Bv[None, :]
        tl.store(s_ptrs, s.to(st_ptr.dtype.element_ty), mask=mask_dn)
        y = tl.sum(s * Cv[None, :], axis=1)
        if HAS_D:
            y += Dv * xv
        if HAS_Z:
            zv = tl.load(z_ptr + pid_b * s_zb + d64, mask=mask_d, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + pid_b * s_ob + d64, y.to(out_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _pdl(device) -> bool:
    """Launch the fused kernels with programmatic dependent launch (GEMV_CONFIG["pdl"], sm_90+, compiled)."""
    return GEMV_CONFIG["pdl"] and pdl_supported(device)


def _pdl_args(device) -> dict:
    """The PDL constexpr and launch option of a fused kernel launch, decided once."""
    return dict(PDL=True, launch_pdl=True) if _pdl(device) else dict(PDL=False)


def _whole_tiles(n: int, k: int, device, elements: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_K2) of _gemv_whole_kernel: a whole K row per output (one power-of-two tile,
    or two with GEMV_CONFIG["split"]: the largest power of two <= K, then the rest rounded up), at most
    ``elements`` (GEMV_CONFIG["elements"]) weights per block, and outputs spread so that about
    whole_programs_per_sm blocks run on every SM."""
    cfg = GEMV_CONFIG
    elements = elements or cfg["elements"]
    bk, bk2 = triton.next_power_of_2(k), 0
    if cfg.get("split") and bk != k:
        bk = bk // 2
        bk2 = triton.next_power_of_2(k - bk)
    spread = triton.cdiv(n, cfg["whole_programs_per_sm"] * num_sms(device))
    bn = min(max(1, elements // (bk + bk2)), 1 << (spread.bit_length() - 1), 64)
    return 1 << (bn.bit_length() - 1), bk, bk2  # a power of two (tl.arange): any "elements" value is valid


def _gemv_tiles(n: int, device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): enough programs to keep every SM reading weights (GEMV_CONFIG["programs_per_sm"])."""
    cfg = GEMV_CONFIG
    bn = max(16, min(128, triton.next_power_of_2(triton.cdiv(n, cfg["programs_per_sm"] * num_sms(device)))))
    return bn, cfg["block_k"]


def _gemv(x, weight, bias, *, pro, out_dtype, residual=None, res_out=None, z=None, norm_weight=None, eps=0.0,
          group=1, ngroups=1, norm_before_gate=False, window=None, conv_weight=None, conv_bias=None, shift_start=0):
    """Launches a GEMV kernel (GEMV_CONFIG["kernel"]) on x: (m, k); returns out (m, n), and the conv output (m, c)
    with a ``window``."""
    n, k = weight.shape
    m = x.shape[0]
    out = torch.empty(m, n, device=weight.device, dtype=out_dtype)
    dummy = weight
    x_, r_, z_, win_ = (t if t is not None else dummy for t in (x, residual, z, window))
    cw_ = conv_weight if conv_weight is not None else dummy
    conv_out = torch.empty(m, window.shape[1], device=weight.device, dtype=out_dtype) if window is not None else None
    d_conv = window.shape[-1] if window is not None else 1
    common = (
        x_, r_, z_, norm_weight if norm_weight is not None else dummy, weight,
        bias if bias is not None else dummy, out, res_out if res_out is not None else out, win_, cw_,
        conv_bias if conv_bias is not None else dummy, conv_out if conv_out is not None else out)
    strides = (
        x_.stride(0), r_.stride(0), z_.stride(0), weight.stride(0), out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        *(window.stride() if window is not None else (0, 0, 0)),
        *(cw_.stride() if conv_weight is not None else (0, 0)), conv_out.stride(0) if conv_out is not None else 0)
    flags = dict(
        PRO=pro, HAS_RES=residual is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        HAS_CB=conv_bias is not None, SHIFT=window is not None, D_CONV=d_conv, BLOCK_J=triton.next_power_of_2(d_conv))
    cfg = GEMV_CONFIG
    kind = cfg["kernel"]
    if kind in ("whole", "loop") and k <= MAX_WHOLE_K:
        loop = m == 1 and (kind == "loop" or (cfg["loop_min_k"] is not None and k > cfg["loop_min_k"]))
        bn, bk, bk2 = _whole_tiles(n, k, weight.device, cfg["loop_elements"] if loop else None)
        blocks = triton.cdiv(n, bn)
        grid = min(blocks, cfg["loop_programs_per_sm"] * num_sms(weight.device)) if loop else blocks
        _gemv_whole_kernel[(grid,)](
            *common, n, k, eps, group, shift_start, window.shape[1] if window is not None else 0, *strides,
            **flags, NG=ngroups if pro == 2 else 1, ROWS=m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_K2=bk2, LOOP=loop,
            num_warps=cfg["num_warps"] * (2 if bk + bk2 >= 8192 else 1), **_pdl_args(weight.device))
        return out if conv_out is None else (out, conv_out)
    bn, bk = _gemv_tiles(n, weight.device)
    span = k if pro == 1 else group
    _gemv_kernel[(triton.cdiv(n, bn),)](
        *common, m, n, k, eps, group, ngroups, shift_start, window.shape[1] if window is not None else 0, *strides,
        **flags, NG=triton.next_power_of_2(ngroups) if pro == 2 else 1, ROWS=triton.next_power_of_2(m),
        BLOCK_S=min(triton.next_power_of_2(span), 4096), BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
        NUM_STAGES=GEMV_CONFIG["num_stages"], DOT_PREC="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=GEMV_CONFIG["num_warps"], **_pdl_args(weight.device),
    )
    return out if conv_out is None else (out, conv_out)


def _rows_contiguous(*ts):
    """Kernels index rows by stride and columns by position: each tensor's last dim must be contiguous."""
    return all(t is None or t.stride(-1) == 1 for t in ts)


# ----------------------------------------------------------------------------------------------------------
# Public functions (the modules' fused decode steps call these)
# ----------------------------------------------------------------------------------------------------------

def norm_linear(x, weight, norm_weight, eps, residual=None, residual_in_fp32=False, bias=None, conv_state=None,
                conv_start=0, conv_weight=None, conv_bias=None):
    """Residual add + RMSNorm + linear (+ conv window and conv) in one kernel (see ``norm_linear_ref``)."""
    if not (use_triton(x) and _rows_contiguous(x, residual, weight)):
        return norm_linear_ref(x, weight, norm_weight, eps, residual, residual_in_fp32, bias, conv_state, conv_start,
                               conv_weight, conv_bias)
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    res_out = torch.empty(x.shape, device=x.device, dtype=res_dtype)
    out = _gemv(x, weight, bias, pro=1, out_dtype=x.dtype, residual=residual, res_out=res_out,
                norm_weight=norm_weight, eps=eps, window=conv_state, conv_weight=conv_weight, conv_bias=conv_bias,
                shift_start=conv_start)
    return (out, res_out) if conv_state is None else (out[0], res_out, out[1])


def gated_norm_linear(y, z, norm_weight, eps, group_size, norm_before_gate, weight, bias=None):
    """Gated RMSNorm + linear in one kernel (see ``gated_norm_linear_ref``)."""
    ngroups = y.shape[-1] // group_size
    if not (use_triton(y) and _rows_contiguous(y, z, weight) and ngroups <= 16):
        return gated_norm_linear_ref(y, z, norm_weight, eps, group_size, norm_before_gate, weight, bias)
    return _gemv(y, weight, bias, pro=2, out_dtype=y.dtype, z=z, norm_weight=norm_weight, eps=eps,
                 group=group_size, ngroups=ngroups, norm_before_gate=norm_before_gate)


def linear(x, weight, bias=None):
    """F.linear, as one GEMV kernel on the fused path (cuBLAS splits a long K into two kernels)."""
    if not (use_triton(x) and _rows_contiguous(x, weight)):
        return F.linear(x, weight, bias)
    return _gemv(x, weight, bias, pro=0, out_dtype=x.dtype)


def mamba1_state_update(x, x_dbl, dt_proj_weight, dt_bias, ssm_state, A, D, z):
    """Mamba-1's dt_proj + state update in one kernel (see ``mamba1_state_update_ref``)."""
    if not (use_triton(x_dbl) and _rows_contiguous(x, x_dbl, z)):
        return mamba1_state_update_ref(x, x_dbl, dt_proj_weight, dt_bias, ssm_state, A, D, z)
    b, d, n = ssm_state.shape
    r = dt_proj_weight.shape[1]
    out = torch.empty(b, d, device=x.device, dtype=x.dtype)
    bn = triton.next_power_of_2(n)
    br = triton.next_power_of_2(r)
    bd = max(1, min(32, UPDATE_TILE // max(bn, br)))
    _m1_update_kernel[(triton.cdiv(d, bd), b)](
        x, x_dbl, z if z is not None else x, dt_proj_weight, dt_bias if dt_bias is not None else x, ssm_state, A,
        D if D is not None else A, out,
        d, n, r,
        x.stride(0), x_dbl.stride(0), z.stride(0) if z is not None else 0, *dt_proj_weight.stride(),
        *ssm_state.stride(), *A.stride(), out.stride(0),
        HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_D=bd, BLOCK_N=bn, BLOCK_R=br, EARLY_STATE=EARLY_STATE, num_warps=4, **_pdl_args(x.device),
    )
    return out
