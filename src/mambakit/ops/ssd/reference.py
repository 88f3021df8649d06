"""The specification of the Mamba-2 SSD scan: a plain sequential recurrence, one time step per iteration.

Slow (a Python loop over seqlen) and only meant for tests. For every head h (group g = h // (nheads // ngroups)):

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t (outer) B_t       state h_t: (headdim, dstate)
    y_t = h_t @ C_t + D * x_t,   out_t = y_t * silu(z_t)

with dt_t = clamp(softplus(dt_t + dt_bias)) as configured, and the state reset to zero wherever seq_idx changes
(the initial state belongs to the sequence at position 0).
"""

from __future__ import annotations

import torch

from mambakit.ops.ssd.inputs import apply_skip_and_gate, check_inputs, process_dt


def ssd_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
            return_varlen_states=False):
    """Same signature and returns as ``mamba_chunk_scan_combined``; ``chunk_size`` is checked but unused.

    x: (batch, seqlen, nheads, headdim), dt: (batch, seqlen, nheads), A: (nheads,),
    B, C: (batch, seqlen, ngroups, dstate). Returns out (batch, seqlen, nheads, headdim) in x's dtype,
    then final_states (batch, nheads, headdim, dstate) and varlen_states (num_seqs, nheads, headdim, dstate)
    when asked, in fp32 (float64 for float64 inputs).
    """
    a = check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                     dt_softplus, dt_limit, return_varlen_states)
    f = a.compute_dtype
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    xs, Af = x.to(f), A.to(f)
    Bh = B.to(f).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    Ch = C.to(f).repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    dts = process_dt(dt, dt_bias, dt_softplus, a.dt_limit, f)  # (b, l, h)
    state = xs.new_zeros(b, h, p, B.shape[3]) if initial_states is None else initial_states.to(f).clone()
    ys, states = [], []
    for t in range(l):
        if a.seq_idx is not None and t > 0:
            same = (a.seq_idx[:, t] == a.seq_idx[:, t - 1]).to(f)  # (b,)
            state = state * same[:, None, None, None]
        decay = torch.exp(dts[:, t] * Af)  # (b, h)
        inp = (dts[:, t, :, None] * xs[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
        if return_varlen_states:
            states.append(state)
    y = torch.stack(ys, dim=1) if l > 0 else xs.new_zeros(b, 0, h, p)  # (b, l, h, p)
    out = apply_skip_and_gate(y, xs, D, z).to(x.dtype)
    result = [out]
    if return_final_states:
        result.append(state)
    if return_varlen_states:
        ends = a.cu_seqlens[1:].long() - 1  # last position of each packed sequence
        lengths = a.cu_seqlens[1:] - a.cu_seqlens[:-1]
        varlen = torch.stack([states[int(e)][0] if int(k) > 0 else state.new_zeros(state.shape[1:])
                              for e, k in zip(ends, lengths)])
        result.append(varlen)
    return result[0] if len(result) == 1 else tuple(result)
