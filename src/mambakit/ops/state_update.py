"""One decoding step of the selective SSM, in place: ``selective_state_update`` (official name and signature).

    dt = softplus(dt + dt_bias)                       (bias and softplus optional)
    state = exp(dt A) * state + dt * B * x            (written back into ``state``)
    out = <state, C> + D * x,  out *= silu(z)         (D and z optional)

Both official forms, normalised to the Mamba-2 one (the Mamba-1 form is one head of d channels):
    Mamba-1: state (b, d, n); x, dt, z (b, d); A (d, n); B, C (b, n); D, dt_bias (d,)
    Mamba-2: state (b, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p)
Mamba-2 passes A, dt and dt_bias expanded from per-head values with stride 0; they are also accepted per
head directly (dt (b, h), A (h,), dt_bias (h,), D (h,)), and then exp(dt A) is computed once per head.
``state_batch_indices`` (b,): row i of x updates state[state_batch_indices[i]] (a cache of more rows).
State may be fp32/fp16/bf16; the math is fp32 (fp64 for fp64 inputs).

Reading order: reference -> input normalisation -> PyTorch path -> Triton kernel and launcher -> public op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtypes import as_dtype, compute_dtype
from ._checks import PassedChecks, check_same_device, check_shape, check_tensor, fail
from .dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs no Triton
    triton = None


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------

def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """Straightforward version of :func:`selective_state_update` (same signature, also in place)."""
    state4, x, dt, A, B, C, D, z, dt_bias, idx, mamba1 = _normalize(state, x, dt, A, B, C, D, z, dt_bias,
                                                                     state_batch_indices)
    f = compute_dtype(x)
    b, h, p = x.shape
    rows = torch.arange(b, device=x.device) if idx is None else idx.long()
    dt = dt.to(f) if dt_bias is None else dt.to(f) + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(f).repeat_interleave(h // B.shape[1], dim=1)[:, :, None, :]  # head i reads group i // (h // g)
    Ch = C.to(f).repeat_interleave(h // C.shape[1], dim=1)[:, :, None, :]
    new = state4[rows].to(f) * torch.exp(dt[..., None] * A.to(f)) + (dt * x.to(f))[..., None] * Bh
    state4[rows] = new.to(state4.dtype)
    out = (new * Ch).sum(-1)
    if D is not None:
        out = out + D.to(f) * x.to(f)
    if z is not None:
        out = out * F.silu(z.to(f))
    out = out.to(x.dtype)
    return out.squeeze(1) if mamba1 else out


# ----------------------------------------------------------------------------------------------------------
# Input normalisation: everything to the Mamba-2 form
# ----------------------------------------------------------------------------------------------------------

def _per_head(t, p, extra=()):
    """Expand a per-head tensor (h,) or (b, h) to (..., h, p, *extra) with stride 0 (no copy)."""
    return t.reshape(*t.shape, *([1] * (1 + len(extra)))).expand(*t.shape, p, *extra)


_PASSED = PassedChecks()  # a decode loop repeats one argument layout: its checks run once


def _normalize(state, x, dt, A, B, C, D, z, dt_bias, idx):
    """Returns (state4, x, dt, A, B, C, D, z, dt_bias, idx, mamba1) in the Mamba-2 form (see module doc),
    after checking the inputs (once per argument layout)."""
    _PASSED.once(_check_inputs, state, x, dt, A, B, C, D, z, dt_bias, idx)
    return _mamba2_form(state, x, dt, A, B, C, D, z, dt_bias, idx)


def _mamba2_form(state, x, dt, A, B, C, D, z, dt_bias, idx):
    """The inputs as views in the Mamba-2 form; per-head values expanded with stride 0 (no copies)."""
    mamba1 = state.dim() == 3
    if mamba1:  # one head of `dim` channels, one group
        state, x, dt, B, C, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), B.unsqueeze(1), \
            C.unsqueeze(1), A.unsqueeze(0)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    p, n = state.shape[2], state.shape[3]
    dt = _per_head(dt, p) if dt.dim() == 2 else dt
    A = _per_head(A, p, (n,)) if A.dim() == 1 else A
    dt_bias = _per_head(dt_bias, p) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias
    D = _per_head(D, p) if D is not None and D.dim() == 1 else D
    return state, x, dt, A, B, C, D, z, dt_bias, idx, mamba1


def _check_inputs(state, x, dt, A, B, C, D, z, dt_bias, idx):
    """Ranks in the form given, then shapes, dtypes and devices in the Mamba-2 form."""
    check_tensor("state", state, (3, 4), "(batch, dim, dstate) or (batch, nheads, headdim, dstate)")
    if state.dim() == 3:
        for name, t, rank, dims in (("x", x, 2, "(batch, dim)"), ("dt", dt, 2, "(batch, dim)"),
                                    ("A", A, 2, "(dim, dstate)"), ("B", B, 2, "(batch, dstate)"),
                                    ("C", C, 2, "(batch, dstate)"), ("D", D, 1, "(dim,)"),
                                    ("z", z, 2, "(batch, dim)"), ("dt_bias", dt_bias, 1, "(dim,)")):
            if t is not None:
                check_tensor(name, t, rank, dims)
    else:
        check_tensor("x", x, 3, "(batch, nheads, headdim)")
        for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias)):
            if t is not None:
                check_tensor(name, t, tuple(range(1, 5)), "")
    _, h, p, n = (state.unsqueeze(1) if state.dim() == 3 else state).shape
    b = x.shape[0]
    check_shape("x", x if state.dim() == 4 else x.unsqueeze(1), (b, h, p), "(batch, nheads, headdim)")
    if state.dim() == 4:
        if dt.dim() == 2:
            check_shape("dt", dt, (b, h), "(batch, nheads)")
        if A.dim() == 1:
            check_shape("A", A, (h,), "(nheads,)")
        for name, t in (("dt_bias", dt_bias), ("D", D)):
            if t is not None and t.dim() == 1:
                check_shape(name, t, (h,), "(nheads,)")
    state, x, dt, A, B, C, D, z, dt_bias, idx, _ = _mamba2_form(state, x, dt, A, B, C, D, z, dt_bias, idx)
    check_shape("dt", dt, (b, h, p), "(batch, nheads, headdim) or (batch, nheads)")
    check_shape("A", A, (h, p, n), "(nheads, headdim, dstate) or (nheads,)")
    check_tensor("B", B, 3, "(batch, ngroups, dstate)")
    g = B.shape[1]
    if B.shape != (b, g, n) or g == 0 or h % g != 0:
        fail(f"B has shape {tuple(B.shape)}, expected (batch={b}, ngroups, dstate={n}) with nheads={h} "
             f"divisible by ngroups")
    check_shape("C", C, (b, g, n), "(batch, ngroups, dstate) like B")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_shape(name, t, (h, p), "(nheads, headdim) or (nheads,)")
    if z is not None:
        check_shape("z", z, (b, h, p), "(batch, nheads, headdim) like x")
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("dt_bias", dt_bias)):
        if t is not None and not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")
    check_same_device("state", state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      state_batch_indices=idx)
    if idx is not None:
        check_shape("state_batch_indices", idx, (b,), "(batch,)")
        if idx.dtype not in (torch.int32, torch.int64):
            fail(f"state_batch_indices must be int32 or int64, got {idx.dtype}")
    elif state.shape[0] != b:
        fail(f"state has batch {state.shape[0]} but x has batch {b}; pass state_batch_indices to pick rows")


def _tied(dt, A, dt_bias) -> bool:
    """dt, A (and dt_bias) are per-head values expanded with stride 0, so exp(dt A) is one number per head."""
    return (dt.stride(-1) == 0 and A.stride(-1) == 0 and A.stride(-2) == 0
            and (dt_bias is None or dt_bias.stride(-1) == 0))


# ----------------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------------

def _update_torch_mamba1(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    """The Mamba-1 form as given (state (b, d, n), no batch indices): the same math as _update_torch in
    about half the ops, which is what a CPU decode step of a Mamba-1 layer costs."""
    f = compute_dtype(x)
    inplace = state.dtype == f and state.is_contiguous()
    s = state if inplace else state.to(f).contiguous()  # (b, d, n)
    dt = as_dtype(dt, f) if dt_bias is None else as_dtype(dt, f) + as_dtype(dt_bias, f)  # (b, d)
    if softplus:
        dt = F.softplus(dt)
    xf = as_dtype(x, f)
    s.mul_(torch.exp(dt.unsqueeze(-1) * as_dtype(A, f)))
    s.addcmul_((dt * xf).unsqueeze(-1), as_dtype(B, f).unsqueeze(1))
    out = torch.matmul(s, as_dtype(C, f).unsqueeze(-1)).squeeze(-1)  # (b, d)
    if D is not None:
        out = torch.addcmul(out, as_dtype(D, f), xf)
    if z is not None:
        out = out * F.silu(as_dtype(z, f))
    if not inplace:
        state.copy_(s)
    return as_dtype(out, x.dtype)


def _update_torch(state, x, dt, A, B, C, D, z, dt_bias, idx, mamba1, softplus):
    f = compute_dtype(x)
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g  # heads per group: B and C broadcast over them (no repeat_interleave copy)
    # a contiguous state in the compute dtype is updated in place; anything else goes through a copy
    inplace = idx is None and state.dtype == f and state.is_contiguous()
    s = state if inplace else (state if idx is None else state[idx.long()]).to(f).contiguous()
    if _tied(dt, A, dt_bias):  # one exp per head
        dt = as_dtype(dt[..., :1], f) + (0 if dt_bias is None else as_dtype(dt_bias[..., :1], f))  # (b, h, 1)
        A = as_dtype(A[:, :1, :1], f)  # (h, 1, 1)
    else:
        dt = as_dtype(dt, f) + (0 if dt_bias is None else as_dtype(dt_bias, f))
        A = as_dtype(A, f)
    if softplus:
        dt = F.softplus(dt)
    xf = as_dtype(x, f)
    dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, h, p or 1, n or 1)
    s5 = s.view(b, g, r, p, n)
    s5.mul_(dA.view(b, g, r, dA.shape[-2], dA.shape[-1]))
    s5.addcmul_((dt * xf).view(b, g, r, p, 1), as_dtype(B, f).reshape(b, g, 1, 1, n))  # no outer-product temp
    # one matrix-vector product per (batch, group): (r*p, n) @ (n, 1), no broadcast over the heads
    out = torch.matmul(s5.view(b, g, r * p, n), as_dtype(C, f).reshape(b, g, n, 1)).view(b, h, p)
    if D is not None:
        out = out + as_dtype(D, f) * xf
    if z is not None:
        out = out * F.silu(as_dtype(z, f))
    if not inplace:
        if idx is None:
            state.copy_(s)
        else:
            state[idx.long()] = s.to(state.dtype)
    out = as_dtype(out, x.dtype)
    return out.squeeze(1) if mamba1 else out


# ----------------------------------------------------------------------------------------------------------
# Triton kernel: one program per (block of headdim rows, batch row, head)
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # an older Triton: pdl_supported() is False, so PDL is never set
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def _grid_wait(PDL: tl.constexpr):
        """Under programmatic dependent launch (PDL), wait until the previous kernel in the stream has finished
        and its writes are visible, then let the next kernel start. A kernel launched with PDL may load only
        parameters (weights, never written during decoding) before this call, and must call it in every
        program (each waits, so the previous kernel's completion implies that of all earlier ones)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _softplus(x):
        # torch's threshold (linear above 20); exp(x) below -15 where log(1 + exp(x)) rounds to 0 in fp32
        return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))

    @triton.jit
    def _state_update_kernel(
        state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, out_ptr,
        P, NSTATE, HEADS_PER_GROUP,
        s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_dtb, s_dth, s_dtp, s_Ah, s_Ap, s_An,
        s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Dh, s_Dp, s_zb, s_zh, s_zp, s_bh, s_bp, s_ob, s_oh, s_op,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_IDX: tl.constexpr, TIED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        EARLY_STATE: tl.constexpr, PDL: tl.constexpr,
    ):
        """EARLY_STATE (no HAS_IDX): the state is loaded before the grid-dependency wait, so under PDL its read
        overlaps the previous kernel. Only the decode step sets it: there the previous kernel (in_proj) never
        touches the state, and the state's last writer (this layer's update a token earlier) has finished."""
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        pid_h = tl.program_id(2).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p = offs_p < P
        mask_pn = mask_p[:, None] & (offs_n[None, :] < NSTATE)
        p64 = offs_p.to(tl.int64)
        state_cols = pid_h * s_sh + p64[:, None] * s_sp + offs_n[None, :] * s_sn
        if EARLY_STATE:
            s_ptrs = state_ptr + pid_b * s_sb + state_cols
            s = tl.load(s_ptrs, mask=mask_pn, other=0.0).to(tl.float32)
        _grid_wait(PDL)
        if not EARLY_STATE:
            row = pid_b
            if HAS_IDX:
                row = tl.load(idx_ptr + pid_b).to(tl.int64)
            s_ptrs = state_ptr + row * s_sb + state_cols
            s = tl.load(s_ptrs, mask=mask_pn, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + pid_b * s_xb + pid_h * s_xh + p64 * s_xp, mask=mask_p, other=0.0).to(tl.float32)
        grp = pid_h // HEADS_PER_GROUP
        Bv = tl.load(B_ptr + pid_b * s_Bb + grp * s_Bg + offs_n * s_Bn, mask=offs_n < NSTATE, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + pid_b * s_Cb + grp * s_Cg + offs_n * s_Cn, mask=offs_n < NSTATE, other=0.0).to(tl.float32)
        if TIED:  # per-head dt and A: one exp for the whole program
            dt = tl.load(dt_ptr + pid_b * s_dtb + pid_h * s_dth).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(bias_ptr + pid_h * s_bh).to(tl.float32)
            if SOFTPLUS:
                dt = _softplus(dt)
            dA = tl.exp(dt * tl.load(A_ptr + pid_h * s_Ah).to(tl.float32))
            s = s * dA + (dt * x)[:, None] * Bv[None, :]
        else:
            dt = tl.load(dt_ptr + pid_b * s_dtb + pid_h * s_dth + p64 * s_dtp, mask=mask_p, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(bias_ptr + pid_h * s_bh + p64 * s_bp, mask=mask_p, other=0.0).to(tl.float32)
            if SOFTPLUS:
                dt = _softplus(dt)
            A = tl.load(A_ptr + pid_h * s_Ah + p64[:, None] * s_Ap + offs_n[None, :] * s_An, mask=mask_pn,
                        other=0.0).to(tl.float32)
            s = s * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask_pn)
        out = tl.sum(s * Cv[None, :], axis=1)
        if HAS_D:
            out += tl.load(D_ptr + pid_h * s_Dh + p64 * s_Dp, mask=mask_p, other=0.0).to(tl.float32) * x
        if HAS_Z:
            zv = tl.load(z_ptr + pid_b * s_zb + pid_h * s_zh + p64 * s_zp, mask=mask_p, other=0.0).to(tl.float32)
            out *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + pid_b * s_ob + pid_h * s_oh + p64 * s_op, out.to(out_ptr.dtype.element_ty), mask=mask_p)


