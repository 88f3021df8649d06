"""Mamba-1 selective scan: ``selective_scan_fn`` (the official name and signature) and its reference.

The recurrence, per channel d and state index n (Mamba paper, Algorithm 2):

    dt_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <h_t, C_t> + D * u_t,   out_t = y_t * silu(z_t)   (D and z optional)

Reading order: the loop reference (the specification) -> input checks -> the PyTorch path (a chunked
sequential scan with a hand-written backward) -> the autograd Functions -> the public op. The Triton kernels
live in ``_triton_selective_scan.py`` so that ``import mambakit`` never needs Triton.

Shapes (dimension glossary in ``mambakit.ops``):
    u, delta, z: (b, d, l)     A: (d, n)     D, delta_bias: (d,)
    B, C: (d, n) constant, (b, n, l) per step, or (b, g, n, l) grouped (channel i uses group i // (d // g))
    initial_state, last_state: (b, d, n)      seq_idx: (b, l) int, non-decreasing (packed sequences)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dtypes import compute_dtype
from ._checks import check_same_device, check_seq_idx, check_shape, check_tensor, fail
from .dispatch import use_triton


# ----------------------------------------------------------------------------------------------------------
# Reference (the specification; tests compare everything against it in float64)
# ----------------------------------------------------------------------------------------------------------

def _per_step(M: torch.Tensor, t: int, b: int, d: int, n: int) -> torch.Tensor:
    """B or C at time t as (b, d, n), whichever of the three layouts M has."""
    if M.dim() == 2:  # (d, n) constant
        return M.expand(b, d, n)
    if M.dim() == 3:  # (b, n, l) shared by all channels
        return M[:, None, :, t].expand(b, d, n)
    g = M.shape[1]  # (b, g, n, l): channel i reads group i // (d // g)
    return M[:, :, None, :, t].expand(b, g, d // g, n).reshape(b, d, n)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, seq_idx=None):
    """Plain per-timestep loop; same signature and semantics as :func:`selective_scan_fn`.

    Computes in float64 when u is float64, else float32. Returns out (b, d, l) in u's dtype, and with
    ``return_last_state`` also last_state (b, d, n) in the compute dtype. Differentiable (slowly).
    """
    f = compute_dtype(u)
    b, d, l = u.shape
    n = A.shape[1]
    uf, dt, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = initial_state.to(f) if initial_state is not None else uf.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, :, t, None] * A)  # (b, d, n)
        if seq_idx is not None and t > 0:  # a new packed sequence starts from a zero state
            dA = dA * (seq_idx[:, t] == seq_idx[:, t - 1]).to(f)[:, None, None]
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[..., None] * _per_step(B, t, b, d, n)
        ys.append((h * _per_step(C, t, b, d, n)).sum(-1))
    y = torch.stack(ys, dim=-1) if l > 0 else uf.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(f)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------

def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx) -> None:
    """Ranks, shapes, dtypes and devices of selective_scan_fn's arguments; ValueError naming the culprit."""
    check_tensor("u", u, 3, "(batch, dim, seqlen)")
    b, d, l = u.shape
    check_shape("delta", delta, (b, d, l), "(batch, dim, seqlen) like u")
    check_tensor("A", A, 2, "(dim, dstate)")
    if A.shape[0] != d:
        fail(f"A has shape {tuple(A.shape)}, expected (dim={d}, dstate)")
    if A.is_complex():
        fail("A must be real: mambakit does not implement the complex-valued selective scan")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        check_tensor(name, M, (2, 3, 4), "(dim, dstate), (batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen)")
        if M.dim() == 2:
            check_shape(name, M, (d, n), "(dim, dstate) constant")
        elif M.dim() == 3:
            check_shape(name, M, (b, n, l), "(batch, dstate, seqlen)")
        else:
            g = M.shape[1]
            if M.shape != (b, g, n, l) or g == 0 or d % g != 0:
                fail(f"{name} has shape {tuple(M.shape)}, expected (batch={b}, ngroups, dstate={n}, seqlen={l}) "
                     f"with dim={d} divisible by ngroups")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        fail(f"B {tuple(B.shape)} and C {tuple(C.shape)} must have the same layout (constant, per step or grouped)")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, (d,), "(dim,)")
    if z is not None:
        check_shape("z", z, (b, d, l), "(batch, dim, seqlen) like u")
    if initial_state is not None:
        check_shape("initial_state", initial_state, (b, d, n), "(batch, dim, dstate)")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None and not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")
    check_same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state)
    check_seq_idx(seq_idx, b, l, u.device)


