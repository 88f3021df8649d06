"""Attention mixer (MHA) for hybrid models: official names/shapes, forward vs an independent float64 reference,
KV-cache decoding and chunked prefill vs one forward (host-int and device-tensor positions), packed sequences,
and hybrid MambaLMHeadModels (Mamba-1 and Mamba-2 layers) decoding like their forward pass."""
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import InferenceParams, MambaConfig, MambaLMHeadModel
from mambakit.modules.attention import MHA


# ---- an independent reference: float64, per-head loops, complex-number rotary, tap-by-tap conv -------------
def _ref_rotary(x, pos, rotary_dim, base, interleaved):
    """x (b, l, h, d) float64; pos (b, l) -> x with the first rotary_dim dims rotated (complex multiply)."""
    if rotary_dim == 0:
        return x
    r = rotary_dim // 2
    theta = base ** (-torch.arange(r, dtype=torch.float64) * 2 / rotary_dim)
    phase = torch.polar(torch.ones(1, dtype=torch.float64), pos.double()[..., None] * theta)[:, :, None]  # (b,l,1,r)
    if interleaved:
        z = torch.complex(x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]) * phase
        rot = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        z = torch.complex(x[..., :r], x[..., r:rotary_dim]) * phase
        rot = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([rot, x[..., rotary_dim:]], dim=-1)


def _ref_conv(x, weight, bias, seq_idx):
    """x (b, l, c); weight (c, 1, w): out[t] = bias + sum_k w[k] x[t - (w-1) + k], within one sequence."""
    b, l, c = x.shape
    w = weight.shape[-1]
    out = bias.double().expand(b, l, c).clone()
    for k in range(w):
        shift = w - 1 - k
        src = torch.zeros_like(x)
        src[:, shift:] = x[:, : l - shift]
        if seq_idx is not None and shift:
            same = torch.zeros(b, l, dtype=torch.bool)
            same[:, shift:] = seq_idx[:, shift:] == seq_idx[:, : l - shift]
            src = src * same[..., None]
        out = out + src * weight[:, 0, k].double()
    return out


def ref_mha(m: MHA, x: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """The attention layer's output in float64, written from the layer's definition, not from its code."""
    x = x.double()
    b, l, _ = x.shape
    h, hkv, d = m.num_heads, m.num_heads_kv, m.head_dim
    bias = lambda lin: 0 if lin.bias is None else lin.bias.double()  # noqa: E731
    proj = x @ m.in_proj.weight.double().T + bias(m.in_proj)
    qkv, mlp = proj[..., : m.qkv_dim], proj[..., m.qkv_dim:]
    if m.d_conv > 0:
        qkv = _ref_conv(qkv, m.conv1d.weight, m.conv1d.bias, seq_idx)
    q = qkv[..., : h * d].reshape(b, l, h, d)
    k = qkv[..., h * d: (h + hkv) * d].reshape(b, l, hkv, d)
    v = qkv[..., (h + hkv) * d:].reshape(b, l, hkv, d)
    seg = torch.zeros(b, l, dtype=torch.long) if seq_idx is None else seq_idx.long()
    pos = torch.zeros(b, l, dtype=torch.long)
    for t in range(1, l):
        pos[:, t] = torch.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
    q = _ref_rotary(q, pos, m.rotary_emb_dim, m.rotary_emb_base, m.rotary_emb_interleaved)
    k = _ref_rotary(k, pos, m.rotary_emb_dim, m.rotary_emb_base, m.rotary_emb_interleaved)
    scale = m.softmax_scale if m.softmax_scale is not None else 1 / math.sqrt(d)
    allowed = seg[:, :, None] == seg[:, None, :]
    if m.causal:
        allowed = allowed & torch.ones(l, l, dtype=torch.bool).tril()
    ctx = torch.empty(b, l, h, d, dtype=torch.float64)
    for head in range(h):
        kh = head // (h // hkv)
        scores = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kh]) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        ctx[:, :, head] = probs @ v[:, :, kh]
    ctx = ctx.reshape(b, l, h * d)
    if m.mlp_dim > 0:
        up, gate = mlp.chunk(2, dim=-1)
        ctx = torch.cat([ctx, up * F.silu(gate)], dim=-1)
    return ctx @ m.out_proj.weight.double().T + bias(m.out_proj)


CONFIGS = {
    "mha-rotary-conv": dict(num_heads=4, rotary_emb_dim=8, d_conv=4, qkv_proj_bias=False, out_proj_bias=False),
    "gqa-interleaved-mlp": dict(num_heads=4, num_heads_kv=2, head_dim=16, rotary_emb_dim=16,
                                rotary_emb_interleaved=True, mlp_dim=40, softmax_scale=0.3),
    "mqa-partial-rotary": dict(num_heads=4, num_heads_kv=1, head_dim=12, rotary_emb_dim=4, d_conv=3,
                               rotary_emb_base=500.0),
    "plain": dict(num_heads=2),
}


