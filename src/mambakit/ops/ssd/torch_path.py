"""The SSD scan in vectorised PyTorch: the chunked matrix form of the Mamba-2 paper (Listing 1, "ssd_minimal").

Runs on any device; autograd through it is the CPU backward. The sequence is cut into chunks of Q positions:
1. intra-chunk outputs: the quadratic (attention-like) form (C B^T * L) x, L the causal decay mask exp(segsum);
2. chunk states: the state each chunk adds by its end, B^T (decay_to_end * dt * x);
3. state passing: a short recurrence over chunks gives the state entering every chunk;
4. inter-chunk outputs: C . state_entering_chunk * exp(cumsum of dt*A from the chunk start).
Packed sequences (seq_idx) mask the decay across a sequence boundary in steps 1, 2, 3 and 4.
All math in fp32 (float64 for float64 inputs). The result does not depend on Q, so on CPU we use a smaller
internal chunk than the caller's (the quadratic part costs O(l * Q)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.ssd.inputs import apply_skip_and_gate, check_inputs, process_dt

# On CPU the quadratic intra-chunk part dominates; 64 was fastest at b2 l1024 h8 p64 n128 (2 cores).
CPU_CHUNK = 64


def ssd_chunked_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                      seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                      return_final_states=False, return_varlen_states=False):
    """``mamba_chunk_scan_combined`` in PyTorch (same signature, shapes and returns)."""
    a = check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                     dt_softplus, dt_limit, return_varlen_states)
    f = a.compute_dtype
    Q = min(chunk_size, CPU_CHUNK) if x.device.type == "cpu" else chunk_size
    dts = process_dt(dt, dt_bias, dt_softplus, a.dt_limit, f)  # (b, l, h)
    init = None if initial_states is None else initial_states.to(f)
    y, final, pieces = ssd_scan_core(x.to(f), dts, A.to(f), B.to(f), C.to(f), Q, init, a.seq_idx)
    out = apply_skip_and_gate(y, x, D, z).to(x.dtype)
    result = [out]
    if return_final_states:
        result.append(final)
    if return_varlen_states:
        xc, dtc, Bc, Acs, prev = (t[0] for t in pieces)  # batch 1: (c, Q, ...) and prev (c, h, p, n)
        L = Acs.shape[0] * Q  # padded length
        result.append(varlen_states_from_chunks(a.cu_seqlens, xc.reshape(L, *xc.shape[2:]), dtc.reshape(L, -1),
                                                Bc.reshape(L, *Bc.shape[2:]), Acs.reshape(L, -1), prev, Q))
    return result[0] if len(result) == 1 else tuple(result)


def ssd_scan_core(x, dt, A, B, C, Q: int, initial_states=None, seq_idx=None):
    """The scan without D and gate. x: (b, l, h, p), dt: (b, l, h) processed, A: (h,), B, C: (b, l, g, n).

    Returns y (b, l, h, p), final state (b, h, p, n) and, for the varlen states, the chunked pieces
    (x, dt, B (b, c, Q, ...), dA_cumsum (b, c, Q, h), states entering each chunk (b, c, h, p, n)).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    pad = (-l) % Q
    if pad:  # padded steps have dt = 0: no decay and no input, so the state passes through them
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // Q
    xc = x.reshape(b, c, Q, h, p)
    dtc = dt.reshape(b, c, Q, h)
    Bc = B.reshape(b, c, Q, g, n)
    Cc = C.reshape(b, c, Q, g, n)
    Acs = torch.cumsum(dtc * A, dim=2)  # (b, c, Q, h)
    seq = None if seq_idx is None else seq_idx.reshape(b, c, Q)
    seq_prev = None if seq is None else torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (b, c)

    xdt = xc * dtc[..., None]  # (b, c, Q, h, p)
    y_diag = _intra_chunk(xdt, Acs, Bc, Cc, seq)  # (b, c, Q, h, p)
    states = _chunk_states(xdt, Acs, Bc, seq)  # (b, c, h, p, n)
    prev, final = _pass_states(states, Acs[:, :, -1], initial_states, seq, seq_prev)
    y_off = _state_outputs(Cc, prev, Acs, seq, seq_prev)  # (b, c, Q, h, p)
    y = (y_off + y_diag).reshape(b, c * Q, h, p)[:, :l]  # contiguous first: the sum comes out contiguous
    return y, final, (xc, dtc, Bc, Acs, prev)