def _update_triton(state, x, dt, A, B, C, D, z, dt_bias, idx, mamba1, softplus, pdl=False, early_state=False):
    """The kernel on _normalize's arguments; ``pdl``: launch it with programmatic dependent launch (the fused
    decode step does, after its PDL in_proj kernel) where the device supports it; ``early_state``: load the
    state before the grid-dependency wait (the decode step; see the kernel), ignored with state indices."""
    b, h, p = x.shape
    n = state.shape[-1]
    out = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    BN = triton.next_power_of_2(n)
    BP = min(triton.next_power_of_2(p), max(1, 4096 // BN))
    dummy = x
    D_, z_, bias_ = (t if t is not None else dummy for t in (D, z, dt_bias))
    _state_update_kernel[(triton.cdiv(p, BP), b, h)](
        state, x, dt, A, B, C, D_, z_, bias_, idx if idx is not None else x, out,
        p, n, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(D.stride() if D is not None else (0, 0)), *z_.stride(), *(dt_bias.stride() if dt_bias is not None else (0, 0)),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus),
        HAS_IDX=idx is not None, TIED=_tied(dt, A, dt_bias), BLOCK_P=BP, BLOCK_N=BN,
        EARLY_STATE=bool(early_state) and idx is None, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out.squeeze(1) if mamba1 else out


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decoding step; updates ``state`` in place and returns out, shaped and typed like x.

    Shapes (module docstring): Mamba-1 state (b, d, n), x (b, d); Mamba-2 state (b, h, p, n), x (b, h, p).
    Not differentiable (decoding only).
    """
    if use_triton(x):
        return _update_triton(*_normalize(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices), dt_softplus)
    if isinstance(state, torch.Tensor) and state.dim() == 3 and state_batch_indices is None:
        _PASSED.once(_check_inputs, state, x, dt, A, B, C, D, z, dt_bias, None)
        return _update_torch_mamba1(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _update_torch(*_normalize(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices), dt_softplus)
