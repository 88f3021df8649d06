"""InferenceParams round trips: clone, select and save/load must give a cache from which generation continues
exactly as from the original (Mamba-1, Mamba-2, and a hybrid whose attention layers read lengths_per_sample)."""
import pytest
import torch

from mambakit import InferenceParams, MambaConfig, MambaLMHeadModel
from mambakit.inference.generate import generate

VOCAB = 48
SSM = {"mamba1": {"d_state": 8},
       "mamba2": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
       "hybrid": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}}


def tiny(kind: str) -> MambaLMHeadModel:
    torch.manual_seed(0)
    hybrid = kind == "hybrid"
    config = MambaConfig(d_model=32, n_layer=3 if hybrid else 2, vocab_size=VOCAB, ssm_cfg=SSM[kind],
                         pad_vocab_size_multiple=16, attn_layer_idx=[1] if hybrid else [],
                         attn_cfg={"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "rotary_emb_dim": 4,
                                   "d_conv": 4} if hybrid else {})
    model = MambaLMHeadModel(config).eval()  # float32: CPU float64 depthwise conv1d is very slow
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(20.0)  # spread logits: greedy choices are not near-ties
    return model


@pytest.fixture(scope="module", params=["mamba1", "mamba2", "hybrid"])
def prefilled(request):
    """(model, cache after a 3-row prompt + 3 generated tokens, the next tokens to feed)."""
    model = tiny(request.param)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    _, cache = generate(model, ids, max_new_tokens=3, return_cache=True)
    if cache.lengths_per_sample is not None:
        with torch.inference_mode():  # rows at different positions, as after a left-padded prompt
            cache.lengths_per_sample[1] -= 3
    return model, cache, torch.randint(1, VOCAB, (3, 2), generator=g)


def continue_from(model, cache, new_ids):
    return generate(model, new_ids, inference_params=cache, max_new_tokens=5)


def assert_same_cache(a: InferenceParams, b: InferenceParams):
    assert (a.seqlen_offset, a.max_seqlen, a.max_batch_size) == (b.seqlen_offset, b.max_seqlen, b.max_batch_size)
    assert a.key_value_memory_dict.keys() == b.key_value_memory_dict.keys()
    for k, states in a.key_value_memory_dict.items():
        for s, t in zip(states, b.key_value_memory_dict[k]):
            assert torch.equal(s, t), k
    assert (a.lengths_per_sample is None) == (b.lengths_per_sample is None)
    if a.lengths_per_sample is not None:
        assert torch.equal(a.lengths_per_sample, b.lengths_per_sample)


def test_clone_is_deep_and_continues_like_the_original(prefilled):
    model, cache, new = prefilled
    copy = cache.clone()
    assert_same_cache(copy, cache)
    want = continue_from(model, cache.clone(), new)
    assert torch.equal(continue_from(model, copy, new), want)
    assert copy.seqlen_offset > cache.seqlen_offset  # the copy advanced, the original did not
    assert torch.equal(continue_from(model, cache.clone(), new), want)


def test_select_keeps_rows(prefilled):
    model, cache, new = prefilled
    want = continue_from(model, cache.clone(), new)
    rows = [2, 1]
    assert torch.equal(continue_from(model, cache.select(rows), new[rows]), want[rows])


def test_save_load_round_trip(prefilled, tmp_path):
    model, cache, new = prefilled
    cache.save(tmp_path / "state.safetensors")
    loaded = InferenceParams.load(tmp_path / "state.safetensors")
    assert_same_cache(loaded, cache)
    if any(len(s) == 2 and s[0].dim() == 5 for s in cache.key_value_memory_dict.values()):
        assert loaded.lengths_per_sample is not None  # the hybrid's per-row positions survive the file
    assert torch.equal(continue_from(model, loaded, new), continue_from(model, cache.clone(), new))


def test_lengths_per_sample_round_trip(tmp_path):
    params = InferenceParams(max_seqlen=9, max_batch_size=2, seqlen_offset=5, batch_size_offset=1,
                             lengths_per_sample=torch.tensor([5, 3], dtype=torch.int32),
                             key_value_memory_dict={0: (torch.randn(2, 4, 3), torch.randn(2, 4, 2))})
    params.save(tmp_path / "s.safetensors")
    loaded = InferenceParams.load(tmp_path / "s.safetensors")
    assert_same_cache(loaded, params)
    assert loaded.batch_size_offset == 1 and loaded.lengths_per_sample.dtype == torch.int32


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a mambakit inference state"):
        InferenceParams.load(tmp_path / "x.safetensors")