def make(name, d_model=32, **kw):
    torch.manual_seed(0)
    m = MHA(d_model, causal=True, layer_idx=0, **{**CONFIGS[name], **kw})
    with torch.no_grad():  # random biases so that a missing bias shows up
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    return m


# ---- parameters -------------------------------------------------------------------------------------------
def test_mamba2attn_2_7b_attention_shapes_match_official():
    m = MHA(2560, num_heads=30, num_heads_kv=30, head_dim=128, rotary_emb_dim=64, d_conv=4, causal=True,
            qkv_proj_bias=False, out_proj_bias=False)  # real CPU tensors: meta init imports torch._dynamo (s)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj.weight": (11520, 2560), "conv1d.weight": (11520, 1, 4), "conv1d.bias": (11520,),
                      "out_proj.weight": (2560, 3840)}


def test_mlp_dim_rounds_like_official():
    m = MHA(32, num_heads=4, mlp_dim=100)
    assert m.mlp_dim == 256
    assert m.in_proj.weight.shape == (3 * 32 + 256, 32) and m.out_proj.weight.shape == (32, 32 + 128)


@pytest.mark.parametrize("kw, msg", [(dict(num_heads=3, num_heads_kv=2), "multiple of num_heads_kv"),
                                     (dict(num_heads=5), "not divisible by num_heads"),
                                     (dict(num_heads=4, rotary_emb_dim=9), "rotary_emb_dim")])
def test_bad_arguments_are_clear(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MHA(32, **kw)


# ---- forward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seqlen", [1, 63])
def test_forward_matches_reference(name, seqlen):
    m = make(name)
    x = torch.randn(2, seqlen, 32)
    torch.testing.assert_close(m(x).double(), ref_mha(m, x), rtol=1e-4, atol=1e-5)


def test_gradients_match_reference():
    m = make("gqa-interleaved-mlp", d_conv=4)
    x = torch.randn(2, 17, 32, requires_grad=True)
    grad_out = torch.randn(2, 17, 32)
    m(x).backward(grad_out)
    got = {"x": x.grad.clone(), **{k: p.grad.clone() for k, p in m.named_parameters()}}
    m.zero_grad()
    x.grad = None
    (ref_mha(m, x) * grad_out.double()).sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(got["x"], x.grad, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_reference():
    m = make("mha-rotary-conv")
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        ref = ref_mha(m, x)
        out16 = m.to(torch.bfloat16)(x.bfloat16())
    err = float((out16.double() - ref).norm() / ref.norm())
    assert err < 2e-2


def test_packed_sequences_equal_separate_runs():
    m = make("mha-rotary-conv")
    lens = [5, 1, 9]
    xs = [torch.randn(1, n, 32) for n in lens]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = m(torch.cat(xs, 1), cu_seqlens=cu)
    torch.testing.assert_close(packed, torch.cat([m(x) for x in xs], 1), rtol=1e-5, atol=1e-6)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lens)).unsqueeze(0).int()
    torch.testing.assert_close(m(torch.cat(xs, 1), seq_idx=seq_idx).double(),
                               ref_mha(m, torch.cat(xs, 1), seq_idx), rtol=1e-4, atol=1e-5)


# ---- KV cache ---------------------------------------------------------------------------------------------
def _run_chunks(m, x, chunks, params, bogus_offset=False):
    outs, t = [], 0
    for n in chunks:
        if bogus_offset and params.seqlen_offset > 0:
            params.lengths_per_sample.fill_(t)
            params.seqlen_offset = 10_000  # a captured graph replays a stale host offset: it must be ignored
        outs.append(m(x[:, t:t + n], inference_params=params))
        t += n
        params.seqlen_offset = t
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", ["mha-rotary-conv", "gqa-interleaved-mlp", "mqa-partial-rotary"])
@pytest.mark.parametrize("chunks", [[5] + [1] * 6, [3, 4, 1, 2, 1]])
def test_cache_decoding_and_chunked_prefill_equal_forward(name, chunks):
    m = make(name)
    x = torch.randn(2, sum(chunks), 32)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    torch.testing.assert_close(_run_chunks(m, x, chunks, params), m(x), rtol=1e-4, atol=1e-5)
    kv = params.key_value_memory_dict[0][0]
    assert kv.shape == (2, 16, 2, m.num_heads_kv, m.head_dim)


