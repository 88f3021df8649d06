"""RMSNorm with a fused residual add (``mamba_ssm.ops.triton.layer_norm``) and the gated, grouped RMSNorm of
Mamba-2 (``mamba_ssm.ops.triton.layernorm_gated``), with the official signatures.

Dimensions: ``...`` any leading dims (batch, seqlen), ``hidden`` the normalised last dim, ``group_size`` the
channels normalised together by the gated norm (``hidden`` when None). Math is fp32 (fp64 for fp64 inputs).

Reading order: references -> input checks -> PyTorch path -> Triton kernels -> launchers -> autograd ->
public functions -> modules.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.ops._dtypes import as_dtype, compute_dtype
from mambakit.ops._checks import PassedChecks, check_floating, check_same_device, check_shape, check_tensor, fail
from mambakit.ops.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # `import mambakit` must work without Triton; the kernels below are then never launched
    triton = None

    class tl:  # noqa: N801 - stand-in so that the kernel signatures below still evaluate
        constexpr = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


__all__ = ["rms_norm_fn", "RMSNorm", "rmsnorm_fn", "RMSNormGated", "rms_norm_ref", "rmsnorm_gated_ref"]


# ----------------------------------------------------------------------------------------------------------
# References (the specification)
# ----------------------------------------------------------------------------------------------------------


def _out_dtype(x):
    """Official rule: y in the autocast dtype under autocast, else in x's dtype."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _residual_dtype(x, residual, residual_in_fp32):
    """Official rule for the prenorm residual output: residual's dtype, else fp32 if asked, else x's dtype."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x.dtype


def rms_norm_ref(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """s = x + residual; y = s / sqrt(mean(s^2) + eps) * weight (+ bias), computed in float64.

    x, residual: (..., hidden); weight, bias: (hidden,). Returns y (the official output dtype), or (y, s) when
    ``prenorm`` with s in the residual dtype (see ``_residual_dtype``).
    """
    s = x.double() if residual is None else x.double() + residual.double()
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * weight.double()
    if bias is not None:
        y = y + bias.double()
    y = y.to(_out_dtype(x))
    return (y, s.to(_residual_dtype(x, residual, residual_in_fp32))) if prenorm else y


def rmsnorm_gated_ref(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated RMSNorm in float64: gate = silu(z); normalise each group of ``group_size`` channels.

    norm_before_gate: y = norm(x) * weight (+ bias) * gate; otherwise y = norm(x * gate) * weight (+ bias).
    x, z: (..., hidden); weight, bias: (hidden,). Returns y in x's dtype.
    """
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    v = x.double()
    gate = F.silu(z.double()) if z is not None else None
    if gate is not None and not norm_before_gate:
        v = v * gate
    grouped = v.reshape(*v.shape[:-1], hidden // group_size, group_size)  # (..., ngroups, group_size)
    normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)
    y = normed.reshape(v.shape) * weight.double()
    if bias is not None:
        y = y + bias.double()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


_PASSED = PassedChecks()


def _check_norm_inputs(x, weight, bias, eps, name=None, other=None):
    """Checked once per layout; an eps that is not a number is checked every time (its check reads the value).
    ``other``: residual or z, named ``name``, which must be shaped like x."""
    if isinstance(eps, (int, float)):
        _PASSED.once(_check_norm_layout, x, weight, bias, eps, name, other)
    else:
        _check_norm_layout(x, weight, bias, eps, name, other)


def _check_norm_layout(x, weight, bias, eps, name, other):
    check_tensor("x", x, tuple(range(1, 9)), "(..., hidden)")
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,), "(hidden,)")
    if bias is not None:
        check_shape("bias", bias, (hidden,), "(hidden,)")
    same_shape = {name: other} if other is not None else {}
    for key, t in same_shape.items():
        check_shape(key, t, tuple(x.shape), "(..., hidden), like x")
    check_floating(x=x, weight=weight, bias=bias, **same_shape)
    check_same_device("x", x, weight=weight, bias=bias, **same_shape)
    if not eps >= 0:
        fail(f"eps must be >= 0, got {eps}")


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (plain vectorised ops; autograd gives the gradients)
# ----------------------------------------------------------------------------------------------------------


