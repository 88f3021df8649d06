"""TEMPORARY torch-only selective_state_update written by the lead to unblock imports; helper-1 replaces it."""
import torch
import torch.nn.functional as F


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    has_heads = state.dim() == 4
    if not has_heads:
        state_v, x, dt, A, B, C = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), B.unsqueeze(1), C.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    else:
        state_v = state
    b, h, p, n = state_v.shape
    if dt.dim() == 2:
        dt = dt.unsqueeze(-1).expand(b, h, p)
    if A.dim() == 1:
        A = A[:, None, None].expand(h, p, n)
    if dt_bias is not None and dt_bias.dim() == 1:
        dt_bias = dt_bias[:, None].expand(h, p)
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(h, p)
    g = B.shape[1]
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dtf = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    if dt_softplus:
        dtf = F.softplus(dtf)
    dA = torch.exp(dtf.unsqueeze(-1) * A.float())
    st = state_v.float() if state_batch_indices is None else state_v[state_batch_indices].float()
    st = st * dA + (dtf * x.float()).unsqueeze(-1) * Bh.unsqueeze(2)
    if state_batch_indices is None:
        state_v.copy_(st)
    else:
        state_v[state_batch_indices] = st.to(state_v.dtype)
    out = (st * Ch.unsqueeze(2)).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


selective_state_update = selective_state_update_ref
