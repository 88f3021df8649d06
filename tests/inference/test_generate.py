"""generate(): greedy == teacher-forced argmax, ragged batches, state continuation, chunked prefill, EOS."""
import pytest
import torch
from gen_helpers import VOCAB, build, random_ids

from mambakit import InferenceParams
from mambakit.inference.generate import (GreedySearchDecoderOnlyOutput, SampleDecoderOnlyOutput, generate,
                                         stream_generate)

# Decode steps and full passes agree to fp32 rounding (the state update computes in fp32 even for fp64 models).
TOL = dict(rtol=1e-5, atol=1e-5)


def full_logits(model, seq):
    """Logits of one forward pass over seq (b, l) -> (b, l, vocab)."""
    with torch.inference_mode():
        return model(seq).logits[..., :VOCAB]


def states(cache: InferenceParams):
    return [t for layer in sorted(cache.key_value_memory_dict) for t in cache.key_value_memory_dict[layer]]


def test_greedy_equals_teacher_forced_argmax(model):
    prompt = random_ids(2, 7)
    out = generate(model, prompt, max_new_tokens=12, output_scores=True, return_dict_in_generate=True)
    assert isinstance(out, GreedySearchDecoderOnlyOutput)
    seq = out.sequences
    assert seq.shape == (2, 19) and torch.equal(seq[:, :7], prompt)
    ref = full_logits(model, seq)
    for i, score in enumerate(out.scores):
        torch.testing.assert_close(score, ref[:, 6 + i], **TOL)
        assert torch.equal(seq[:, 7 + i], ref[:, 6 + i].argmax(-1))
    # max_length (the official argument) counts the prompt; the tensor is returned by default.
    assert torch.equal(generate(model, prompt, max_length=19), seq)


def test_repetition_penalty_is_ctrl_on_the_sequence_so_far(model):
    prompt = random_ids(2, 6, seed=3)
    out = generate(model, prompt, max_new_tokens=10, repetition_penalty=3.0, output_scores=True,
                   return_dict_in_generate=True)
    seq, ref = out.sequences, full_logits(model, out.sequences)
    for i in range(10):
        logits = ref[:, 5 + i].clone()
        for row in range(2):
            seen = seq[row, : 6 + i].unique()
            x = logits[row, seen]
            logits[row, seen] = torch.where(x < 0, x * 3.0, x / 3.0)
        assert torch.equal(seq[:, 6 + i], logits.argmax(-1))
    unpenalised = generate(model, prompt, max_new_tokens=10)
    assert not torch.equal(unpenalised, seq)  # the penalty changed something, so the check above means something


@pytest.mark.parametrize("chunk", [0, 4])
def test_ragged_batch_equals_each_alone(model, chunk):
    lengths = [9, 4, 1, 12]
    prompts = [random_ids(1, n, seed=10 + n)[0].tolist() for n in lengths]
    kw = dict(max_new_tokens=6, output_scores=True, return_dict_in_generate=True, prefill_chunk_size=chunk)
    # Right-padded tensor + attention_mask; padding ids are arbitrary tokens, they must not matter.
    ids = random_ids(4, 12, seed=99)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    batched = generate(model, ids, attention_mask=mask, **kw)
    from_lists = generate(model, prompts, **kw)
    assert torch.equal(batched.sequences, from_lists.sequences)
    for r, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), **kw)
        assert torch.equal(batched.sequences[r, 12 - len(p):], alone.sequences[0])
        for s_b, s_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(s_b[r], s_a[0], **TOL)


