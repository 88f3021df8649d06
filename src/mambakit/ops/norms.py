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

from mambakit.ops._checks import check_floating, check_same_device, check_shape, check_tensor, fail
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


def _check_norm_inputs(x, weight, bias, eps, **same_shape):
    check_tensor("x", x, tuple(range(1, 9)), "(..., hidden)")
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,), "(hidden,)")
    if bias is not None:
        check_shape("bias", bias, (hidden,), "(hidden,)")
    for name, t in same_shape.items():
        if t is not None:
            check_shape(name, t, tuple(x.shape), "(..., hidden), like x")
    check_floating(x=x, weight=weight, bias=bias, **same_shape)
    check_same_device("x", x, weight=weight, bias=bias, **same_shape)
    if not eps >= 0:
        fail(f"eps must be >= 0, got {eps}")


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (plain vectorised ops; autograd gives the gradients)
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rms_norm_torch(x, weight, bias, residual, prenorm, residual_in_fp32, eps):
    cdt = _compute_dtype(x)
    s = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)  # (..., hidden)
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    y = y.to(_out_dtype(x))
    return (y, s.to(_residual_dtype(x, residual, residual_in_fp32))) if prenorm else y


def _rmsnorm_gated_torch(x, weight, bias, z, eps, group_size, norm_before_gate):
    cdt = _compute_dtype(x)
    hidden = x.shape[-1]
    v = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        v = v * gate
    grouped = v.view(*v.shape[:-1], hidden // group_size, group_size)  # (..., ngroups, group_size)
    y = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).view(v.shape) * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


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
    _check_norm_inputs(x, weight, bias, eps, residual=residual)
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
    _check_norm_inputs(x, weight, bias, eps, z=z)
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