# ----------------------------------------------------------------------------------------------------------
# PyTorch path: chunks of time through preallocated buffers, an in-place sequential scan, a hand-written backward
# ----------------------------------------------------------------------------------------------------------
# Why this shape: on a CPU the cost is memory traffic and allocation of the (b, l, d, n) state tensor, not
# arithmetic. Working through time in chunks with preallocated (b, chunk, d, n) buffers keeps that tensor in
# cache and allocates it once; the scan inside a chunk is one in-place multiply-add per step over (b, d, n).
# The state is laid out (n, e) with the channels innermost, so that every reduction over n is a batched matmul
# or an outer-dimension sum (an innermost reduction of size 16 is several times slower in PyTorch), and
# channels-last inputs (the Mamba module's views of in_proj's output) are read without copies.
# exp2 with A pre-scaled by log2(e): PyTorch's CPU exp2 is about twice as fast as exp, and exp is the bulk.
# The backward recomputes each chunk's states from the state saved at the chunk's start (the same scheme as
# the Triton kernels), so memory stays O(b d l + b chunk d n).

# Elements of one (b, chunk, d, n) buffer: cache-sized on CPUs; on GPUs (the fallback without Triton) bigger
# chunks mean fewer kernel launches. Tests shrink both to get many chunks.
_TORCH_CHUNK_ELEMS = 1 << 18
_TORCH_CHUNK_ELEMS_CUDA = 1 << 24
_LOG2E = 1.4426950408889634


@dataclass
class _Prepared:
    """Inputs in the layout and compute dtype of the PyTorch path: d split as (g, e), e = d // g channels."""
    u: torch.Tensor      # (b, l, g, 1, e)
    dt: torch.Tensor     # (b, l, g, 1, e) after bias and softplus
    A: torch.Tensor      # (g, n, e)
    A2: torch.Tensor     # (g, n, e): A * log2(e), for exp2
    B: torch.Tensor      # (b, l, g, n, 1), or (1, 1, 1, n, e) when constant (then g == 1)
    C: torch.Tensor      # same layout as B
    const: bool          # B and C are (d, n) constants
    keep: torch.Tensor | None  # (b, l, 1, 1, 1): 0 where a packed sequence starts, else 1
    h0: torch.Tensor | None    # (b, g, n, e)


def _bld(x: torch.Tensor, f: torch.dtype) -> torch.Tensor:
    """(b, d, l) -> contiguous (b, l, d) in dtype f (no copy for channels-last float32 inputs)."""
    return x.transpose(1, 2).contiguous().to(f)


def _bc_layout(M: torch.Tensor, g: int, e: int, n: int, f: torch.dtype) -> torch.Tensor:
    """B or C -> (b, l, g, n, 1), or (1, 1, 1, n, e) when constant."""
    if M.dim() == 2:  # (d, n)
        return M.to(f).t().reshape(1, 1, 1, n, e)
    if M.dim() == 3:
        M = M.unsqueeze(1)  # (b, 1, n, l)
    return M.permute(0, 3, 1, 2).contiguous().to(f).unsqueeze(-1)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state, seq_idx) -> _Prepared:
    f = compute_dtype(u)
    b, d, l = u.shape
    n = A.shape[1]
    g = B.shape[1] if B.dim() == 4 else 1
    e = d // g
    dt = _bld(delta, f)  # (b, l, d)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)
    if delta_softplus:
        dt = F.softplus(dt)
    keep = None
    if seq_idx is not None:
        keep = torch.ones(b, l, 1, 1, 1, dtype=f, device=u.device)
        keep[:, 1:, 0, 0, 0] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(f)
    At = A.to(f).reshape(g, e, n).transpose(1, 2).contiguous()  # (g, n, e)
    return _Prepared(
        u=_bld(u, f).view(b, l, g, 1, e), dt=dt.view(b, l, g, 1, e), A=At, A2=At * _LOG2E,
        B=_bc_layout(B, g, e, n, f), C=_bc_layout(C, g, e, n, f), const=B.dim() == 2, keep=keep,
        h0=None if initial_state is None else initial_state.to(f).reshape(b, g, e, n).transpose(2, 3).contiguous(),
    )


