"""cg=True: what generate does around a captured decode step, checked on CPU with a stand-in decoder that has
the captured graph's behaviour (static input, static logits overwritten by every call, its own state tensors).
The real capture runs in scripts/gpu_check_generate.py and in the CUDA-only test at the end."""
import pytest
import torch
from gen_helpers import random_ids

import mambakit.inference.generate as gen_mod
from mambakit import InferenceParams
from mambakit.inference import cuda_graph
from mambakit.inference.generate import generate


class StaticDecoder:
    """Same interface and aliasing as CUDAGraphDecoder, run eagerly."""

    def __init__(self, model, batch_size, max_seqlen=1):
        self.model, self.max_seqlen = model, max_seqlen
        self.inference_params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)
        self.inference_params.key_value_memory_dict = model.allocate_inference_cache(batch_size, max_seqlen)
        if model.config.attn_layer_idx:
            self.inference_params.lengths_per_sample = torch.zeros(batch_size, dtype=torch.int32)
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long)
        self.logits = torch.full((batch_size, model.config.padded_vocab_size), float("nan"),
                                 dtype=next(model.parameters()).dtype)

    def __call__(self, input_ids):
        self.input_ids.copy_(input_ids)
        self.logits.copy_(self.model.decode_step(self.input_ids, self.inference_params))
        return self.logits


@pytest.fixture
def fake_graphs(monkeypatch):
    graphs = {}

    def get(model, batch_size, max_seqlen=1):
        if batch_size not in graphs or graphs[batch_size].max_seqlen < max_seqlen:
            graphs[batch_size] = StaticDecoder(model, batch_size, max_seqlen)
        return graphs[batch_size]

    monkeypatch.setattr(gen_mod, "_cuda_graphs_available", lambda device: True)
    monkeypatch.setattr(cuda_graph, "get_graph_decoder", get)
    return graphs


def test_graph_decoding_equals_eager(model, fake_graphs):
    prompt = random_ids(2, 6, seed=30)
    kw = dict(max_new_tokens=7, output_scores=True, return_dict_in_generate=True)
    eager = generate(model, prompt, **kw)
    graphed = generate(model, prompt, cg=True, **kw)
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.scores, eager.scores):  # scores are copies, not views of the static buffer
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(fake_graphs) == 1
    generate(model, prompt[:1], cg=True, max_new_tokens=2)
    assert sorted(fake_graphs) == [1, 2]  # one graph per batch size


def test_graph_state_continuation_and_eos(model, fake_graphs):
    prompt, turn = random_ids(2, 5, seed=31), random_ids(2, 3, seed=32)
    free = generate(model, prompt, max_new_tokens=6)[:, 5:]
    eos = int(free[1, 1])
    kw = dict(max_new_tokens=6, eos_token_id=eos, return_cache=True)
    seq_e, cache_e = generate(model, prompt, **kw)
    seq_g, cache_g = generate(model, prompt, cg=True, **kw)
    assert torch.equal(seq_e, seq_g)
    graph_ptrs = {t.data_ptr() for s in fake_graphs[2].inference_params.key_value_memory_dict.values() for t in s}
    assert not graph_ptrs & {t.data_ptr() for s in cache_g.key_value_memory_dict.values() for t in s}
    # Continue the returned cache (a copy of the graph's buffers) and a user cache, with and without graphs.
    out_e = generate(model, turn, max_new_tokens=4, inference_params=cache_e)
    out_g = generate(model, turn, max_new_tokens=4, inference_params=cache_g, cg=True)
    assert torch.equal(out_e, out_g)
    for a, b in zip(cache_e.key_value_memory_dict.values(), cache_g.key_value_memory_dict.values()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert cache_g.seqlen_offset == cache_e.seqlen_offset


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer", ["mamba1", "mamba2", "hybrid"])
def test_real_cuda_graph_matches_eager(layer):
    from gen_helpers import build

    model = build(layer, dtype=torch.float32).cuda()
    prompt = random_ids(2, 9, seed=33).cuda()
    kw = dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    eager = generate(model, prompt, **kw)
    graphed = generate(model, prompt, cg=True, teacher_outputs=eager.sequences, **kw)
    for a, b in zip(graphed.scores, eager.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.half()  # a new dtype: the graphs are captured again
    generate(model, prompt, cg=True, max_new_tokens=2)
    assert next(iter(model._mambakit_cuda_graphs["graphs"].values())).logits.dtype == torch.float16