def test_continue_from_cache_equals_one_generate(model):
    prompt, turn = random_ids(2, 8, seed=4), random_ids(2, 5, seed=5)
    seq1, cache = generate(model, prompt, max_new_tokens=6, return_cache=True)
    branch = cache.clone()
    seq2 = generate(model, turn, max_new_tokens=7, inference_params=cache)
    whole = generate(model, torch.cat([seq1, turn], dim=1), max_new_tokens=7, return_dict_in_generate=True,
                     output_scores=True)
    assert torch.equal(seq2[:, 5:], whole.sequences[:, -7:])
    assert cache.seqlen_offset == 8 + 6 + 5 + 7
    # The clone was not touched by the continuation: another turn from it is independent.
    again = generate(model, turn, max_new_tokens=7, inference_params=branch)
    assert torch.equal(again, seq2)
    # A turn with no new tokens only prefills (chat: feed the user's message, answer later).
    _, c2 = generate(model, turn, max_new_tokens=0, return_cache=True, inference_params=cache.clone())
    assert c2.seqlen_offset == cache.seqlen_offset + 5


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_state_equals_one_prefill(model, chunk):
    prompt = random_ids(2, 37, seed=6)
    kw = dict(max_new_tokens=1, return_cache=True, output_scores=True, return_dict_in_generate=True)
    one = generate(model, prompt, prefill_chunk_size=0, **kw)
    chunked = generate(model, prompt, prefill_chunk_size=chunk, **kw)
    torch.testing.assert_close(chunked.scores[0], one.scores[0], **TOL)
    for a, b in zip(states(chunked.inference_params), states(one.inference_params)):
        torch.testing.assert_close(a, b, **TOL)
    # The cache holds the prompt and the generated token: a forward over all 38 tokens gives the same state.
    ref = InferenceParams(max_seqlen=38, max_batch_size=2)
    with torch.inference_mode():
        model(one.sequences, inference_params=ref)
    for a, b in zip(states(one.inference_params), states(ref)):
        if a.dim() == 5:  # a KV cache (b, max_seqlen, 2, h, d): compare the 38 filled positions
            a, b = a[:, :38], b[:, :38]
        torch.testing.assert_close(a, b, **TOL)


def test_eos_stops_each_row_and_pads(model):
    prompt = random_ids(3, 5, seed=7)
    free = generate(model, prompt, max_new_tokens=10)[:, 5:]
    eos = int(free[0, 2])
    first = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in free]
    out = generate(model, prompt, max_new_tokens=10, eos_token_id=[63, eos], pad_token_id=61)[:, 5:]
    n = 10 if None in first else max(first) + 1
    assert out.shape == (3, n)
    for r, f in enumerate(first):
        if f is None:
            assert torch.equal(out[r], free[r, :n])
        else:
            assert torch.equal(out[r, : f + 1], free[r, : f + 1]) and bool((out[r, f + 1:] == 61).all())
    # Batch 1 stops right after its EOS; pad defaults to the EOS id.
    alone = generate(model, prompt[:1], max_new_tokens=10, eos_token_id=eos)[0, 5:]
    assert alone.tolist() == free[0, : first[0] + 1].tolist()


def test_cache_after_eos_holds_only_real_tokens(model):
    """Rows that stop early keep the state at their EOS: continuing them equals continuing alone."""
    prompt, turn = random_ids(2, 5, seed=8), random_ids(2, 3, seed=9)
    free = generate(model, prompt, max_new_tokens=8)[:, 5:]
    eos = int(free[0, 1])
    seq, cache = generate(model, prompt, max_new_tokens=8, eos_token_id=eos, return_cache=True)
    row0 = seq[0, : 5 + int((seq[0, 5:] == eos).nonzero()[0]) + 1]
    cont = generate(model, turn, max_new_tokens=4, inference_params=cache)
    ref = generate(model, torch.cat([row0, turn[0]]).unsqueeze(0), max_new_tokens=4)
    assert torch.equal(cont[0, 3:], ref[0, -4:])


def test_ragged_continuation_with_attention_mask(model):
    prompt = random_ids(2, 6, seed=11)
    turn = random_ids(2, 4, seed=12)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    _, cache = generate(model, prompt, max_new_tokens=3, return_cache=True)
    seq1 = generate(model, prompt, max_new_tokens=3)
    out = generate(model, turn, attention_mask=mask, max_new_tokens=4, inference_params=cache)
    for r, real in enumerate([turn[0, 2:], turn[1]]):
        ref = generate(model, torch.cat([seq1[r], real]).unsqueeze(0), max_new_tokens=4)
        assert torch.equal(out[r, -4:], ref[0, -4:])