def _chunk_len(p: _Prepared) -> int:
    b, l, g, _, e = p.u.shape
    elems = _TORCH_CHUNK_ELEMS_CUDA if p.u.is_cuda else _TORCH_CHUNK_ELEMS
    return max(1, min(l, elems // max(1, b * g * e * p.A.shape[1])))


def _discretize(p: _Prepared, s0: int, s1: int, dA: torch.Tensor, dBu: torch.Tensor) -> None:
    """dA = exp(dt A) (zeroed where a packed sequence starts), dBu = dt u B: both (b, s1-s0, g, n, e), in place."""
    dt = p.dt[:, s0:s1]
    torch.mul(dt, p.A2, out=dA)
    dA.exp2_()
    if p.keep is not None:
        dA.mul_(p.keep[:, s0:s1])
    torch.mul(dt * p.u[:, s0:s1], p.B if p.const else p.B[:, s0:s1], out=dBu)


def _scan_(As: tuple, xs: tuple, m: int, h0: torch.Tensor | None) -> None:
    """In place x_t <- dA_t * x_{t-1} + x_t for t < m (x_{-1} = h0), so x becomes the states.

    As, xs: the per-step views (``unbind(1)``) of the dA and x buffers, made once per call: creating views
    costs as much as the small per-step multiply-adds."""
    if h0 is not None:
        xs[0].addcmul_(As[0], h0)
    for t in range(1, m):
        xs[t].addcmul_(As[t], xs[t - 1])


def _scan_reverse_(As: tuple, gs: tuple, m: int, carry: torch.Tensor | None) -> None:
    """In place g_t <- g_t + dA_{t+1} * g_{t+1} for t < m, with dA_m * g_m given as ``carry``."""
    if carry is not None:
        gs[m - 1].add_(carry)
    for t in range(m - 2, -1, -1):
        gs[t].addcmul_(As[t + 1], gs[t + 1])


def _sum_n(x: torch.Tensor, M: torch.Tensor, const: bool) -> torch.Tensor:
    """sum_n x * M for x (b, m, g, n, e), M as in _Prepared.B -> (b, m, g, 1, e)."""
    if const:
        return (x * M).sum(-2, keepdim=True)
    return torch.matmul(M.transpose(-1, -2), x)  # batched (1, n) @ (n, e)


def _torch_forward(p: _Prepared):
    """Returns y (b, l, g, 1, e) (before D and z), last state (b, g, n, e), chunk start states (list)."""
    b, l, g, _, e = p.u.shape
    n = p.A.shape[1]
    S = _chunk_len(p)
    dA, x = (p.u.new_empty(b, S, g, n, e) for _ in range(2))
    As, xs = dA.unbind(1), x.unbind(1)
    y = torch.empty_like(p.u)
    h = p.h0 if p.h0 is not None else p.u.new_zeros(b, g, n, e)
    starts = []
    for s0 in range(0, l, S):
        s1 = min(l, s0 + S)
        m = s1 - s0
        starts.append(h)
        _discretize(p, s0, s1, dA[:, :m], x[:, :m])
        _scan_(As, xs, m, h if (s0 > 0 or p.h0 is not None) else None)
        h = x[:, m - 1].clone()
        y[:, s0:s1] = _sum_n(x[:, :m], p.C if p.const else p.C[:, s0:s1], p.const)
    return y, h, starts


def _torch_backward(p: _Prepared, starts: list, dy: torch.Tensor, dh_last: torch.Tensor | None):
    """Gradients of the scan part (y = <h, C>, no D/z) by a reverse pass over the chunks.

    dy: (b, l, g, 1, e); dh_last: (b, g, n, e) or None. Returns ddt, ddu (b, l, g, 1, e) (ddu: the gradient of
    dt * u), dA (g, n, e), dB, dC (in p.B's layout), dh0 (b, g, n, e).
    With g_t = dL/dh_t = dy_t C_t + dA_{t+1} g_{t+1}: dB_t = sum_e g_t dt_t u_t, dC_t = sum_e dy_t h_t and
    d(dt_t A) = g_t h_{t-1} dA_t.
    """
    b, l, g, _, e = p.u.shape
    n = p.A.shape[1]
    S = _chunk_len(p)
    dA_buf, x, gr = (p.u.new_empty(b, S, g, n, e) for _ in range(3))
    As, xs, gs = dA_buf.unbind(1), x.unbind(1), gr.unbind(1)
    ddt, ddu = torch.empty_like(p.u), torch.empty_like(p.u)
    dA = torch.zeros_like(p.A)
    dB = torch.zeros_like(p.B) if p.const else torch.empty_like(p.B)
    dC = torch.zeros_like(p.C) if p.const else torch.empty_like(p.C)
    du_all = p.dt * p.u
    carry = dh_last  # dL/dh at the end of the chunk, from later steps
    for c in reversed(range(len(starts))):
        s0, s1 = c * S, min(l, (c + 1) * S)
        m = s1 - s0
        h_in = starts[c] if (s0 > 0 or p.h0 is not None) else None
        a, h, gm = dA_buf[:, :m], x[:, :m], gr[:, :m]
        _discretize(p, s0, s1, a, h)
        _scan_(As, xs, m, h_in)  # recompute this chunk's states from the saved start state
        Bc, Cc = (p.B, p.C) if p.const else (p.B[:, s0:s1], p.C[:, s0:s1])
        dyc, duc = dy[:, s0:s1], du_all[:, s0:s1]
        if p.const:
            dC += (h * dyc).sum((0, 1))
        else:
            dC[:, s0:s1] = torch.matmul(h, dyc.transpose(-1, -2))  # (n, e) @ (e, 1)
        torch.mul(dyc, Cc, out=gm)
        _scan_reverse_(As, gs, m, carry)  # gm = g_t
        if p.const:
            dB += (gm * duc).sum((0, 1))
        else:
            dB[:, s0:s1] = torch.matmul(gm, duc.transpose(-1, -2))
        ddu[:, s0:s1] = _sum_n(gm, Bc, p.const)
        w = a.mul_(gm)  # g_t dA_t, then times h_{t-1}
        carry = w[:, 0].clone()
        w[:, 1:].mul_(h[:, :-1])
        if h_in is not None:
            w[:, 0].mul_(h_in)
        else:
            w[:, 0].zero_()
        ddt[:, s0:s1] = torch.mul(w, p.A, out=h).sum(-2, keepdim=True)
        dA += torch.mul(w, p.dt[:, s0:s1], out=h).sum((0, 1))
    return ddt, ddu, dA, dB, dC, (carry if p.h0 is not None else None)


def _apply_gate(y: torch.Tensor, u: torch.Tensor, D, z) -> torch.Tensor:
    """y, u, z (b, l, d) in the compute dtype -> (y + D u) * silu(z)."""
    if D is not None:
        y = torch.addcmul(y, D.to(y.dtype), u)
    if z is not None:
        y = y * F.silu(z)
    return y


def _bc_grad_to_input_layout(dM: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dB/dC from _Prepared's layout back to M's layout and dtype."""
    if M.dim() == 2:
        return dM.reshape(M.shape[1], M.shape[0]).t().to(M.dtype)
    dM = dM.squeeze(-1).permute(0, 2, 3, 1)  # (b, g, n, l)
    return (dM.squeeze(1) if M.dim() == 3 else dM).to(M.dtype)


def _state_to_bdn(h: torch.Tensor) -> torch.Tensor:
    """(b, g, n, e) -> (b, d, n)."""
    b, g, n, e = h.shape
    return h.transpose(2, 3).reshape(b, g * e, n)


class _TorchScanFn(torch.autograd.Function):
    """PyTorch path: _torch_forward / _torch_backward around the D skip, z gate, bias and softplus."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
        p = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state, seq_idx)
        y, last, starts = _torch_forward(p)
        b, d, l = u.shape
        y = y.view(b, l, d)
        zf = None if z is None else _bld(z, y.dtype)
        out = _apply_gate(y, p.u.view(b, l, d), D, zf).to(u.dtype)
        ctx.save_for_backward(delta, A, B, C, D, delta_bias, initial_state)
        ctx.p, ctx.starts, ctx.y, ctx.z, ctx.delta_softplus = p, starts, y, zf, delta_softplus
        ctx.u_dtype, ctx.z_dtype = u.dtype, None if z is None else z.dtype
        ctx.set_materialize_grads(False)
        return out.transpose(1, 2), _state_to_bdn(last)  # out: (b, d, l), channels-last memory

    @staticmethod
    def backward(ctx, dout, dlast):
        delta, A, B, C, D, delta_bias, h0 = ctx.saved_tensors
        p, y, zf = ctx.p, ctx.y, ctx.z
        b, l, g, _, e = p.u.shape
        n, d, f = p.A.shape[1], g * e, p.u.dtype
        u = p.u.view(b, l, d)
        dout = torch.zeros_like(y) if dout is None else _bld(dout, f)  # (b, l, d)
        dz = None
        if zf is not None:
            sz = torch.sigmoid(zf)
            dz = (dout * _apply_gate(y, u, D, None) * sz * (1 + zf * (1 - sz))).to(ctx.z_dtype).transpose(1, 2)
            dout = dout * zf * sz  # gradient of y + D u
        dD = None if D is None else (dout * u).sum((0, 1)).to(D.dtype)
        dh_last = None if dlast is None else dlast.to(f).reshape(b, g, e, n).transpose(2, 3).contiguous()
        ddt, ddu, dA, dB, dC, dh0 = _torch_backward(p, ctx.starts, dout.view(b, l, g, 1, e), dh_last)
        ddt = torch.addcmul(ddt, ddu, p.u).view(b, l, d)
        du = (ddu * p.dt).view(b, l, d)
        if D is not None:
            du = torch.addcmul(du, dout, D.to(f))
        if ctx.delta_softplus:
            x = _bld(delta, f) if delta_bias is None else _bld(delta, f) + delta_bias.to(f)
            ddt = torch.where(x > 20, ddt, ddt * torch.sigmoid(x))  # F.softplus is linear above 20
        dbias = None if delta_bias is None else ddt.sum((0, 1)).to(delta_bias.dtype)
        dA = dA.transpose(1, 2).reshape(A.shape).to(A.dtype)
        return (du.to(ctx.u_dtype).transpose(1, 2), ddt.to(delta.dtype).transpose(1, 2), dA,
                _bc_grad_to_input_layout(dB, B), _bc_grad_to_input_layout(dC, C), dD, dz, dbias,
                None if dh0 is None else _state_to_bdn(dh0).to(h0.dtype), None, None)


# ----------------------------------------------------------------------------------------------------------
# Triton path (kernels and launchers in _triton_selective_scan.py, imported on first use)
# ----------------------------------------------------------------------------------------------------------

class _TritonScanFn(torch.autograd.Function):
    """Triton forward (saving the state at every chunk start when a gradient is needed) and backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
        from . import _triton_selective_scan as k

        store = any(ctx.needs_input_grad[:9])
        out, last, states, seg = k.scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                                            delta_softplus, store_states=store)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, states)
        ctx.seg, ctx.delta_softplus = seg, delta_softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        from . import _triton_selective_scan as k

        u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddt, dA, dB, dC, dD, dz, dbias, dh0 = k.scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, seq_idx, states, ctx.seg, dout, dlast, ctx.delta_softplus)

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (du, ddt, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias),
                cast(dh0, h0), None, None)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, seq_idx=None):
    """Mamba-1 selective scan (official ``mamba_ssm`` signature plus ``initial_state`` and ``seq_idx``).

    Args:
        u, delta: (b, d, l). A: (d, n) real. B, C: (d, n), (b, n, l) or (b, g, n, l). D, delta_bias: (d,).
        z: (b, d, l) gate. initial_state: (b, d, n), the state before position 0 (gets gradients).
        seq_idx: (b, l) int32/int64, non-decreasing: the state resets to zero where it changes.
    Returns:
        out (b, d, l) in u's dtype, possibly a channels-last view ((b, l, d) memory, what ``out_proj`` wants
        after the transpose); with ``return_last_state`` also last_state (b, d, n) float32 (float64 for float64
        inputs). All internal math is in float32 (float64 for float64 inputs).
    Layouts (CUDA): u, delta, z with stride 1 along l (the official layout) run the time-parallel Triton
    kernels, the fastest; channels-last views (stride 1 along d) run the channel-parallel ones.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    fn = _TritonScanFn if use_triton(u) else _TorchScanFn
    out, last = fn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, bool(delta_softplus))
    return (out, last) if return_last_state else out
