"""SSD stage 4 (Triton): outputs inside each chunk, forward and backward.

Within chunk c, with a = dA_cs[c] (cumsum of dt*A), S_c the state entering the chunk (state_passing.py):
    y[t] = exp(a[t]) S_c C[t]  +  sum_{s <= t} (C[t] . B[s]) exp(a[t] - a[s]) dt[s] x[s]  (+ D x[t]),  out = y silu(z)
One program computes BLOCK_M rows t of one (batch, chunk, head) for the whole headdim: C B^T is recomputed
per head with tensor-core dots instead of being stored (a dstate-wide dot costs about what loading a stored
fp32 C B^T tile would), and the loop over source blocks s stops at the diagonal.
Positions of other packed sequences (seq_idx) are masked out of both terms.

Backward, G = dLoss/dS_{c+1} (the gradient of the chunk's state contribution) from state_passing.py:
    w[s] = exp(a_end - a[s]) G B[s]  +  sum_{t >= s} (C[t] . B[s]) exp(a[t] - a[s]) dy[t]
    dx[s] = dt[s] w[s] + D dy[s],   ddt_direct[s] = x[s] . w[s]
    dC[t] = sum_h exp(a[t]) S_c^T dy[t]      + sum_{s <= t} exp(a[t] - a[s]) dt[s] (dy[t] . x[s]) B[s]
    dB[s] = sum_h exp(a_end - a[s]) dt[s] G^T x[s] + sum_{t >= s} exp(a[t] - a[s]) dt[s] (x[s] . dy[t]) C[t]
dB/dC sum over the heads of a group inside one program (optionally split over programs and summed after).
The same kernels write the pieces of d(dA_cs) (triton_path.py explains why they are kept apart).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambakit.ops.dispatch import num_sms
from mambakit.ops.ssd.state_passing import dot_precision


@triton.jit
def _fwd_head_init(Cm, states_ptr, dA_cs_ptr, S_off, row, offs_m, offs_n, offs_p, mask_n, mask_p, dstate, seq_in_ok,
                   dtype, DOT_PREC: tl.constexpr):
    """One head's decay cumsum a_m over this program's rows and its entering-state term exp(a_m) C S_c."""
    a_m = tl.load(dA_cs_ptr + row + offs_m)
    # the state entering the chunk, read transposed: (BLOCK_N, BLOCK_P)
    S = tl.load(states_ptr + S_off + offs_n[:, None] + offs_p[None, :] * dstate,
                mask=mask_n[:, None] & mask_p[None, :], other=0.0)
    scale_m = tl.where(seq_in_ok, tl.exp(a_m), 0.0)
    return a_m, tl.dot(Cm, S.to(dtype), input_precision=DOT_PREC) * scale_m[:, None]  # (BLOCK_M, BLOCK_P)


@triton.jit
def _fwd_head_step(acc, cb, keep, a_m, dA_cs_ptr, dt_ptr, row, offs_k, x_k, mask_kp, dtype, DOT_PREC: tl.constexpr):
    """acc += (C B^T * exp(a_m - a_k) dt_k, causal and sequence masked) x_k for one head and source block."""
    a_k = tl.load(dA_cs_ptr + row + offs_k)
    dt_k = tl.load(dt_ptr + row + offs_k)
    # mask before exp: above the diagonal a[t] - a[s] > 0 could overflow
    decay = tl.exp(tl.where(keep, a_m[:, None] - a_k[None, :], float("-inf"))) * dt_k[None, :]
    xk = tl.load(x_k, mask=mask_kp, other=0.0)
    return acc + tl.dot((cb * decay).to(dtype), xk.to(dtype), input_precision=DOT_PREC)


@triton.jit
def _fwd_head_store(acc, x_m, z_m, D_ptr, pid_h, offs_p, mask_p, mask_mp, stride_D_h, stride_D_p, out_ptr, y_ptr,
                    out_m, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """D skip, the gate and the stores of one head's (BLOCK_M, BLOCK_P) outputs."""
    if HAS_D:
        xm = tl.load(x_m, mask=mask_mp, other=0.0).to(tl.float32)
        Dv = tl.load(D_ptr + pid_h * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(tl.float32)
        acc += xm * Dv[None, :]
    if HAS_Z:
        tl.store(y_ptr + out_m, acc.to(y_ptr.dtype.element_ty), mask=mask_mp)
        zm = tl.load(z_m, mask=mask_mp, other=0.0).to(tl.float32)
        acc = acc * zm * tl.sigmoid(zm)
    tl.store(out_ptr + out_m, acc.to(out_ptr.dtype.element_ty), mask=mask_mp)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, states_ptr, D_ptr, z_ptr, seq_ptr, out_ptr, y_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_z_b, stride_z_l, stride_z_h, stride_z_p,
    stride_seq_b, stride_seq_l, stride_D_h, stride_D_p,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS: tl.constexpr,
):
    # HEADS (1 or 2) consecutive heads of one group a program: the C B^T dot of each source block is shared
    pid_bc = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2) * HEADS
    pid_b = (pid_bc // nchunks).to(tl.int64)
    pid_c = pid_bc % nchunks
    dtype = x_ptr.dtype.element_ty
    start = pid_c * Q
    chunk_len = tl.minimum(Q, seqlen - start)
    start64 = start.to(tl.int64)
    g = pid_h // heads_per_group
    # 64-bit scalar bases of this chunk (1M-token inputs overflow int32), 32-bit offsets inside it
    x_c = x_ptr + pid_b * stride_x_b + start64 * stride_x_l + pid_h * stride_x_h
    z_c = z_ptr + pid_b * stride_z_b + start64 * stride_z_l + pid_h * stride_z_h
    B_c = B_ptr + pid_b * stride_B_b + start64 * stride_B_l + g * stride_B_g
    C_c = C_ptr + pid_b * stride_C_b + start64 * stride_C_l + g * stride_C_g
    seq_c = seq_ptr + pid_b * stride_seq_b + start64 * stride_seq_l
    row = ((pid_b * nheads + pid_h) * nchunks + pid_c) * Q  # this chunk's row in dt / dA_cs (b, h, c, Q)
    row1 = row + nchunks * Q  # the second head's row
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate

    Cm = tl.load(C_c + offs_m[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_M, BLOCK_N)
    seq_in_ok = mask_m | True
    if HAS_SEQ:
        seq_m = tl.load(seq_c + offs_m * stride_seq_l, mask=mask_m, other=-1)
        seq_in = tl.load(seq_ptr + pid_b * stride_seq_b + tl.maximum(start64 - 1, 0) * stride_seq_l)
        seq_in_ok = seq_m == seq_in
    S_off = ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate
    a_m, acc = _fwd_head_init(Cm, states_ptr, dA_cs_ptr, S_off, row, offs_m, offs_n, offs_p, mask_n, mask_p,
                              dstate, seq_in_ok, dtype, DOT_PREC)
    if HEADS == 2:
        a_m1, acc1 = _fwd_head_init(Cm, states_ptr, dA_cs_ptr, S_off + headdim * dstate, row1, offs_m, offs_n,
                                    offs_p, mask_n, mask_p, dstate, seq_in_ok, dtype, DOT_PREC)

    k_hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)  # causal: sources up to the diagonal
    for k0 in range(0, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        Bk = tl.load(B_c + offs_k[None, :] * stride_B_l + offs_n[:, None] * stride_B_n,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(dtype)  # (BLOCK_N, BLOCK_K)
        cb = tl.dot(Cm, Bk, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_K)
        keep = (offs_m[:, None] >= offs_k[None, :]) & mask_k[None, :]
        if HAS_SEQ:
            seq_k = tl.load(seq_c + offs_k * stride_seq_l, mask=mask_k, other=-2)
            keep &= seq_m[:, None] == seq_k[None, :]
        x_k = x_c + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p
        mask_kp = mask_k[:, None] & mask_p[None, :]
        acc = _fwd_head_step(acc, cb, keep, a_m, dA_cs_ptr, dt_ptr, row, offs_k, x_k, mask_kp, dtype, DOT_PREC)
        if HEADS == 2:
            acc1 = _fwd_head_step(acc1, cb, keep, a_m1, dA_cs_ptr, dt_ptr, row1, offs_k, x_k + stride_x_h, mask_kp,
                                  dtype, DOT_PREC)

    mask_mp = mask_m[:, None] & mask_p[None, :]
    x_m = x_c + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p
    z_m = z_c + offs_m[:, None] * stride_z_l + offs_p[None, :] * stride_z_p
    # out and y are contiguous (b, l, h, p)
    out_m = ((pid_b * seqlen + start64) * nheads + pid_h) * headdim + offs_m[:, None] * (nheads * headdim) \
        + offs_p[None, :]
    _fwd_head_store(acc, x_m, z_m, D_ptr, pid_h, offs_p, mask_p, mask_mp, stride_D_h, stride_D_p, out_ptr, y_ptr,
                    out_m, HAS_D, HAS_Z)
    if HEADS == 2:
        _fwd_head_store(acc1, x_m + stride_x_h, z_m + stride_z_h, D_ptr, pid_h + 1, offs_p, mask_p, mask_mp,
                        stride_D_h, stride_D_p, out_ptr, y_ptr, out_m + headdim, HAS_D, HAS_Z)


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, dstates_ptr, dy_ptr, D_ptr, seq_ptr,
    dx_ptr, ddt_ptr, f_ptr, dD_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_seq_b, stride_seq_l, stride_D_h, stride_D_p,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2)
    pid_b = (pid_bc // nchunks).to(tl.int64)
    pid_c = pid_bc % nchunks
    dtype = x_ptr.dtype.element_ty
    start = pid_c * Q
    chunk_len = tl.minimum(Q, seqlen - start)
    start64 = start.to(tl.int64)
    g = pid_h // heads_per_group
    x_c = x_ptr + pid_b * stride_x_b + start64 * stride_x_l + pid_h * stride_x_h
    B_c = B_ptr + pid_b * stride_B_b + start64 * stride_B_l + g * stride_B_g
    C_c = C_ptr + pid_b * stride_C_b + start64 * stride_C_l + g * stride_C_g
    seq_c = seq_ptr + pid_b * stride_seq_b + start64 * stride_seq_l
    tok_c = ((pid_b * seqlen + start64) * nheads + pid_h) * headdim  # dy and dx are contiguous (b, l, h, p)
    row = ((pid_b * nheads + pid_h) * nchunks + pid_c) * Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_mp = mask_m[:, None] & mask_p[None, :]

    a_m = tl.load(dA_cs_ptr + row + offs_m)
    dt_m = tl.load(dt_ptr + row + offs_m)
    xm = tl.load(x_c + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mask_mp,
                 other=0.0).to(tl.float32)
    Bm = tl.load(B_c + offs_m[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_M, BLOCK_N)
    G_c = dstates_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate
    G = tl.load(G_c + offs_n[:, None] + offs_p[None, :] * dstate, mask=mask_n[:, None] & mask_p[None, :],
                other=0.0).to(dtype)  # (BLOCK_N, BLOCK_P)
    scale_m = tl.exp(tl.load(dA_cs_ptr + row + Q - 1) - a_m)
    if HAS_SEQ:
        seq_m = tl.load(seq_c + offs_m * stride_seq_l, mask=mask_m, other=-1)
        seq_end = tl.load(seq_c + (chunk_len - 1) * stride_seq_l)
        scale_m = tl.where(seq_m == seq_end, scale_m, 0.0)
    acc = tl.dot(Bm, G, input_precision=DOT_PREC) * scale_m[:, None]  # (BLOCK_M, BLOCK_P)
    # f[s] = dt[s] x[s] . (the chunk-state part of w[s]): the chunk's own inputs' share of d(decay)
    tl.store(f_ptr + row + offs_m, dt_m * tl.sum(xm * acc, axis=1))

    for k0 in range(pid_m * BLOCK_M, chunk_len, BLOCK_K):  # targets t >= s
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        Ck = tl.load(C_c + offs_k[None, :] * stride_C_l + offs_n[:, None] * stride_C_n,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(dtype)  # (BLOCK_N, BLOCK_K)
        cbT = tl.dot(Bm, Ck, input_precision=DOT_PREC)  # (BLOCK_M s, BLOCK_K t)
        a_k = tl.load(dA_cs_ptr + row + offs_k)
        keep = (offs_k[None, :] >= offs_m[:, None]) & mask_k[None, :]
        if HAS_SEQ:
            seq_k = tl.load(seq_c + offs_k * stride_seq_l, mask=mask_k, other=-2)
            keep &= seq_m[:, None] == seq_k[None, :]
        decay = tl.exp(tl.where(keep, a_k[None, :] - a_m[:, None], float("-inf")))
        dyk = tl.load(dy_ptr + tok_c + offs_k[:, None] * (nheads * headdim) + offs_p[None, :],
                      mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        acc += tl.dot((cbT * decay).to(dtype), dyk.to(dtype), input_precision=DOT_PREC)

    tok_m = offs_m[:, None] * (nheads * headdim) + offs_p[None, :]
    dx = acc * dt_m[:, None]
    if HAS_D:
        dym = tl.load(dy_ptr + tok_c + tok_m, mask=mask_mp, other=0.0).to(tl.float32)
        Dv = tl.load(D_ptr + pid_h * stride_D_h + offs_p * stride_D_p, mask=mask_p, other=0.0).to(tl.float32)
        dx += dym * Dv[None, :]
        tl.store(dD_ptr + ((pid_bc * tl.num_programs(1) + pid_m) * nheads + pid_h) * headdim + offs_p,
                 tl.sum(dym * xm, axis=0), mask=mask_p)
    tl.store(dx_ptr + tok_c + tok_m, dx.to(dx_ptr.dtype.element_ty), mask=mask_mp)
    tl.store(ddt_ptr + row + offs_m, tl.sum(xm * acc, axis=1))  # 0 past seqlen: xm is 0 there


@triton.jit
def _chunk_scan_bwd_dbc_kernel(
    u_ptr, v_ptr, K_ptr, R_ptr, S_ptr, dt_ptr, dA_cs_ptr, seq_ptr, out_ptr, e_ptr, rows_ptr, cols_ptr,
    seqlen, nheads, nchunks, heads_per_group, heads_per_split, headdim, dstate,
    stride_u_b, stride_u_l, stride_u_h, stride_u_p,
    stride_v_b, stride_v_l, stride_v_h, stride_v_p,
    stride_K_b, stride_K_l, stride_K_g, stride_K_n,
    stride_R_b, stride_R_l, stride_R_g, stride_R_n,
    stride_seq_b, stride_seq_l,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_DB: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dB (IS_DB: u = x, v = dy, K = C, S = dstates, targets t >= s) or dC (u = dy, v = x, K = B, R = C,
    S = states entering the chunk, sources s <= t), summed over a split of heads. The dC pass also writes,
    per head, the terms of d(dA_cs) that must stay accurate (see triton_path.py): e[t] and the row and
    column sums of M[t, s] = (C[t] . B[s]) exp(a[t] - a[s]) dt[s] (dy[t] . x[s]) in fp32."""
    pid_bc = tl.program_id(0)
    pid_m = tl.program_id(1)
    nsplit = heads_per_group // heads_per_split
    pid_g = tl.program_id(2) // nsplit
    pid_split = tl.program_id(2) % nsplit
    pid_b = (pid_bc // nchunks).to(tl.int64)
    pid_c = pid_bc % nchunks
    dtype = u_ptr.dtype.element_ty
    start = pid_c * Q
    chunk_len = tl.minimum(Q, seqlen - start)
    start64 = start.to(tl.int64)
    u_c = u_ptr + pid_b * stride_u_b + start64 * stride_u_l
    v_c = v_ptr + pid_b * stride_v_b + start64 * stride_v_l
    K_c = K_ptr + pid_b * stride_K_b + start64 * stride_K_l + pid_g * stride_K_g
    seq_c = seq_ptr + pid_b * stride_seq_b + start64 * stride_seq_l
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_mp = mask_m[:, None] & mask_p[None, :]
    if HAS_SEQ:
        seq_m = tl.load(seq_c + offs_m * stride_seq_l, mask=mask_m, other=-1)
        if IS_DB:  # the chunk state keeps the sequence running at the chunk's end
            seq_ref = tl.load(seq_c + (chunk_len - 1) * stride_seq_l)
        else:  # the entering state belongs to the sequence running before the chunk
            seq_ref = tl.load(seq_ptr + pid_b * stride_seq_b + tl.maximum(start64 - 1, 0) * stride_seq_l)
    if IS_DB:
        k_lo = pid_m * BLOCK_M
        k_hi = chunk_len
    else:
        k_lo = 0
        k_hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
        Rm = tl.load(R_ptr + pid_b * stride_R_b + start64 * stride_R_l + pid_g * stride_R_g
                     + offs_m[:, None] * stride_R_l + offs_n[None, :] * stride_R_n,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(heads_per_split):
        h = pid_g * heads_per_group + pid_split * heads_per_split + i
        row = ((pid_b * nheads + h) * nchunks + pid_c) * Q
        a_m = tl.load(dA_cs_ptr + row + offs_m)
        um = tl.load(u_c + h * stride_u_h + offs_m[:, None] * stride_u_l + offs_p[None, :] * stride_u_p,
                     mask=mask_mp, other=0.0).to(dtype)
        if IS_DB:
            dt_m = tl.load(dt_ptr + row + offs_m)
            scale_m = tl.exp(tl.load(dA_cs_ptr + row + Q - 1) - a_m) * dt_m
        else:
            scale_m = tl.exp(a_m)
        if HAS_SEQ:
            scale_m = tl.where(seq_m == seq_ref, scale_m, 0.0)
        S = tl.load(S_ptr + ((pid_b * nchunks + pid_c) * nheads + h) * headdim * dstate
                    + offs_p[:, None] * dstate + offs_n[None, :],
                    mask=mask_p[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_P, BLOCK_N)
        acc = tl.dot((um.to(tl.float32) * scale_m[:, None]).to(dtype), S, acc, input_precision=DOT_PREC)
        if not IS_DB:  # e[t] = exp(a[t]) dy[t] . (S C[t]): a[t]'s share through the entering state
            SC = tl.dot(Rm, tl.trans(S), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_P)
            tl.store(e_ptr + row + offs_m, tl.sum(um.to(tl.float32) * SC, axis=1) * scale_m)
            rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < chunk_len
            vkT = tl.load(v_c + h * stride_v_h + offs_k[None, :] * stride_v_l + offs_p[:, None] * stride_v_p,
                          mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            P = tl.dot(um, vkT.to(dtype), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_K)
            a_k = tl.load(dA_cs_ptr + row + offs_k)
            if IS_DB:  # rows are sources s, columns targets t >= s; dt of the source
                keep = (offs_k[None, :] >= offs_m[:, None]) & mask_k[None, :]
                diff = a_k[None, :] - a_m[:, None]
                dt_factor = dt_m[:, None]
            else:  # rows are targets t, columns sources s <= t
                keep = (offs_m[:, None] >= offs_k[None, :]) & mask_k[None, :]
                diff = a_m[:, None] - a_k[None, :]
                dt_factor = tl.load(dt_ptr + row + offs_k)[None, :]
            if HAS_SEQ:
                seq_k = tl.load(seq_c + offs_k * stride_seq_l, mask=mask_k, other=-2)
                keep &= seq_m[:, None] == seq_k[None, :]
            P = P * tl.exp(tl.where(keep, diff, float("-inf"))) * dt_factor
            Kk = tl.load(K_c + offs_k[:, None] * stride_K_l + offs_n[None, :] * stride_K_n,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_K, BLOCK_N)
            if not IS_DB:
                M = P * tl.dot(Rm, tl.trans(Kk), input_precision=DOT_PREC)  # (C[t] . B[s]) in fp32
                rowsum += tl.sum(M, axis=1)
                # column sums of this row block; chunk_cumsum's backward adds the row blocks up
                tl.store(cols_ptr + (row * (Q // BLOCK_M) + pid_m * Q) + offs_k, tl.sum(M, axis=0))
            acc += tl.dot(P.to(dtype), Kk, input_precision=DOT_PREC)
        if not IS_DB:
            tl.store(rows_ptr + row + offs_m, rowsum)
    nbatch = tl.num_programs(0) // nchunks
    ngroups = nheads // heads_per_group
    # out: (nsplit, b, l, g, n) fp32 partial sums, added up by the launcher
    out_c = ((pid_split * nbatch + pid_b) * seqlen + start64) * ngroups * dstate + pid_g * dstate
    tl.store(out_ptr + out_c + offs_m[:, None] * (ngroups * dstate) + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])



@triton.jit
def _chunk_scan_bwd_w_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, seq_ptr, w_ptr, rows_ptr, cols_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_seq_b, stride_seq_l,
    Q: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """"summed" variant, pass 1: W[t, s] = sum_h exp(a_h[t] - a_h[s]) dt_h[s] (dy_h[t] . x_h[s]) for one
    (BLOCK_W t, BLOCK_W s) tile of one (batch, chunk, group), and per head the row and column sums of
    M_h = W_h * (C[t] . B[s]) for d(dA_cs). C B^T is head-independent: computed once per tile, not per head.
    Tiles above the diagonal are stored as zeros so that pass 2 may read any tile."""
    pid_bc = tl.program_id(0)
    NB: tl.constexpr = Q // BLOCK_W
    pid_t = tl.program_id(1) // NB
    pid_s = tl.program_id(1) % NB
    pid_g = tl.program_id(2)
    pid_b = (pid_bc // nchunks).to(tl.int64)
    pid_c = pid_bc % nchunks
    offs_t = pid_t * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_s = pid_s * BLOCK_W + tl.arange(0, BLOCK_W)
    # W: (b, c, g, Q, Q) in the inputs' dtype (pass 2 feeds it to a tensor-core dot in that dtype anyway)
    w_c = w_ptr + ((pid_b * nchunks + pid_c) * tl.num_programs(2) + pid_g) * Q * Q
    w_offs = offs_t[:, None] * Q + offs_s[None, :]
    if pid_s > pid_t:
        tl.store(w_c + w_offs, tl.zeros((BLOCK_W, BLOCK_W), dtype=w_ptr.dtype.element_ty))
    else:
        dtype = x_ptr.dtype.element_ty
        start = pid_c * Q
        chunk_len = tl.minimum(Q, seqlen - start)
        start64 = start.to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_t = offs_t < chunk_len
        mask_s = offs_s < chunk_len
        mask_p = offs_p < headdim
        mask_n = offs_n < dstate
        Ct = tl.load(C_ptr + pid_b * stride_C_b + start64 * stride_C_l + pid_g * stride_C_g
                     + offs_t[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_W t, BLOCK_N)
        BsT = tl.load(B_ptr + pid_b * stride_B_b + start64 * stride_B_l + pid_g * stride_B_g
                      + offs_s[None, :] * stride_B_l + offs_n[:, None] * stride_B_n,
                      mask=mask_n[:, None] & mask_s[None, :], other=0.0).to(dtype)  # (BLOCK_N, BLOCK_W s)
        cb = tl.dot(Ct, BsT, input_precision=DOT_PREC)  # (C[t] . B[s]) in fp32, shared by the group's heads
        keep = (offs_t[:, None] >= offs_s[None, :]) & mask_t[:, None] & mask_s[None, :]
        if HAS_SEQ:
            seq_c = seq_ptr + pid_b * stride_seq_b + start64 * stride_seq_l
            seq_t = tl.load(seq_c + offs_t * stride_seq_l, mask=mask_t, other=-1)
            seq_s = tl.load(seq_c + offs_s * stride_seq_l, mask=mask_s, other=-2)
            keep &= seq_t[:, None] == seq_s[None, :]
        x_c = x_ptr + pid_b * stride_x_b + start64 * stride_x_l
        dy_c = dy_ptr + pid_b * stride_dy_b + start64 * stride_dy_l
        acc = tl.zeros((BLOCK_W, BLOCK_W), dtype=tl.float32)
        for i in range(heads_per_group):
            h = pid_g * heads_per_group + i
            row = ((pid_b * nheads + h) * nchunks + pid_c) * Q
            a_t = tl.load(dA_cs_ptr + row + offs_t)
            a_s = tl.load(dA_cs_ptr + row + offs_s)
            dt_s = tl.load(dt_ptr + row + offs_s)
            dyt = tl.load(dy_c + h * stride_dy_h + offs_t[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                          mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(dtype)  # (BLOCK_W t, BLOCK_P)
            xsT = tl.load(x_c + h * stride_x_h + offs_s[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                          mask=mask_p[:, None] & mask_s[None, :], other=0.0).to(dtype)  # (BLOCK_P, BLOCK_W s)
            # mask before exp: above the diagonal a[t] - a[s] > 0 could overflow
            wh = (tl.dot(dyt, xsT, input_precision=DOT_PREC)
                  * tl.exp(tl.where(keep, a_t[:, None] - a_s[None, :], float("-inf"))) * dt_s[None, :])
            acc += wh
            m = wh * cb
            # (b, h, c, NB, Q) partials: rows by source tile, columns by target tile (chunk_cumsum adds them)
            tl.store(rows_ptr + row * NB + pid_s * Q + offs_t, tl.sum(m, axis=1))
            tl.store(cols_ptr + row * NB + pid_t * Q + offs_s, tl.sum(m, axis=0))
        tl.store(w_c + w_offs, acc.to(w_ptr.dtype.element_ty))


@triton.jit
def _chunk_scan_bwd_dbc_summed_kernel(
    u_ptr, S_ptr, K_ptr, R_ptr, w_ptr, dt_ptr, dA_cs_ptr, seq_ptr, out_ptr, e_ptr,
    seqlen, nheads, nchunks, heads_per_group, headdim, dstate,
    stride_u_b, stride_u_l, stride_u_h, stride_u_p,
    stride_K_b, stride_K_l, stride_K_g, stride_K_n,
    stride_R_b, stride_R_l, stride_R_g, stride_R_n,
    stride_seq_b, stride_seq_l,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, IS_DB: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """"summed" variant, pass 2, for BLOCK_M rows of one (batch, chunk, group):
    dB (IS_DB: u = x, S = dstates, K = C): sum_h exp(a_end - a[s]) dt[s] x_h[s] G_h + sum_{t >= s} W[t, s] C[t]
    dC (u = dy, S = states, K = B, R = C): sum_h exp(a[t]) dy_h[t] S_h + sum_{s <= t} W[t, s] B[s],
    and per head e[t] = exp(a[t]) dy[t] . (S C[t]) from the same per-head product. The head loop is one long
    contraction (K = heads * headdim); the intra-chunk part is one (Q x Q) by (Q x dstate) product per group."""
    pid_bc = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_g = tl.program_id(2)
    pid_b = (pid_bc // nchunks).to(tl.int64)
    pid_c = pid_bc % nchunks
    ngroups = tl.num_programs(2)
    dtype = u_ptr.dtype.element_ty
    start = pid_c * Q
    chunk_len = tl.minimum(Q, seqlen - start)
    start64 = start.to(tl.int64)
    u_c = u_ptr + pid_b * stride_u_b + start64 * stride_u_l
    K_c = K_ptr + pid_b * stride_K_b + start64 * stride_K_l + pid_g * stride_K_g
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    if HAS_SEQ:
        seq_c = seq_ptr + pid_b * stride_seq_b + start64 * stride_seq_l
        seq_m = tl.load(seq_c + offs_m * stride_seq_l, mask=mask_m, other=-1)
        if IS_DB:  # the chunk state keeps the sequence running at the chunk's end
            seq_ref = tl.load(seq_c + (chunk_len - 1) * stride_seq_l)
        else:  # the entering state belongs to the sequence running before the chunk
            seq_ref = tl.load(seq_ptr + pid_b * stride_seq_b + tl.maximum(start64 - 1, 0) * stride_seq_l)
    if not IS_DB:
        Rm = tl.load(R_ptr + pid_b * stride_R_b + start64 * stride_R_l + pid_g * stride_R_g
                     + offs_m[:, None] * stride_R_l + offs_n[None, :] * stride_R_n,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # C rows for e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(heads_per_group):
        h = pid_g * heads_per_group + i
        row = ((pid_b * nheads + h) * nchunks + pid_c) * Q
        a_m = tl.load(dA_cs_ptr + row + offs_m)
        if IS_DB:
            scale_m = tl.exp(tl.load(dA_cs_ptr + row + Q - 1) - a_m) * tl.load(dt_ptr + row + offs_m)
        else:
            scale_m = tl.exp(a_m)
        if HAS_SEQ:
            scale_m = tl.where(seq_m == seq_ref, scale_m, 0.0)
        um = tl.load(u_c + h * stride_u_h + offs_m[:, None] * stride_u_l + offs_p[None, :] * stride_u_p,
                     mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(dtype)  # (BLOCK_M, BLOCK_P)
        S = tl.load(S_ptr + ((pid_b * nchunks + pid_c) * nheads + h) * headdim * dstate
                    + offs_p[:, None] * dstate + offs_n[None, :],
                    mask=mask_p[:, None] & mask_n[None, :], other=0.0).to(dtype)  # (BLOCK_P, BLOCK_N)
        # the row scale applied in fp32 after the dot: u stays exact in the tensor-core operand
        part = tl.dot(um, S, input_precision=DOT_PREC) * scale_m[:, None]
        if not IS_DB:
            tl.store(e_ptr + row + offs_m, tl.sum(part * Rm, axis=1))
        acc += part
    w_c = w_ptr + ((pid_b * nchunks + pid_c) * ngroups + pid_g) * Q * Q
    if IS_DB:
        k_lo = pid_m * BLOCK_M
        k_hi = chunk_len
    else:
        k_lo = 0
        k_hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if IS_DB:  # W^T: rows sources s (this block), columns targets t
            Wk = tl.load(w_c + offs_k[None, :] * Q + offs_m[:, None])
        else:
            Wk = tl.load(w_c + offs_m[:, None] * Q + offs_k[None, :])
        Kk = tl.load(K_c + offs_k[:, None] * stride_K_l + offs_n[None, :] * stride_K_n,
                     mask=(offs_k < chunk_len)[:, None] & mask_n[None, :], other=0.0).to(dtype)
        acc += tl.dot(Wk.to(dtype), Kk, input_precision=DOT_PREC)
    # out: (b, l, g, n) contiguous, in B's / C's dtype
    out_c = (pid_b * seqlen + start64) * ngroups * dstate + pid_g * dstate
    tl.store(out_ptr + out_c + offs_m[:, None] * (ngroups * dstate) + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

def _scan_blocks(Q: int, headdim: int, dstate: int, blocks: dict, dtype):
    """(BLOCK_M, BLOCK_K, BLOCK_P, BLOCK_N). fp32 dots run without tensor cores and need smaller tiles to
    stay in registers (checked with ptxas -v for sm_90)."""
    wide = 32 if dtype == torch.float32 else 64
    BM = min(Q, blocks.get("BLOCK_M") or wide)
    BK = min(BM, blocks.get("BLOCK_K") or wide)
    if Q % BM or BM % BK:
        raise ValueError(f"block sizes must divide: chunk {Q}, BLOCK_M {BM}, BLOCK_K {BK}")
    return BM, BK, max(16, triton.next_power_of_2(headdim)), max(16, triton.next_power_of_2(dstate))


# Tiles measured fastest on an H200 (notes/gpu_run2/ssd: every stage timed with 5 tile sets at the three
# ANCHORS.md shapes; the same set won at all three): 16-bit inputs, headdim <= 64, dstate <= 128, chunk a
# multiple of 128. b4 l4096 h48: scan_fwd 0.326 -> 0.274 ms, bwd_dx 0.958 -> 0.457, bwd_dbc 2.031 -> 1.319.
# Other shapes keep the general defaults of _scan_blocks / _launch_opts (larger tiles there were not measured
# and could exceed the registers or shared memory).
_TUNED_16BIT = {
    "fwd": dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=3),
    "dx": dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=3),
    "dbc": dict(BLOCK_M=128, BLOCK_K=64, num_warps=8),
}


def _with_tuned(stage: str, blocks, Q: int, headdim: int, dstate: int, dtype) -> dict:
    """The caller's blocks over the measured tiles of this stage, where those apply."""
    blocks = blocks or {}
    if dtype in (torch.float16, torch.bfloat16) and headdim <= 64 and dstate <= 128 and Q % 128 == 0:
        return {**_TUNED_16BIT[stage], **blocks}
    return blocks


def _launch_opts(blocks: dict, dtype, num_warps: int = 4):
    if dtype == torch.float32:
        num_warps = 8
    return dict(num_warps=blocks.get("num_warps", num_warps), num_stages=blocks.get("num_stages", 2))


def chunk_scan_fwd(x, B, C, dt_p, dA_cs, states, D, z, seq_idx, Q: int, blocks=None):
    """x: (b, l, h, p), B, C: (b, l, g, n), dt_p, dA_cs: (b, h, c, Q) fp32, states: (b, c, h, p, n),
    D: (h, p) / (h,) / None, z: (b, l, h, p) / None.

    Returns out (b, l, h, p) contiguous in x's dtype, and y = out before the gate (only when z is given).
    ``blocks`` may set HEADS=2: two heads of a group a program, sharing the C B^T dot of each source block
    (H200, bf16, whole forward: b4 l4096 h48 0.404 vs 0.399 ms, b8 l2048 h80 0.695 vs 0.694, so not the default:
    the scan is not limited by that dot; notes/gpu_run8/call1).
    """
    heads = (blocks or {}).get("HEADS", 1)
    if heads not in (1, 2):
        raise ValueError(f"scan_fwd HEADS (heads a program) must be 1 or 2, got {heads}")
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    blocks = _with_tuned("fwd", blocks, Q, p, n, x.dtype)
    BM, BK, BP, BN = _scan_blocks(Q, p, n, blocks, x.dtype)
    out = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    y = torch.empty_like(out) if z is not None else out
    zz = z if z is not None else x
    Dv = D if D is not None else dt_p
    D_strides = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    seq = seq_idx if seq_idx is not None else dt_p
    if (h // g) % heads:
        heads = 1  # the heads of a program share their group's C B^T: an odd number of heads a group takes 1
    _chunk_scan_fwd_kernel[(b * nchunks, Q // BM, h // heads)](
        x, B, C, dt_p, dA_cs, states, Dv, zz, seq, out, y,
        l, h, nchunks, h // g, p, n,
        *x.stride(), *B.stride(), *C.stride(), *zz.stride(), seq.stride(0), seq.stride(1), *D_strides,
        Q=Q, BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_SEQ=seq_idx is not None, DOT_PREC=dot_precision(x.dtype), HEADS=heads, **_launch_opts(blocks, x.dtype),
    )
    return out, (y if z is not None else None)


def chunk_scan_bwd_dx(x, B, C, dt_p, dA_cs, dstates, dy, D, seq_idx, Q: int, blocks=None):
    """dy: (b, l, h, p) contiguous, dstates: (b, c, h, p, n).

    Returns dx (b, l, h, p) in x's dtype, ddt_direct and f (b, h, c, Q) fp32, dD (like D, fp32) or None.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    blocks = _with_tuned("dx", blocks, Q, p, n, x.dtype)
    BM, BK, BP, BN = _scan_blocks(Q, p, n, blocks, x.dtype)
    dx = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    ddt_dir = torch.empty_like(dt_p)
    f = torch.empty_like(dt_p)
    dD_part = torch.empty(b * nchunks * (Q // BM), h, p, device=x.device, dtype=torch.float32)
    Dv = D if D is not None else dt_p
    D_strides = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    seq = seq_idx if seq_idx is not None else dt_p
    _chunk_scan_bwd_dx_kernel[(b * nchunks, Q // BM, h)](
        x, B, C, dt_p, dA_cs, dstates, dy, Dv, seq, dx, ddt_dir, f, dD_part,
        l, h, nchunks, h // g, p, n,
        *x.stride(), *B.stride(), *C.stride(), seq.stride(0), seq.stride(1), *D_strides,
        Q=Q, BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, HAS_D=D is not None,
        HAS_SEQ=seq_idx is not None, DOT_PREC=dot_precision(x.dtype), **_launch_opts(blocks, x.dtype, 8),
    )
    dD = None
    if D is not None:
        dD = dD_part.sum(0) if D.dim() == 2 else dD_part.sum((0, 2))
    return dx, ddt_dir, f, dD


def _head_split(programs: int, heads_per_group: int, blocks: dict, sms: int) -> int:
    """Split each group's heads over several programs when the grid would otherwise not fill the GPU."""
    if blocks.get("HEAD_SPLIT"):
        return blocks["HEAD_SPLIT"]
    split = 1
    while (programs * split < 4 * sms and heads_per_group % (split * 2) == 0
           and heads_per_group // (split * 2) >= 4):
        split *= 2
    return split


# dB / dC backward variants, chosen by blocks["VARIANT"] (triton_path.BLOCKS["scan_bwd_dbc"]):
#   "per_head": one kernel per gradient; each program loops over its group's heads and forms, per head, the
#       (Q x Q) by (Q x dstate) products and C B^T again (2x the FLOPs of "summed" at h48 p64 n128);
#   "summed": pass 1 sums W = sum_h decay_h * (dy_h x_h^T) over the heads (C B^T once per tile), pass 2 does
#       the state terms as one long contraction over heads and one W B / W^T C product per group.
DBC_VARIANTS = ("per_head", "summed")
DEFAULT_DBC_VARIANT = "summed"  # H200 b1 l65536 h48 bf16: dbc 4.72 -> 2.11 ms, fwd+bwd 8.95 -> 6.29 ms
# pass 1 (W_*) and pass 2 tiles of "summed" for 16-bit inputs, the fastest of 6 sets timed on an H200 at b1 l65536
# h48 p64 n128 (scripts/gpu_check_ssd.py dbc_variants): pass 1 1.52 ms, pass 2 0.29 ms x 2 (3 stages hide the
# per-head loads; 128-wide pass-1 tiles spill). fp32 takes 32-wide tiles (no tensor cores).
_SUMMED_16BIT = dict(BLOCK_W=64, W_WARPS=4, W_STAGES=3, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3)
_SUMMED_FP32 = dict(BLOCK_W=32, W_WARPS=4, W_STAGES=1, BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)


def chunk_scan_bwd_dbc(x, B, C, dt_p, dA_cs, states, dstates, dy, seq_idx, Q: int, blocks=None):
    """dB, dC: (b, l, g, n) in B's / C's dtype (fp32 sums over the heads of each group), and for the
    d(dA_cs) terms: e (b, h, c, Q), rowsum (b, h, c, Q) ("per_head") or its partials (b, h, c, Q // BLOCK_W,
    Q) ("summed"), colsum partials (b, h, c, Q // BLOCK_M, Q), all fp32."""
    blocks = blocks or {}
    variant = blocks.get("VARIANT", DEFAULT_DBC_VARIANT)
    if variant not in DBC_VARIANTS:
        raise ValueError(f"scan_bwd_dbc VARIANT must be one of {DBC_VARIANTS}, got {variant!r}")
    if variant == "summed":
        return _chunk_scan_bwd_dbc_summed(x, B, C, dt_p, dA_cs, states, dstates, dy, seq_idx, Q, blocks)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    blocks = _with_tuned("dbc", blocks, Q, p, n, x.dtype)
    BM, BK, BP, BN = _scan_blocks(Q, p, n, blocks, x.dtype)
    hpg = h // g
    split = _head_split(b * nchunks * (Q // BM) * g, hpg, blocks, num_sms(x.device))
    seq = seq_idx if seq_idx is not None else dt_p
    e = torch.empty_like(dt_p)
    rows = torch.empty_like(dt_p)
    cols = torch.empty(b, h, nchunks, Q // BM, Q, device=x.device, dtype=torch.float32)
    grads = []
    for is_db, u, v, K, R, S in ((True, x, dy, C, C, dstates), (False, dy, x, B, C, states)):
        part = torch.empty(split, b, l, g, n, device=x.device, dtype=torch.float32)
        _chunk_scan_bwd_dbc_kernel[(b * nchunks, Q // BM, g * split)](
            u, v, K, R, S, dt_p, dA_cs, seq, part, e, rows, cols,
            l, h, nchunks, hpg, hpg // split, p, n,
            *u.stride(), *v.stride(), *K.stride(), *R.stride(), seq.stride(0), seq.stride(1),
            Q=Q, BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, IS_DB=is_db, HAS_SEQ=seq_idx is not None,
            DOT_PREC=dot_precision(x.dtype), **_launch_opts(blocks, x.dtype, 8),
        )
        grads.append(part[0] if split == 1 else part.sum(0))
    return grads[0].to(B.dtype), grads[1].to(C.dtype), e, rows, cols


def _chunk_scan_bwd_dbc_summed(x, B, C, dt_p, dA_cs, states, dstates, dy, seq_idx, Q: int, blocks: dict):
    """The "summed" variant of chunk_scan_bwd_dbc (same arguments and returns)."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    nchunks = dt_p.shape[2]
    opts = {**(_SUMMED_FP32 if x.dtype == torch.float32 else _SUMMED_16BIT), **blocks}
    BW = min(Q, opts["BLOCK_W"])
    BM = min(Q, opts["BLOCK_M"])
    BK = min(BM, opts["BLOCK_K"])
    if Q % BW or Q % BM or BM % BK:
        raise ValueError(f"block sizes must divide: chunk {Q}, BLOCK_W {BW}, BLOCK_M {BM}, BLOCK_K {BK}")
    BP, BN = max(16, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(n))
    prec = dot_precision(x.dtype)
    seq = seq_idx if seq_idx is not None else dt_p
    w = torch.empty(b, nchunks, g, Q, Q, device=x.device, dtype=x.dtype)
    rows = torch.empty(b, h, nchunks, Q // BW, Q, device=x.device, dtype=torch.float32)
    cols = torch.empty_like(rows)
    _chunk_scan_bwd_w_kernel[(b * nchunks, (Q // BW) ** 2, g)](
        x, dy, B, C, dt_p, dA_cs, seq, w, rows, cols,
        l, h, nchunks, h // g, p, n,
        *x.stride(), *dy.stride(), *B.stride(), *C.stride(), seq.stride(0), seq.stride(1),
        Q=Q, BLOCK_W=BW, BLOCK_P=BP, BLOCK_N=BN, HAS_SEQ=seq_idx is not None, DOT_PREC=prec,
        num_warps=opts["W_WARPS"], num_stages=opts["W_STAGES"],
    )
    e = torch.empty_like(dt_p)
    grads = []
    for is_db, u, S, K, out_dtype in ((True, x, dstates, C, B.dtype), (False, dy, states, B, C.dtype)):
        out = torch.empty(b, l, g, n, device=x.device, dtype=out_dtype)
        _chunk_scan_bwd_dbc_summed_kernel[(b * nchunks, Q // BM, g)](
            u, S, K, C, w, dt_p, dA_cs, seq, out, e,
            l, h, nchunks, h // g, p, n,
            *u.stride(), *K.stride(), *C.stride(), seq.stride(0), seq.stride(1),
            Q=Q, BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=BN, IS_DB=is_db, HAS_SEQ=seq_idx is not None,
            DOT_PREC=prec, num_warps=opts["num_warps"], num_stages=opts["num_stages"],
        )
        grads.append(out)
    return grads[0], grads[1], e, rows, cols