def _rms_norm_torch(x, weight, bias, residual, prenorm, residual_in_fp32, eps):
    cdt = compute_dtype(x)
    s = as_dtype(x, cdt) if residual is None else as_dtype(x, cdt) + as_dtype(residual, cdt)  # (..., hidden)
    # F.rms_norm: s * rsqrt(mean(s^2) + eps) * weight in one op (fewer per-op costs when decoding on a CPU)
    y = F.rms_norm(s, (s.shape[-1],), as_dtype(weight, cdt), eps)
    if bias is not None:
        y = y + as_dtype(bias, cdt)
    y = as_dtype(y, _out_dtype(x))
    return (y, as_dtype(s, _residual_dtype(x, residual, residual_in_fp32))) if prenorm else y


def _rmsnorm_gated_torch(x, weight, bias, z, eps, group_size, norm_before_gate):
    cdt = compute_dtype(x)
    hidden = x.shape[-1]
    v = as_dtype(x, cdt)
    gate = F.silu(as_dtype(z, cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        v = v * gate
    if group_size == hidden:  # one group (the usual Mamba-2 layer): the weight goes into the fused op
        y = F.rms_norm(v, (hidden,), as_dtype(weight, cdt), eps)
    else:
        grouped = v.view(*v.shape[:-1], hidden // group_size, group_size)  # (..., ngroups, group_size)
        y = F.rms_norm(grouped, (group_size,), None, eps).view(v.shape) * as_dtype(weight, cdt)
    if bias is not None:
        y = y + as_dtype(bias, cdt)
    if gate is not None and norm_before_gate:
        y = y * gate
    return as_dtype(y, x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: one forward and one backward serve both norms. A program normalises a tile of BLOCK_M rows
# by one group of channels (the whole row for rms_norm_fn); constexpr flags switch the residual add, the
# stored residual output and the silu gate on and off.
# ----------------------------------------------------------------------------------------------------------


@_jit
def _silu_parts(z):
    """(silu(z), silu'(z)) with silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    s = tl.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))


@_jit
def _rms_fwd_kernel(
    x_ptr, r_ptr, z_ptr, w_ptr, b_ptr, y_ptr, res_ptr, rstd_ptr, n_rows, group_size, eps,
    sx, sr, sz, sy, sres,
    HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (row tiles, groups). s = x (+ residual, stored when STORE_RES) (* silu(z) before the norm);
    y = s * rstd * w (+ b) (* silu(z) after the norm); rstd: (n_rows, groups) fp32 for the backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    c = tl.arange(0, BLOCK_N)
    cols = group * group_size + c
    r64 = rows.to(tl.int64)[:, None]
    mask = (rows < n_rows)[:, None] & (c < group_size)[None, :]
    v = tl.load(x_ptr + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(r_ptr + r64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(res_ptr + r64 * sres + cols[None, :], v.to(res_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        gate, _ = _silu_parts(tl.load(z_ptr + r64 * sz + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        if not NORM_BEFORE_GATE:
            v = v * gate
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / group_size + eps)
    tl.store(rstd_ptr + rows * tl.num_programs(1) + group, rstd, mask=rows < n_rows)
    w = tl.load(w_ptr + cols, mask=c < group_size, other=0.0).to(tl.float32)
    y = v * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=c < group_size, other=0.0).to(tl.float32)[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * gate
    tl.store(y_ptr + r64 * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _rms_bwd_kernel(
    s_ptr, z_ptr, w_ptr, b_ptr, dy_ptr, dres_ptr, rstd_ptr, dx_ptr, dr_ptr, dz_ptr, dw_ptr, db_ptr,
    n_rows, group_size, rows_per_program, ss, sz, sdy, sdres, sdx, sdr, sdz,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DRES: tl.constexpr,
    STORE_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (row partitions, groups); each program walks its rows_per_program rows in tiles of BLOCK_M.

    s: the saved normalised input (x, or x + residual). With xhat = s' * rstd (s' = s * silu(z) when gating
    before the norm) and u = dy * w (dy * silu(z) first when gating after the norm):
    ds' = rstd * (u - xhat * mean(u * xhat)), plus dres (the grad of the prenorm residual output).
    Writes dx (and a copy dr in the residual's dtype when STORE_DR), dz, and per-program partial sums of
    dw, db to dw_ptr, db_ptr: (programs, hidden).
    """
    group = tl.program_id(1)
    c = tl.arange(0, BLOCK_N)
    cmask = c < group_size
    cols = group * group_size + c
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.zeros_like(w)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # 2-D accumulators, reduced over rows once after the loop: a reduction across rows per tile would cost
    # a shared-memory round trip and a barrier per tile
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    start = tl.program_id(0) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r64 = rows.to(tl.int64)[:, None]
        mask = (rows < end)[:, None] & cmask[None, :]
        s = tl.load(s_ptr + r64 * ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * tl.num_programs(1) + group, mask=rows < end, other=0.0)[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + r64 * sz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            gate, dgate = _silu_parts(z)
            if NORM_BEFORE_GATE:
                xhat = s * rstd
                tl.store(dz_ptr + r64 * sdz + cols[None, :],
                         (dy * (xhat * w[None, :] + bias[None, :]) * dgate).to(dz_ptr.dtype.element_ty), mask=mask)
                dy = dy * gate
            else:
                xhat = s * gate * rstd
        else:
            xhat = s * rstd
        dw_acc += dy * xhat
        db_acc += dy
        u = dy * w[None, :]
        ds = (u - xhat * (tl.sum(u * xhat, axis=1) / group_size)[:, None]) * rstd
        if HAS_Z and not NORM_BEFORE_GATE:
            tl.store(dz_ptr + r64 * sdz + cols[None, :], (ds * s * dgate).to(dz_ptr.dtype.element_ty), mask=mask)
            ds = ds * gate
        if HAS_DRES:
            ds += tl.load(dres_ptr + r64 * sdres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64 * sdx + cols[None, :], ds.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(dr_ptr + r64 * sdr + cols[None, :], ds.to(dr_ptr.dtype.element_ty), mask=mask)
    part = tl.program_id(0).to(tl.int64) * tl.num_programs(1) * group_size
    tl.store(dw_ptr + part + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + part + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------------------


def _rows(t, hidden):
    """(..., hidden) -> (rows, hidden) with unit stride along hidden (a copy only when needed)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _or(t, fallback):
    """A real pointer for an absent optional tensor (the kernel never touches it)."""
    return t if t is not None else fallback


def _row_stride(t):
    return t.stride(0) if t is not None else 0


def _tile(group_size, n_rows):
    """(BLOCK_M, BLOCK_N, num_warps): a group per row of the tile, about 4K elements per program."""
    block_n = triton.next_power_of_2(group_size)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(n_rows)))
    return block_m, block_n, 4 if block_m * block_n <= 2048 else 8


def _rms_fwd(x2, r2, z2, weight, bias, eps, group_size, norm_before_gate, y_dtype, res_dtype):
    """x2, r2, z2: (rows, hidden). Returns y: (rows, hidden), the residual output (None when res_dtype is
    None) and rstd: (rows, groups) fp32."""
    n_rows, hidden = x2.shape
    ngroups = hidden // group_size
    y = torch.empty(n_rows, hidden, device=x2.device, dtype=y_dtype)
    res = torch.empty(n_rows, hidden, device=x2.device, dtype=res_dtype) if res_dtype is not None else None
    rstd = torch.empty(n_rows, ngroups, device=x2.device, dtype=torch.float32)
    block_m, block_n, num_warps = _tile(group_size, n_rows)
    _rms_fwd_kernel[(triton.cdiv(n_rows, block_m), ngroups)](
        x2, _or(r2, x2), _or(z2, x2), weight, _or(bias, weight), y, _or(res, y), rstd, n_rows, group_size, eps,
        x2.stride(0), _row_stride(r2), _row_stride(z2), y.stride(0), _row_stride(res),
        HAS_RES=r2 is not None, STORE_RES=res is not None, HAS_Z=z2 is not None,
        NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, res, rstd


def _rms_bwd(s2, z2, weight, bias, dy2, dres2, rstd, group_size, norm_before_gate, dx_dtype, dr_dtype):
    """Grads of _rms_fwd. s2: the saved input (x, or x + residual): (rows, hidden); dres2: grad of the residual
    output or None; dr_dtype: dtype of a separate residual grad (None: the residual grad is dx).
    Returns dx, dr (or None), dz (or None, z's dtype), dweight, dbias (fp32)."""
    n_rows, hidden = s2.shape
    ngroups = hidden // group_size
    dx = torch.empty(n_rows, hidden, device=s2.device, dtype=dx_dtype)
    dr = torch.empty(n_rows, hidden, device=s2.device, dtype=dr_dtype) if dr_dtype is not None else None
    dz = torch.empty_like(z2) if z2 is not None else None
    block_m, block_n, num_warps = _tile(group_size, n_rows)
    sms = torch.cuda.get_device_properties(s2.device).multi_processor_count if s2.is_cuda else 2
    n_parts = min(triton.cdiv(n_rows, block_m), max(1, 4 * sms // ngroups))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_parts), block_m) * block_m
    n_parts = triton.cdiv(n_rows, rows_per_program)
    dw_part = torch.empty(n_parts, hidden, device=s2.device, dtype=torch.float32)
    db_part = torch.empty(n_parts, hidden, device=s2.device, dtype=torch.float32) if bias is not None else dw_part
    _rms_bwd_kernel[(n_parts, ngroups)](
        s2, _or(z2, s2), weight, _or(bias, weight), dy2, _or(dres2, dy2), rstd, dx, _or(dr, dx), _or(dz, dx),
        dw_part, db_part, n_rows, group_size, rows_per_program,
        s2.stride(0), _row_stride(z2), dy2.stride(0), _row_stride(dres2), dx.stride(0), _row_stride(dr),
        _row_stride(dz),
        HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        HAS_DRES=dres2 is not None, STORE_DR=dr is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps)
    return dx, dr, dz, dw_part.sum(0), db_part.sum(0) if bias is not None else None


class _RMSNormFn(torch.autograd.Function):
    """rms_norm_fn on the kernels: saves x + residual (or x) and rstd, like the official."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, prenorm, residual_in_fp32, eps):
        hidden = x.shape[-1]
        x2 = _rows(x, hidden)
        r2 = _rows(residual, hidden) if residual is not None else None
        res_dtype = _residual_dtype(x, residual, residual_in_fp32)
        # the official stores x + residual only when there is a residual or its dtype differs from x's
        store = residual is not None or res_dtype != x.dtype
        y, res, rstd = _rms_fwd(x2, r2, None, weight, bias, eps, hidden, True, _out_dtype(x),
                                res_dtype if store else None)
        ctx.save_for_backward(res if store else x2, weight, bias, rstd)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.prenorm = prenorm
        y = y.view(x.shape)
        if not prenorm:
            return y
        return y, (res.view(x.shape) if store else x.view(x.shape))

    @staticmethod
    def backward(ctx, dy, *rest):
        s2, weight, bias, rstd = ctx.saved_tensors
        hidden = s2.shape[1]
        x_dtype, r_dtype = ctx.dtypes
        dres = rest[0] if ctx.prenorm else None
        dx, dr, _, dw, db = _rms_bwd(
            s2, None, weight, bias, _rows(dy, hidden), _rows(dres, hidden) if dres is not None else None, rstd,
            hidden, True, x_dtype, r_dtype if r_dtype is not None and r_dtype != x_dtype else None)
        shape = dy.shape
        dresidual = None
        if r_dtype is not None:
            dresidual = (dr if dr is not None else dx).view(shape)
        return (dx.view(shape), dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None, dresidual,
                None, None, None)


class _GatedRMSNormFn(torch.autograd.Function):
    """rmsnorm_fn on the kernels: saves x, z and rstd per group."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, eps, group_size, norm_before_gate):
        hidden = x.shape[-1]
        x2 = _rows(x, hidden)
        z2 = _rows(z, hidden) if z is not None else None
        y, _, rstd = _rms_fwd(x2, None, z2, weight, bias, eps, group_size, norm_before_gate, x.dtype, None)
        ctx.save_for_backward(x2, z2, weight, bias, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, bias, rstd = ctx.saved_tensors
        hidden = x2.shape[1]
        dx, _, dz, dw, db = _rms_bwd(x2, z2, weight, bias, _rows(dy, hidden), None, rstd, ctx.group_size,
                                     ctx.norm_before_gate, x2.dtype, None)
        shape = dy.shape
        return (dx.view(shape), dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None,
                dz.view(shape) if dz is not None else None, None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Public functions and modules
# ----------------------------------------------------------------------------------------------------------


def _use_norm_kernels(x):
    """Triton for CUDA tensors (or when forced); float64 stays on the PyTorch path (kernels compute in fp32)."""
    return x.dtype != torch.float64 and use_triton(x)


def rms_norm_fn(x, weight, bias=None, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """Fused residual add + RMSNorm (the official ``mamba_ssm.ops.triton.layer_norm.rms_norm_fn``).

    x: (..., hidden); weight, bias: (hidden,); residual: (..., hidden) or None. Computes s = x + residual in
    fp32 and y = s * rsqrt(mean(s^2) + eps) * weight (+ bias). Returns y in x's dtype (the autocast dtype
    under autocast), or with ``prenorm`` the pair (y, s) where s is in residual's dtype, else fp32 when
    ``residual_in_fp32``, else x's dtype: the official Block calls
    ``hidden, residual = rms_norm_fn(hidden, w, None, residual=residual, prenorm=True, residual_in_fp32=...)``.
    """
    _check_norm_inputs(x, weight, bias, eps, "residual", residual)
    if _use_norm_kernels(x):
        return _RMSNormFn.apply(x, weight, bias, residual, prenorm, residual_in_fp32, eps)
    return _rms_norm_torch(x, weight, bias, residual, prenorm, residual_in_fp32, eps)


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated RMSNorm per group (the official ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn``).

    x, z: (..., hidden); weight, bias: (hidden,); group_size: channels normalised together (hidden when None;
    Mamba-2 uses d_ssm // ngroups). With z, gate = silu(z) multiplies the normalised output
    (``norm_before_gate``) or the input before normalising (Mamba-2: norm_before_gate=False).
    Returns y: (..., hidden) in x's dtype.
    """
    _check_norm_inputs(x, weight, bias, eps, "z", z)
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if not (isinstance(group_size, int) and group_size > 0 and hidden % group_size == 0):
        fail(f"group_size must be a positive divisor of hidden={hidden}, got {group_size!r}")
    if _use_norm_kernels(x):
        return _GatedRMSNormFn.apply(x, weight, bias, z, eps, group_size, norm_before_gate)
    return _rmsnorm_gated_torch(x, weight, bias, z, eps, group_size, norm_before_gate)


class RMSNorm(nn.Module):
    """RMSNorm with the official module's interface; ``forward`` can fuse the residual add (see rms_norm_fn)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x, residual: (..., hidden). Returns y, or (y, x + residual) when ``prenorm``."""
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, eps=self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Gated, grouped RMSNorm of Mamba-2 (the official ``layernorm_gated.RMSNorm``); see rmsnorm_fn."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        """x, z: (..., hidden). Returns y: (..., hidden) in x's dtype."""
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)

    def extra_repr(self):
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