@pytest.mark.parametrize("name", ["mha-rotary-conv", "gqa-interleaved-mlp"])
def test_lengths_per_sample_drives_positions(name):
    """The CUDA-graph path: positions come from the device tensor, the host seqlen_offset only says 'continue'."""
    m = make(name)
    x = torch.randn(3, 9, 32)
    params = InferenceParams(max_seqlen=12, max_batch_size=3,
                             lengths_per_sample=torch.zeros(3, dtype=torch.int32))
    got = _run_chunks(m, x, [4, 1, 2, 1, 1], params, bogus_offset=True)
    torch.testing.assert_close(got, m(x), rtol=1e-4, atol=1e-5)


def test_rows_at_different_positions():
    """lengths_per_sample may differ per row: each row writes and attends at its own position."""
    m = make("mha-rotary-conv", d_conv=0)
    x = torch.randn(2, 7, 32)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    m(x[:, :6], inference_params=params)
    params.seqlen_offset = 6
    params.lengths_per_sample = torch.tensor([6, 3], dtype=torch.int32)
    step = m(torch.stack([x[0, 6], x[1, 3]]).unsqueeze(1), inference_params=params)
    torch.testing.assert_close(step[0, 0], m(x[:1])[0, 6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step[1, 0], m(x[1:, :4])[0, 3], rtol=1e-4, atol=1e-5)


def _padded_prefill(run, x, lens, chunks, params):
    """Feed left-padded rows the way generate does: seq_idx marks padding (0) vs prompt (1), rows whose prompt
    starts exactly at a chunk get their state zeroed, lengths_per_sample counts each row's real tokens.
    run(chunk, seq_idx) -> output (b, chunk_len, ...); x: (b, L, ...) padded. Returns the outputs (b, L, ...)."""
    b, L = x.shape[:2]
    starts = [L - n for n in lens]
    mask = torch.zeros(b, L, dtype=torch.int32)
    for r, st in enumerate(starts):
        mask[r, st:] = 1
    outs, s = [], 0
    for n in chunks:
        e = s + n
        if s > 0:
            fresh = torch.tensor([st >= s for st in starts])
            for t in params.key_value_memory_dict.values():
                for state in t:
                    state.masked_fill_(fresh.view(-1, *[1] * (state.dim() - 1)), 0)
        outs.append(run(x[:, s:e], mask[:, s:e]))
        params.lengths_per_sample += mask[:, s:e].sum(1).int()
        params.seqlen_offset += n
        s = e
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", ["mha-rotary-conv", "gqa-interleaved-mlp"])
@pytest.mark.parametrize("chunks", [[8], [3, 3, 2]])
def test_left_padded_rows_equal_unpadded_rows(name, chunks):
    """Padding never reaches the cache: each row prefills and decodes as it would alone."""
    m = make(name)
    lens, n_dec, L = [8, 2, 5], 3, 8
    rows = [torch.randn(1, n + n_dec, 32) for n in lens]
    x = torch.randn(3, L, 32)  # random padding: it must not leak
    for r, n in enumerate(lens):
        x[r, L - n:] = rows[r][0, :n]
    params = InferenceParams(max_seqlen=L + n_dec, max_batch_size=3,
                             lengths_per_sample=torch.zeros(3, dtype=torch.int32))
    pre = _padded_prefill(lambda xc, sc: m(xc, inference_params=params, seq_idx=sc), x, lens, chunks, params)
    dec = []
    for t in range(n_dec):
        step_in = torch.stack([rows[r][0, n + t] for r, n in enumerate(lens)]).unsqueeze(1)
        dec.append(m(step_in, inference_params=params))
        params.lengths_per_sample += 1
        params.seqlen_offset += 1
    dec = torch.cat(dec, 1)
    for r, n in enumerate(lens):
        alone = m(rows[r])[0]
        torch.testing.assert_close(pre[r, L - n:], alone[:n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dec[r], alone[n:], rtol=1e-4, atol=1e-5)


def test_padding_with_cache_needs_lengths_per_sample():
    m = make("plain")
    params = InferenceParams(max_seqlen=8, max_batch_size=1)
    with pytest.raises(ValueError, match="lengths_per_sample"):
        m(torch.randn(1, 3, 32), inference_params=params, seq_idx=torch.tensor([[0, 1, 1]], dtype=torch.int32))


def test_cache_errors_are_clear():
    m = make("plain")
    params = InferenceParams(max_seqlen=4, max_batch_size=1)
    with pytest.raises(ValueError, match="max_seqlen=4"):
        m(torch.randn(1, 5, 32), inference_params=params)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 3, 32), inference_params=params, cu_seqlens=torch.tensor([0, 1, 3]))


