"""The SSD scan on Triton kernels: the autograd Function that chains the stages, and its entry point.

Forward: chunk_cumsum (dt processing, cumsum of dt*A) -> state_passing (chunk states + recurrence over chunks,
fused; split in time for long sequences on a small grid) -> chunk_scan (outputs). Backward through the same stages:
    dy = dout * silu(z)                                      (dz from the saved pre-gate output)
    state_passing backward: G_{c+1} = dLoss/dS_{c+1}, d initial_states, sp_c
    chunk_scan backward: dx, dB, dC, dD, ddt_direct (dt as the input's weight), and pieces of ddA
    chunk_cumsum backward: ddt, dA, ddt_bias.
ddA[t], the gradient of the step decay dt[t]*A, is the sum over every a[j] = dA_cs[j] with j >= t (cumsum's
transpose) of dLoss/da[j]. Per source, term by term:
  - intra-chunk, M[t', s] = (C[t'] . B[s]) exp(a[t'] - a[s]) dt[s] (dy[t'] . x[s]): a term with s < t <= t'
    depends on ddA[t], so the intra part of ddA[t] = sum_{v < t} (colsum[v] - rowsum[v]) of M;
  - the entering state, e[t'] = exp(a[t']) dy[t'] . (S_c C[t']): ddA[t] gets sum_{t' >= t} e[t'];
  - the chunk state, f[s] = dt[s] exp(a_end - a[s]) x[s] . (G B[s]): ddA[t] gets sum_{s < t} f[s];
  - the carried state, sp_c = carry exp(a_end) <G, S_c>: every ddA[t] of the chunk gets it.
Each piece is computed in fp32 from the inputs and summed on its own: adding up the per-position totals
first (the short route through dy . y) loses the result to cancellation in bf16.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton

from mambakit.ops.ssd.chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from mambakit.ops.ssd.chunk_scan import chunk_scan_bwd_dbc, chunk_scan_bwd_dx, chunk_scan_fwd
from mambakit.ops.ssd.inputs import check_inputs, dt_limited
from mambakit.ops.ssd.state_passing import state_bwd, state_fwd
from mambakit.ops.ssd.torch_path import varlen_states_from_chunks

# Block sizes per stage; scripts/gpu_check_ssd.py times variants by editing this dict. state_fwd / state_bwd
# also take TIME_SPLIT (number of parts, 1 = never split; default: state_passing.state_plan decides).
BLOCKS: dict[str, dict] = {"state_fwd": {}, "state_bwd": {}, "scan_fwd": {}, "scan_bwd_dx": {}, "scan_bwd_dbc": {}}


@contextlib.contextmanager
def overridden_blocks(stages, **blk):
    """For the calls inside the block, BLOCKS[stage] also holds ``blk`` for each of ``stages``; the entries are
    restored afterwards. The tests and scripts/gpu_check_ssd.py run kernel variants through this."""
    saved = {k: dict(BLOCKS[k]) for k in stages}
    for k in stages:
        BLOCKS[k].update(blk)
    try:
        yield
    finally:
        for k, v in saved.items():
            BLOCKS[k].clear()
            BLOCKS[k].update(v)


MAX_DSTATE = 256
MAX_HEADDIM = 256


def kernel_chunk(chunk_size: int) -> int:
    """The chunk length the kernels use: a power of two in [16, 256]. The scan's result does not depend on it."""
    return min(256, max(16, triton.next_power_of_2(chunk_size)))


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, Q, dt_softplus, dt_limit):
        limited = dt_limited(dt_limit)
        state_dtype = torch.float32 if x.dtype in (torch.float32, torch.float64) else x.dtype
        dt_p, dA_cs = chunk_cumsum_fwd(dt, A, dt_bias, dt_softplus, dt_limit, limited, Q)
        states, final = state_fwd(x, B, dt_p, dA_cs, initial_states, seq_idx, Q, state_dtype, BLOCKS["state_fwd"])
        out, y = chunk_scan_fwd(x, B, C, dt_p, dA_cs, states, D, z, seq_idx, Q, BLOCKS["scan_fwd"])
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_p, dA_cs, states, y)
        ctx.opts = (Q, dt_softplus, dt_limit, limited, initial_states is not None)
        ctx.mark_non_differentiable(states, dA_cs, dt_p)
        ctx.set_materialize_grads(False)  # dfinal stays None when the final states are not used
        return out, final, states, dA_cs, dt_p

    @staticmethod
    def backward(ctx, dout, dfinal, _dstates, _dA_cs, _dt_p):
        x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_p, dA_cs, states, y = ctx.saved_tensors
        Q, dt_softplus, dt_limit, limited, has_init = ctx.opts
        if dout is None:
            dout = torch.zeros_like(x)
        dz = None
        if z is not None:
            zf, doutf = z.float(), dout.float()
            sz = torch.sigmoid(zf)
            dz = (doutf * y.float() * sz * (1 + zf * (1 - sz))).to(z.dtype)
            dy = (doutf * zf * sz).to(x.dtype)
        else:
            dy = dout.to(x.dtype).contiguous()
        dstates, dinit, sp = state_bwd(dy, C, dA_cs, states, dfinal, seq_idx, Q, BLOCKS["state_bwd"])
        dx, ddt_dir, f, dD = chunk_scan_bwd_dx(x, B, C, dt_p, dA_cs, dstates, dy, D, seq_idx, Q,
                                               BLOCKS["scan_bwd_dx"])
        dB, dC, e, rows, cols = chunk_scan_bwd_dbc(x, B, C, dt_p, dA_cs, states, dstates, dy, seq_idx, Q,
                                                   BLOCKS["scan_bwd_dbc"])
        ddt, dA, dbias = chunk_cumsum_bwd(ddt_dir, f, e, rows, cols, sp, dt_p, dt, A, dt_bias, dt_softplus,
                                          dt_limit, limited, Q)
        return (dx, ddt, dA.to(A.dtype), dB, dC, None if dD is None else dD.to(D.dtype), dz,
                None if dbias is None else dbias.to(dt_bias.dtype), dinit if has_init else None,
                None, None, None, None)


