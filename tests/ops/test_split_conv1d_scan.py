"""mamba_split_conv1d_scan_combined: the Mamba-2 mixer after in_proj, recomputed in the backward."""
import pytest
import torch

from mambakit.modules.mamba2 import Mamba2
from mambakit.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
from numerics import DEVICE, rel_err


def mixer_args(m: Mamba2, zxbcdt, **kw):
    D = m.D.reshape(m.nheads, m.headdim) if m.D_has_hdim else m.D
    return dict(zxbcdt=zxbcdt, conv1d_weight=m.conv1d.weight[:, 0], conv1d_bias=m.conv1d.bias, dt_bias=m.dt_bias,
                A=-torch.exp(m.A_log.float()), D=D, chunk_size=m.chunk_size, headdim=m.headdim, ngroups=m.ngroups,
                rmsnorm_weight=m.norm.weight if m.rmsnorm else None, rmsnorm_eps=m.norm.eps if m.rmsnorm else 1e-6,
                norm_before_gate=m.norm.norm_before_gate if m.rmsnorm else False,
                outproj_weight=m.out_proj.weight, outproj_bias=m.out_proj.bias, **kw)


def saved_bytes(fn):
    """(fn(), bytes of the tensors autograd keeps for the backward while fn runs)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


@pytest.mark.parametrize("rmsnorm,ngroups,d_hdim", [(True, 1, False), (True, 2, True), (False, 1, False)])
def test_equals_the_module_and_saves_less(rmsnorm, ngroups, d_hdim):
    """Output and every parameter gradient equal the module's own forward (same ops, recomputed), and the
    tensors kept for the backward (in_proj's input and output, the parameters) are fewer bytes than the
    module's own forward keeps."""
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, headdim=16, ngroups=ngroups, chunk_size=16, rmsnorm=rmsnorm, D_has_hdim=d_hdim,
               device=DEVICE)
    u = torch.randn(2, 40, 64, device=DEVICE)
    g = torch.randn(2, 40, 64, device=DEVICE)

    u.requires_grad_()
    params = [u] + list(m.parameters())
    ref, ref_bytes = saved_bytes(lambda: m(u))
    ref_grads = torch.autograd.grad(ref, params, g)
    out, got_bytes = saved_bytes(lambda: mamba_split_conv1d_scan_combined(**mixer_args(m, m.in_proj(u))))
    grads = torch.autograd.grad(out, params, g)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-4
    assert got_bytes < 0.6 * ref_bytes, (got_bytes, ref_bytes)


def test_final_states_and_initial_states():
    """return_final_states equals the SSM state the module leaves in its cache after a prefill; with an
    initial state, output and gradients (initial state included) equal the same ops run without recompute."""
    from mambakit.cache import InferenceParams
    from mambakit.ops.ssd import split_conv1d_scan as sc

    torch.manual_seed(1)
    m = Mamba2(32, d_state=8, headdim=8, chunk_size=8, layer_idx=0, device=DEVICE)
    u = torch.randn(2, 24, 32, device=DEVICE)
    ip = InferenceParams(max_seqlen=64, max_batch_size=2)
    with torch.no_grad():
        m(u, inference_params=ip)
        _, last = mamba_split_conv1d_scan_combined(**mixer_args(m, m.in_proj(u), return_final_states=True))
    cached = ip.key_value_memory_dict[0][1]
    assert last.shape == cached.shape and rel_err(last, cached.float()) < 1e-5
    zxbcdt = m.in_proj(u).detach().requires_grad_()
    h0 = torch.randn(2, m.nheads, m.headdim, 8, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 24, 32, device=DEVICE)
    kw = mixer_args(m, zxbcdt, initial_states=h0)
    out = mamba_split_conv1d_scan_combined(**kw)
    grads = torch.autograd.grad(out, [zxbcdt, h0], g)
    names = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "initial_states", "rmsnorm_weight",
             "outproj_weight", "outproj_bias")
    plain = sc._mixer(*[kw.pop(k) for k in names], None, **{k: kw[k] for k in (
        "chunk_size", "headdim", "ngroups", "rmsnorm_eps", "norm_before_gate")}, dt_limit=(0.0, float("inf")),
        return_final_states=False, activation="silu")
    ref = torch.autograd.grad(plain, [zxbcdt, h0], g)
    assert rel_err(out, plain) == 0.0
    assert rel_err(grads[0], ref[0]) < 1e-6 and rel_err(grads[1], ref[1]) < 1e-6 and grads[1].abs().sum() > 0


def test_bad_shapes_raise():
    m = Mamba2(32, d_state=8, headdim=8, chunk_size=8, device=DEVICE)
    zxbcdt = torch.randn(1, 8, m.in_proj.out_features, device=DEVICE)
    kw = mixer_args(m, zxbcdt)
    with pytest.raises(ValueError, match="do not fit"):
        mamba_split_conv1d_scan_combined(**dict(kw, zxbcdt=zxbcdt[..., :-1]))
    with pytest.raises(ValueError, match="needs headdim"):
        mamba_split_conv1d_scan_combined(**dict(kw, D=m.D.reshape(-1)[: m.nheads], headdim=None))
    with pytest.raises(ValueError, match="squeeze"):
        mamba_split_conv1d_scan_combined(**dict(kw, conv1d_weight=m.conv1d.weight))


def test_module_recompute_mixer_equals_default_and_saves_memory():
    """Mamba2(recompute_mixer=True) trains through the recomputed mixer: same output and gradients as the
    default module with the same weights, fewer bytes kept for the backward; without gradients (and with a
    cache) it runs the ordinary path."""
    torch.manual_seed(2)
    kw = dict(d_state=16, headdim=16, chunk_size=16, layer_idx=0, device=DEVICE)
    base = Mamba2(64, **kw)
    rec = Mamba2(64, recompute_mixer=True, **kw)
    rec.load_state_dict(base.state_dict())
    u = torch.randn(2, 40, 64, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 40, 64, device=DEVICE)
    calls = []
    fn = rec._recomputed_mixer
    rec._recomputed_mixer = lambda *a: calls.append(1) or fn(*a)

    def run(m):
        y, saved = saved_bytes(lambda: m(u))
        return y, torch.autograd.grad(y, [u, *m.parameters()], g), saved

    y0, g0, b0 = run(base)
    y1, g1, b1 = run(rec)
    assert calls == [1] and b1 < 0.6 * b0
    assert rel_err(y1, y0) < 1e-5 and all(rel_err(a, b) < 1e-4 for a, b in zip(g1, g0))
    with torch.no_grad():
        assert rel_err(rec(u), y0) < 1e-5
    assert calls == [1]

    class Wrapped(torch.nn.Linear):  # e.g. a tensor-parallel out_proj: the recomputed mixer would bypass it
        pass
    wrapped = Wrapped(rec.out_proj.in_features, rec.out_proj.out_features, bias=False, device=DEVICE)
    wrapped.load_state_dict(rec.out_proj.state_dict())
    rec.out_proj = wrapped
    assert rel_err(rec(u), y0) < 1e-5 and calls == [1]
