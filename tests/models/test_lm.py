import pytest
import torch
import torch.nn.functional as F

from mambakit import InferenceParams, MambaConfig, MambaLMHeadModel


def tiny(layer="Mamba1", **kw):
    ssm = {"layer": layer, "d_state": 8}
    if layer == "Mamba2":
        ssm.update(headdim=16, chunk_size=16)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg=ssm, pad_vocab_size_multiple=8, **kw)
    torch.manual_seed(0)
    return MambaLMHeadModel(cfg)


def test_official_parameter_names_and_tying():
    m = tiny()
    keys = set(m.state_dict())
    assert {"backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.layers.1.mixer.A_log",
            "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.dt_proj.bias",
            "backbone.norm_f.weight", "lm_head.weight"} <= keys
    assert m.lm_head.weight is m.backbone.embedding.weight
    assert m.backbone.embedding.weight.shape == (64, 32)  # 61 padded to a multiple of 8
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.backbone.embedding.weight


def test_init_matches_official_recipe():
    m = tiny()
    out_proj = m.backbone.layers[0].mixer.out_proj.weight
    # kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(fan_in); rescaled by 1/sqrt(n_layer)
    bound = (1 / out_proj.shape[1] ** 0.5) / 2 ** 0.5
    assert out_proj.abs().max() <= bound + 1e-6 and out_proj.abs().max() > 0.5 * bound
    assert abs(float(m.backbone.embedding.weight.std()) - 0.02) < 0.004
    assert m.backbone.layers[0].mixer.x_proj.bias is None


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_forward_loss_and_num_last_tokens(layer):
    m = tiny(layer)
    ids = torch.randint(0, 61, (2, 12))
    out = m(ids, labels=ids)
    assert out.logits.shape == (2, 12, 64)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    last = m(ids, num_last_tokens=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:])


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("extra", [{}, {"d_intermediate": 48}, {"rms_norm": False}, {"residual_in_fp32": False}])
def test_decoding_equals_forward(layer, extra):
    m = tiny(layer, **extra).eval()
    ids = torch.randint(0, 61, (2, 9))
    full = m(ids).logits
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    logits = [m(ids[:, :4], inference_params=params).logits]
    params.seqlen_offset = 4
    for t in range(4, 9):
        logits.append(m.decode_step(ids[:, t:t + 1], params).unsqueeze(1))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_same_gradients():
    m = tiny("Mamba2")
    ids = torch.randint(0, 61, (2, 10))
    m(ids, labels=ids).loss.backward()
    g1 = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    m.train()
    m(ids, labels=ids).loss.backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g1[k], rtol=1e-5, atol=1e-6)
    m.gradient_checkpointing_disable()
    assert not m.backbone.gradient_checkpointing


def test_bf16_autocast_and_bf16_weights_run():
    m = tiny()
    ids = torch.randint(0, 61, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = m(ids).logits
    b = m.to(torch.bfloat16)(ids).logits
    ref = tiny()(ids).logits
    assert (a.float() - ref).norm() / ref.norm() < 3e-2
    assert (b.float() - ref).norm() / ref.norm() < 3e-2


def test_bad_ids():
    m = tiny()
    with pytest.raises(ValueError, match="token id 64 is outside the vocabulary"):
        m(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="integer token ids"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="\\(batch, seqlen\\)"):
        m(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="is empty"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="MambaConfig"):
        MambaLMHeadModel({"d_model": 32})