def _intra_chunk(xdt, Acs, Bc, Cc, seq):
    """Quadratic form inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(Acs_t - Acs_s) dt_s x_s.

    xdt: (b, c, Q, h, p) = dt * x, Acs: (b, c, Q, h), Bc, Cc: (b, c, Q, g, n) -> (b, c, Q, h, p).
    """
    b, c, Q, h, p = xdt.shape
    g = Bc.shape[3]
    Ah = Acs.permute(0, 1, 3, 2)  # (b, c, h, Q)
    seg = Ah[..., :, None] - Ah[..., None, :]  # (b, c, h, Q_t, Q_s)
    keep = torch.ones(Q, Q, dtype=torch.bool, device=xdt.device).tril()
    if seq is not None:
        keep = keep & (seq[:, :, None, :, None] == seq[:, :, None, None, :])  # (b, c, 1, Q, Q)
    # mask before exp: above the diagonal seg > 0 and exp could overflow (inf * 0 = nan)
    L = torch.exp(seg.masked_fill(~keep, float("-inf")))  # (b, c, h, Q, Q)
    CB = Cc.permute(0, 1, 3, 2, 4) @ Bc.permute(0, 1, 3, 4, 2)  # (b, c, g, Q_t, Q_s)
    W = L.view(b, c, g, h // g, Q, Q) * CB[:, :, :, None]
    return (W.view(b, c, h, Q, Q) @ xdt.permute(0, 1, 3, 2, 4)).permute(0, 1, 3, 2, 4)


def _chunk_states(xdt, Acs, Bc, seq):
    """State added by each chunk at its end: sum_s exp(Acs_end - Acs_s) dt_s x_s (outer) B_s.

    xdt: (b, c, Q, h, p) = dt * x, Acs: (b, c, Q, h), Bc: (b, c, Q, g, n) -> (b, c, h, p, n).
    """
    b, c, Q, h, p = xdt.shape
    g, n = Bc.shape[3:]
    w = torch.exp(Acs[:, :, -1:] - Acs)  # (b, c, Q, h)
    if seq is not None:  # only the sequence that is still running at the chunk's end carries on
        w = w * (seq == seq[:, :, -1:])[..., None]
    xw = (xdt * w[..., None]).reshape(b, c, Q, g, (h // g) * p).permute(0, 1, 3, 4, 2)  # (b, c, g, hg*p, Q)
    return (xw @ Bc.permute(0, 1, 3, 2, 4)).reshape(b, c, h, p, n)


def _pass_states(states, A_chunk, initial_states, seq, seq_prev):
    """Recurrence over chunks. states: (b, c, h, p, n), A_chunk: (b, c, h) total dt*A of each chunk.

    Returns the state entering each chunk (b, c, h, p, n) and the final state (b, h, p, n).
    """
    decay = torch.exp(A_chunk)  # (b, c, h)
    if seq is not None:  # the carried state survives a chunk only if no new sequence ends it
        decay = decay * (seq[:, :, -1] == seq_prev)[..., None]
    return _StatePassing.apply(states, decay, initial_states)


class _StatePassing(torch.autograd.Function):
    """S_{k+1} = decay_k S_k + states_k, with a hand-written backward (G_k = dprev_k + decay_k G_{k+1}):
    autograd through the Python loop would record a node per chunk and op and stack/unbind every state."""

    @staticmethod
    def forward(ctx, states, decay, initial_states):
        b, c, h, p, n = states.shape
        prev = torch.empty_like(states)
        state = states.new_zeros(b, h, p, n) if initial_states is None else initial_states
        for k in range(c):
            prev[:, k] = state
            state = torch.addcmul(states[:, k], decay[:, k, :, None, None], state)
        ctx.save_for_backward(decay, prev)
        ctx.has_init = initial_states is not None
        return prev, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dprev, dfinal):
        decay, prev = ctx.saved_tensors
        b, c, h, p, n = prev.shape
        G = prev.new_zeros(b, h, p, n) if dfinal is None else dfinal.clone()  # dLoss/dS_{k+1}
        dstates = torch.empty_like(prev)
        for k in reversed(range(c)):
            dstates[:, k] = G
            G = decay[:, k, :, None, None] * G
            if dprev is not None:
                G += dprev[:, k]
        ddecay = torch.einsum("bchpn,bchpn->bch", dstates, prev)
        return dstates, ddecay, G if ctx.has_init else None


def _state_outputs(Cc, prev, Acs, seq, seq_prev):
    """Contribution of the state entering each chunk: y_t = exp(Acs_t) C_t . state."""
    b, c, Q, g, n = Cc.shape
    h, p = prev.shape[2:4]
    Sg = prev.reshape(b, c, g, (h // g) * p, n)
    y = Cc.permute(0, 1, 3, 2, 4) @ Sg.transpose(-1, -2)  # (b, c, g, Q, hg*p)
    y = y.permute(0, 1, 3, 2, 4).reshape(b, c, Q, h, p)
    scale = torch.exp(Acs)  # (b, c, Q, h)
    if seq is not None:
        scale = scale * (seq == seq_prev[..., None])[..., None]
    return y * scale[..., None]


def varlen_states_from_chunks(cu_seqlens, x, dt, B, Acs, prev, Q: int):
    """Final state of every packed sequence (batch 1): (num_seqs, h, p, n).

    x: (l, h, p), dt: (c*Q, h) processed (0 past l), B: (l, g, n), Acs: (c*Q, h) within-chunk cumsum of dt*A,
    prev: (c, h, p, n) state entering each chunk. The state at a sequence's last position e (in chunk k) is
    the state entering chunk k decayed to e, when the sequence started before chunk k (or at position 0,
    where the initial state belongs), plus the inputs of chunk k from the sequence's start to e.
    """
    l, h, p = x.shape
    g, n = B.shape[1:]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long() - 1  # (N,)
    k = ends.clamp_min(0) // Q
    e_loc = ends.clamp_min(0) - k * Q
    pos = k[:, None] * Q + torch.arange(Q, device=x.device)  # (N, Q)
    valid = (pos >= starts[:, None]) & (pos <= ends[:, None])  # (N, Q)
    Ak = Acs[pos]  # (N, Q, h)
    A_end = Ak.gather(1, e_loc[:, None, None].expand(-1, 1, h))  # (N, 1, h)
    w = torch.exp((A_end - Ak).masked_fill(~valid[..., None], float("-inf"))) * dt[pos]  # (N, Q, h)
    N = k.shape[0]
    pos_in = pos.clamp_max(l - 1)  # positions past l have w = 0
    xw = (x[pos_in].to(w.dtype) * w[..., None]).reshape(N, Q, g, (h // g) * p).permute(0, 2, 3, 1)
    inner = (xw @ B[pos_in].to(w.dtype).permute(0, 2, 1, 3)).reshape(N, h, p, n)  # (N, h, p, n)
    carry = ((starts < k * Q) | (starts == 0)) & (ends >= starts)  # (N,)
    outer = prev[k].to(w.dtype) * (torch.exp(A_end[:, 0]) * carry[:, None])[..., None, None]
    return inner + outer
