"""SSD stage 1 (Triton): dt processing and the within-chunk cumulative sum of dt * A, forward and backward.

Forward, per (batch, chunk, block of heads):
    dt_p = clamp(softplus(dt + dt_bias), dt_limit)   (each step as configured; 0 past seqlen)
    dA_cs[t] = sum_{s <= t in the chunk} dt_p[s] * A
Outputs are laid out (b, h, c, Q) in fp32: every later stage reads one chunk of one head as a contiguous row.

Backward: ddA[t] = dLoss/d(dt_p[t] A), assembled from the pieces the other stages write (triton_path.py
derives them):
    ddA[t] = sum_{v < t} (colsum[v] - rowsum[v] + f[v]) + sum_{v >= t} e[v] + sp[c]
    d dt_p = ddt_direct + A * ddA,  dA = sum dt_p * ddA
then back through the limit (zero where clamped), softplus (sigmoid) and the bias (a sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # softplus(x) = x above 20, like torch.nn.functional.softplus's default threshold
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dA_cs_ptr,
    seqlen, nheads, nchunks, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_q = tl.arange(0, Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = (pid_c * Q + offs_q).to(tl.int64)
    mask_h = offs_h < nheads
    mask = (pos < seqlen)[:, None] & mask_h[None, :]
    ptrs = dt_ptr + pid_b * stride_dt_b + pos[:, None] * stride_dt_l + offs_h[None, :] * stride_dt_h
    dt = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (Q, BLOCK_H)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    if LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)  # steps past seqlen: no decay, no input
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dA_cs = tl.cumsum(dt * A[None, :], axis=0)
    out = ((pid_b * nheads + offs_h[None, :]) * nchunks + pid_c) * Q + offs_q[:, None]  # (b, h, c, Q)
    tl.store(dt_out_ptr + out, dt, mask=mask_h[None, :])
    tl.store(dA_cs_ptr + out, dA_cs, mask=mask_h[None, :])


@triton.jit
def _chunk_cumsum_bwd_kernel(
    ddt_dir_ptr, f_ptr, e_ptr, rows_ptr, cols_ptr, sp_ptr, dt_p_ptr, dt_ptr, A_ptr, bias_ptr,
    ddt_ptr, dA_part_ptr, dbias_part_ptr,
    seqlen, nheads, nchunks, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_ddt_b, stride_ddt_l, stride_ddt_h,
    Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, ROW_PARTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_q = tl.arange(0, Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = (pid_c * Q + offs_q).to(tl.int64)
    mask_h = offs_h < nheads
    mask = (pos < seqlen)[:, None] & mask_h[None, :]
    row = (pid_b * nheads + offs_h) * nchunks + pid_c  # (BLOCK_H,) index of (b, h, c)
    off = row[None, :] * Q + offs_q[:, None]
    ddt_dir = tl.load(ddt_dir_ptr + off, mask=mask_h[None, :], other=0.0)
    dt_p = tl.load(dt_p_ptr + off, mask=mask_h[None, :], other=0.0)
    # column sums of M: row block m wrote the columns up to its diagonal block
    cols = tl.zeros((Q, BLOCK_H), dtype=tl.float32)
    for m in tl.static_range(Q // BLOCK_M):
        written = mask & (offs_q[:, None] // BLOCK_M <= m)
        cols += tl.load(cols_ptr + (row[None, :] * (Q // BLOCK_M) + m) * Q + offs_q[:, None], mask=written, other=0.0)
    if ROW_PARTS:  # row sums of M by source block: block j wrote the rows from its diagonal block on
        rows = tl.zeros((Q, BLOCK_H), dtype=tl.float32)
        for j in tl.static_range(Q // BLOCK_M):
            written = mask & (offs_q[:, None] // BLOCK_M >= j)
            rows += tl.load(rows_ptr + (row[None, :] * (Q // BLOCK_M) + j) * Q + offs_q[:, None], mask=written,
                            other=0.0)
    else:
        rows = tl.load(rows_ptr + off, mask=mask_h[None, :], other=0.0)
    inc = cols - rows + tl.load(f_ptr + off, mask=mask_h[None, :], other=0.0)
    e = tl.load(e_ptr + off, mask=mask_h[None, :], other=0.0)
    sp = tl.load(sp_ptr + row, mask=mask_h, other=0.0)
    # each piece as a prefix / suffix sum of its own: their difference form would cancel catastrophically
    ddA = (tl.cumsum(inc, axis=0) - inc) + (tl.sum(e, axis=0)[None, :] - tl.cumsum(e, axis=0) + e) + sp[None, :]
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    ddt = ddt_dir + A[None, :] * ddA
    part = pid_b * nchunks * nheads + pid_c * nheads + offs_h  # (b, c, h) partial sums
    tl.store(dA_part_ptr + part, tl.sum(dt_p * ddA, axis=0), mask=mask_h)
    raw = tl.load(dt_ptr + pid_b * stride_dt_b + pos[:, None] * stride_dt_l + offs_h[None, :] * stride_dt_h,
                  mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if LIMIT:
        val = _softplus(raw) if SOFTPLUS else raw
        ddt = tl.where((val >= dt_min) & (val <= dt_max), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(dbias_part_ptr + part, tl.sum(ddt, axis=0), mask=mask_h)
    tl.store(ddt_ptr + pid_b * stride_ddt_b + pos[:, None] * stride_ddt_l + offs_h[None, :] * stride_ddt_h,
             ddt, mask=mask)


def _block_h(nheads: int) -> int:
    return min(triton.next_power_of_2(nheads), 8)


def chunk_cumsum_fwd(dt, A, dt_bias, dt_softplus: bool, dt_limit, limited: bool, Q: int):
    """dt: (b, l, h) any strides, A: (h,) -> dt_p, dA_cs: (b, h, c, Q) fp32."""
    b, l, h = dt.shape
    nchunks = triton.cdiv(l, Q)
    dt_p = torch.empty(b, h, nchunks, Q, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_p)
    BH = _block_h(h)
    grid = (nchunks, b, triton.cdiv(h, BH))
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_p, dA_cs,
        l, h, nchunks, float(dt_limit[0]), float(dt_limit[1]),
        dt.stride(0), dt.stride(1), dt.stride(2),
        Q=Q, BLOCK_H=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, LIMIT=limited,
    )
    return dt_p, dA_cs


def chunk_cumsum_bwd(ddt_dir, f, e, rows, cols, sp, dt_p, dt, A, dt_bias, dt_softplus: bool, dt_limit,
                     limited: bool, Q: int):
    """Gradients of dt (b, l, h) in dt's dtype, A (h,) fp32 and dt_bias (h,) fp32 (None without a bias).

    ddt_dir, f, e: (b, h, c, Q) fp32, rows: (b, h, c, Q) or its partials by source block (b, h, c,
    Q // BLOCK_M, Q), cols: (b, h, c, Q // BLOCK_M, Q), sp: (b, h, c) fp32 (see the module docstring).
    """
    b, l, h = dt.shape
    nchunks = dt_p.shape[2]
    ddt = torch.empty(b, l, h, device=dt.device, dtype=dt.dtype)
    dA_part = torch.empty(b, nchunks, h, device=dt.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    BH = _block_h(h)
    grid = (nchunks, b, triton.cdiv(h, BH))
    _chunk_cumsum_bwd_kernel[grid](
        ddt_dir, f, e, rows, cols, sp, dt_p, dt, A, dt_bias if dt_bias is not None else A,
        ddt, dA_part, dbias_part,
        l, h, nchunks, float(dt_limit[0]), float(dt_limit[1]),
        dt.stride(0), dt.stride(1), dt.stride(2), ddt.stride(0), ddt.stride(1), ddt.stride(2),
        Q=Q, BLOCK_H=BH, BLOCK_M=Q // cols.shape[3], ROW_PARTS=rows.dim() == 5, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        LIMIT=limited,
    )
    dbias = dbias_part.sum((0, 1)) if dt_bias is not None else None
    return ddt, dA_part.sum((0, 1)), dbias
