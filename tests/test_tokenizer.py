"""mambakit.tokenizer: a small BPE tokenizer trained here stands in for GPT-NeoX-20B (no network in CI)."""
import json

import numpy as np
import pytest
import torch

from mambakit import hub
from mambakit.tokenizer import GPT_NEOX_20B, Tokenizer, load_tokenizer, mask_padded_vocab

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "State space models scan sequences in linear time.",
    "Mamba selects what to remember and what to forget.",
    "A tokenizer turns text into integers and back again.",
] * 4


def train_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    return backend


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer().save(str(path / "tokenizer.json"))
    return path


def test_encode_decode_and_special_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "Mamba scans the lazy fox."
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text and tok.decode(torch.tensor([ids])) == text
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0 and tok.pad_token_id == 1
    assert tok.vocab_size == len(tok) == tok.backend.get_vocab_size(with_added_tokens=True)
    assert tok.decode([tok.eos_token_id] + ids, skip_special_tokens=True) == text
    assert load_tokenizer(tok_dir / "tokenizer.json").encode(text) == ids  # the file itself works too


def test_call_pads_on_the_left(tok_dir):
    tok = load_tokenizer(tok_dir)
    single = tok("the fox", return_tensors="pt")
    assert single.input_ids.shape == (1, len(tok.encode("the fox"))) and single.attention_mask.all()
    prompts = ["the quick brown fox jumps", "a fox"]
    batch = tok(prompts, return_tensors="pt")
    short = tok.encode("a fox")
    width = len(tok.encode(prompts[0]))
    assert batch.input_ids.shape == batch["attention_mask"].shape == (2, width)
    assert batch.input_ids[1, -len(short):].tolist() == short  # prompts end at the last column
    assert (batch.input_ids[1, :width - len(short)] == tok.pad_token_id).all()
    assert batch.attention_mask[1].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert tok.batch_decode(batch.input_ids[:, -2:]) == [tok.decode(r) for r in batch.input_ids[:, -2:]]
    assert tok(prompts, return_tensors=None).input_ids[1][-len(short):] == short
    assert isinstance(tok(prompts, return_tensors="np").input_ids, np.ndarray)
    assert batch.to("cpu").input_ids.device.type == "cpu"
    with pytest.raises(ValueError, match="different lengths"):
        tok(prompts, padding=False)


def test_padded_vocab_is_never_decoded(tok_dir):
    tok = load_tokenizer(tok_dir)
    padded = (tok.vocab_size + 15) // 16 * 16 + 16  # a model's embedding rows
    with pytest.raises(ValueError, match=rf"token id {padded - 1} is outside .*mask_padded_vocab"):
        tok.decode([5, padded - 1])
    logits = torch.randn(3, padded)
    logits[:, -1] = 100.0  # the padding column would win
    masked = mask_padded_vocab(logits, tok.vocab_size)
    assert (masked.argmax(-1) < tok.vocab_size).all()
    assert torch.equal(masked[:, :tok.vocab_size], logits[:, :tok.vocab_size]) and logits[0, -1] == 100.0
    assert mask_padded_vocab(logits[:, :tok.vocab_size], tok.vocab_size).shape[-1] == tok.vocab_size


def test_special_tokens_from_config_and_save(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    out = tok.save_pretrained(tmp_path / "ckpt")
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|padding|>"},
                                                           "pad_token": "<|endoftext|>"}))
    again = load_tokenizer(out)
    assert again.eos_token_id == 1 and again.pad_token_id == 0
    assert again.encode("the lazy dog") == tok.encode("the lazy dog")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tok.save_pretrained(out)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, eos_token="<nope>")


def _fake_hub_cache(root, repo_id, files, known_missing=()):
    """A Hugging Face cache as huggingface_hub lays it out (refs/main -> snapshots/<commit>/...); names in
    known_missing are recorded as absent from the repo (.no_exist), as an online visit would leave them."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (repo / "snapshots" / commit / name).write_bytes(src.read_bytes())
    for name in known_missing:
        (repo / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / commit / name).touch()
    return root


def test_checkpoint_without_tokenizer_uses_gpt_neox(tok_dir, tmp_path, monkeypatch):
    """A state-spaces checkpoint has no tokenizer.json: the GPT-NeoX-20B one comes from the (here: fake) cache."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cache = _fake_hub_cache(tmp_path / "cache", GPT_NEOX_20B, {"tokenizer.json": tok_dir / "tokenizer.json"})
    tok = load_tokenizer(ckpt, cache_dir=cache, local_files_only=True)
    assert tok.encode("the fox") == load_tokenizer(tok_dir).encode("the fox")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"(?s)has no tokenizer.json.*GPT-NeoX-20B.*"
                                                r"hf download EleutherAI/gpt-neox-20b tokenizer.json"):
        load_tokenizer(ckpt, cache_dir=tmp_path / "empty-cache")


def test_default_tokenizer(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "default_model_path", lambda: tok_dir)
    assert load_tokenizer().encode("the dog") == load_tokenizer(tok_dir).encode("the dog")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing" / "dir"))


def test_hub_ids_offline(tok_dir, tmp_path, monkeypatch):
    """A repo with its own tokenizer.json uses it; one known to have none (state-spaces) falls back to GPT-NeoX."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    other = tmp_path / "other.json"
    tok = train_tokenizer()
    tok.add_special_tokens(["<extra>"])
    tok.save(str(other))
    _fake_hub_cache(cache, GPT_NEOX_20B, {"tokenizer.json": tok_dir / "tokenizer.json"})
    _fake_hub_cache(cache, "org/with-tokenizer", {"tokenizer.json": other})
    _fake_hub_cache(cache, "state-spaces/tiny", {"config.json": other}, known_missing=["tokenizer.json"])
    neox_size = load_tokenizer(tok_dir).vocab_size
    assert load_tokenizer("org/with-tokenizer", cache_dir=cache).vocab_size == neox_size + 1
    assert load_tokenizer("state-spaces/tiny", cache_dir=cache).vocab_size == neox_size
    with pytest.raises(FileNotFoundError, match=r"'org/absent' is not a local path and its tokenizer.json"):
        load_tokenizer("org/absent", cache_dir=cache)