# ---- hybrid language models --------------------------------------------------------------------------------
ATTN_CFG = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 8, "d_conv": 4,
            "qkv_proj_bias": False, "out_proj_bias": False}


def hybrid(layer, **kw):
    ssm = {"layer": layer, "d_state": 8}
    if layer == "Mamba2":
        ssm.update(headdim=16, chunk_size=16)
    cfg = MambaConfig(d_model=32, n_layer=3, vocab_size=61, ssm_cfg=ssm, attn_layer_idx=[1],
                      attn_cfg=dict(ATTN_CFG), **kw)
    torch.manual_seed(0)
    return MambaLMHeadModel(cfg).eval()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_hybrid_attention_layer_matches_reference(layer):
    m = hybrid(layer)
    mixer = m.backbone.layers[1].mixer
    assert isinstance(mixer, MHA) and mixer.causal
    seen = {}
    mixer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    m(torch.randint(0, 61, (2, 20)))
    torch.testing.assert_close(seen["out"].double(), ref_mha(mixer, seen["x"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("extra", [{}, {"d_intermediate": 48}])
def test_hybrid_decoding_and_chunked_prefill_equal_forward(layer, extra):
    m = hybrid(layer, **extra)
    ids = torch.randint(0, 61, (2, 12))
    full = m(ids).logits
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    logits = [m(ids[:, :3], inference_params=params).logits]
    params.seqlen_offset = 3
    logits.append(m(ids[:, 3:7], inference_params=params).logits)  # a chunk of a chunked prefill
    params.seqlen_offset = 7
    for t in range(7, 12):
        logits.append(m.decode_step(ids[:, t:t + 1], params).unsqueeze(1))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_mamba2attn_checkpoint_layout():
    """The state-spaces/mamba2attn-2.7b config (d_model shrunk from 2560 to keep the test fast) builds with the
    official parameter names."""
    cfg = MambaConfig(d_model=64, n_layer=64, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                      attn_layer_idx=[9, 18, 27, 36, 45, 56],
                      attn_cfg={"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "num_heads_kv": 30,
                                "out_proj_bias": False, "qkv_proj_bias": False, "rotary_emb_dim": 64})
    sd = MambaLMHeadModel(cfg).state_dict()
    for i in cfg.attn_layer_idx:
        prefix = f"backbone.layers.{i}."
        keys = {k[len(prefix):] for k in sd if k.startswith(prefix)}
        assert keys == {"norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                        "mixer.out_proj.weight"}
        assert sd[prefix + "mixer.in_proj.weight"].shape == (11520, 64)
        assert sd[prefix + "mixer.out_proj.weight"].shape == (64, 3840)
    assert "backbone.layers.8.mixer.A_log" in sd and "backbone.layers.9.mixer.A_log" not in sd


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_hybrid_left_padded_batch_equals_rows_alone(layer):
    """generate's protocol for ragged prompts (seq_idx + lengths_per_sample) on a hybrid model."""
    m = hybrid(layer)
    lens, n_dec, L = [9, 4], 3, 9
    rows = [torch.randint(0, 61, (1, n + n_dec)) for n in lens]
    ids = torch.randint(0, 61, (2, L))
    for r, n in enumerate(lens):
        ids[r, L - n:] = rows[r][0, :n]
    params = InferenceParams(max_seqlen=L + n_dec, max_batch_size=2,
                             lengths_per_sample=torch.zeros(2, dtype=torch.int32))
    pre = _padded_prefill(lambda ic, sc: m(ic, inference_params=params, seq_idx=sc).logits, ids, lens, [4, 5],
                          params)
    dec = []
    for t in range(n_dec):
        dec.append(m.decode_step(torch.tensor([[rows[r][0, n + t]] for r, n in enumerate(lens)]), params))
        params.lengths_per_sample += 1
        params.seqlen_offset += 1
    dec = torch.stack(dec, 1)
    for r, n in enumerate(lens):
        alone = m(rows[r]).logits[0]
        torch.testing.assert_close(pre[r, L - n:], alone[:n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dec[r], alone[n:], rtol=1e-4, atol=1e-4)


def test_generate_ragged_hybrid_batch_equals_rows_alone():
    """End to end through generate (left padding, chunked prefill, lengths_per_sample)."""
    m = hybrid("Mamba2")
    prompts = [[1, 2, 3, 4, 5, 9, 10], [6, 7], [11, 12, 13]]
    out = m.generate(prompts, max_new_tokens=5, prefill_chunk_size=3)
    for i, p in enumerate(prompts):
        alone = m.generate(torch.tensor([p]), max_new_tokens=5)
        assert torch.equal(out[i, -5:], alone[0, len(p):]), f"row {i}"