def ssd_chunked_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                       seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                       return_final_states=False, return_varlen_states=False):
    """``mamba_chunk_scan_combined`` on the Triton kernels (same signature, shapes and returns).

    varlen_states carry no gradient (like the official op).
    """
    a = check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                     dt_softplus, dt_limit, return_varlen_states)
    b, l, h, p = x.shape
    n = B.shape[3]
    if n > MAX_DSTATE or p > MAX_HEADDIM or x.dtype == torch.float64:
        raise ValueError(f"the Triton SSD kernels take dstate <= {MAX_DSTATE}, headdim <= {MAX_HEADDIM} and "
                         f"fp32/fp16/bf16 inputs (got dstate={n}, headdim={p}, {x.dtype}); use "
                         "MAMBAKIT_BACKEND=torch for this shape")
    Q = kernel_chunk(chunk_size)
    # the kernels read x, dt, B, C, z, D, seq_idx and initial_states through their strides; A and dt_bias
    # (nheads,) are read as contiguous vectors
    A_ = A.float().contiguous()
    bias = None if dt_bias is None else dt_bias.contiguous()
    init = None if initial_states is None else initial_states.float()
    D_ = None if D is None else D.float()
    out, final, states, dA_cs, dt_p = _SSDFn.apply(x, dt, A_, B, C, D_, z, bias, init, a.seq_idx, Q,
                                                   bool(dt_softplus), a.dt_limit)
    result = [out]
    if return_final_states:
        result.append(final)
    if return_varlen_states:
        nchunks = dt_p.shape[2]
        with torch.no_grad():
            result.append(varlen_states_from_chunks(
                a.cu_seqlens, x[0], dt_p[0].permute(1, 2, 0).reshape(nchunks * Q, h), B[0],
                dA_cs[0].permute(1, 2, 0).reshape(nchunks * Q, h), states[0].float(), Q))
    return result[0] if len(result) == 1 else tuple(result)