def test_stream_generate_and_streamer_see_the_generated_tokens(model):
    prompt = random_ids(1, 6, seed=13)
    seq = generate(model, prompt, max_new_tokens=8)

    class Recorder:
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ends += 1

    rec = Recorder()
    generate(model, prompt, max_new_tokens=8, streamer=rec)
    assert rec.ends == 1 and torch.equal(rec.puts[0], prompt)
    assert torch.equal(torch.cat(rec.puts[1:], dim=1), seq[:, 6:])
    streamed = [t for t in stream_generate(model, prompt, max_new_tokens=8)]
    assert torch.cat(streamed).tolist() == seq[0, 6:].tolist()
    # Leaving the loop early still leaves a consistent cache (every yielded token folded in).
    cache = InferenceParams(max_seqlen=0, max_batch_size=1)
    first3 = []
    for tok in stream_generate(model, prompt, max_new_tokens=8, inference_params=cache):
        first3.append(int(tok))
        if len(first3) == 3:
            break
    assert first3 == seq[0, 6:9].tolist() and cache.seqlen_offset == 9
    nxt = generate(model, seq[:, 9:10], max_new_tokens=2, inference_params=cache)
    assert nxt[0, 1:].tolist() == generate(model, seq[:, :10], max_new_tokens=2)[0, 10:].tolist()


def test_sampling_is_seeded_and_never_picks_vocab_padding():
    model = build("mamba1", dtype=torch.float32)
    with torch.no_grad():  # make the padding rows win every argmax, so the mask is what keeps them out
        model.lm_head.weight[VOCAB:] = model.lm_head.weight[:VOCAB].mean(0) * 1e3
    prompt = random_ids(4, 3, seed=14)
    with torch.inference_mode():
        assert bool((model(prompt).logits.argmax(-1) >= VOCAB).any())
    kw = dict(max_new_tokens=20, top_k=0, temperature=3.0, do_sample=True)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(5), return_dict_in_generate=True, **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(5), **kw)
    assert isinstance(a, SampleDecoderOnlyOutput) and torch.equal(a.sequences, b)
    assert int(b[:, 3:].max()) < VOCAB and len(b[:, 3:].unique()) > 10
    assert int(generate(model, prompt, max_new_tokens=5)[:, 3:].max()) < VOCAB


def test_min_p_top_p_sampling_with_a_batch(model):
    prompt = random_ids(3, 4, seed=17)
    kw = dict(max_new_tokens=6, do_sample=True, min_p=0.2, top_p=0.95, temperature=1.3)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (3, 10) and torch.equal(a, b) and int(a.max()) < VOCAB
    # min_p=1 keeps only each row's most likely token: sampling becomes greedy, row by row.
    assert torch.equal(generate(model, prompt, max_new_tokens=6, do_sample=True, min_p=1.0),
                       generate(model, prompt, max_new_tokens=6))


def test_cg_on_cpu_warns_and_decodes_eagerly(model):
    prompt = random_ids(1, 4, seed=15)
    with pytest.warns(UserWarning, match="cg=True needs a CUDA device"):
        out = generate(model, prompt, max_new_tokens=4, cg=True)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_length=3), "smaller than the prompt"),
    (dict(max_new_tokens=2, max_length=9), "not both"),
    (dict(), "max_length .* or max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(max_new_tokens=2, top_p=1.5, top_k=0), "top_p must be"),
    (dict(max_new_tokens=2, top_k=-1), "top_k must be"),
    (dict(max_new_tokens=2, min_p=2.0), "min_p must be"),
    (dict(max_new_tokens=2, temperature=0.0, top_k=5), "temperature must be > 0"),
    (dict(max_new_tokens=2, temperature=-1.0, do_sample=True), "temperature must be > 0"),
    (dict(max_new_tokens=2, repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=2, eos_token_id=64), "not a token id"),
    (dict(max_new_tokens=2, vocab_size=65), "vocab_size"),
    (dict(max_new_tokens=2, prefill_chunk_size=-2), "prefill_chunk_size"),
    (dict(max_new_tokens=2, attention_mask=torch.tensor([[1, 0, 1, 1, 1]])), "holes"),
    (dict(max_new_tokens=2, attention_mask=torch.ones(1, 4)), "attention_mask has shape"),
    (dict(max_new_tokens=2, inference_params=InferenceParams(0, 3, key_value_memory_dict={0: (torch.zeros(3),)})),
     "holds 3 rows"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, random_ids(1, 5), **kwargs)


@pytest.mark.parametrize("ids", [torch.zeros(1, 0, dtype=torch.long), [], [[1, 2], []],
                                 torch.zeros(2, 0, dtype=torch.long)])
def test_empty_prompt_is_an_error(model, ids):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, ids, max_new_tokens=3)


def test_greedy_ignores_temperature_like_the_official(model):
    prompt = random_ids(1, 4, seed=16)
    assert torch.equal(generate(model, prompt, max_new_tokens=3, temperature=0.0),
                       generate(model, prompt, max_new_tokens=3))
