"""mambakit eval: strided windows, perplexity = exp(mean NLL) by hand, bits per byte, the command."""

import json
import math
import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit import data as D
from mambakit import eval as E

TEXT = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))  # three\n" * 6


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model with sharpened weights (so that NLLs differ from uniform), saved with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("evalmodel")
    (root / "corpus.txt").write_text(TEXT * 4)
    tok_path = D.train_bpe([root / "corpus.txt"], 300, root / "model" / "tokenizer.json")
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=300))
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(40)
    model.eval()
    from mambakit.hub import save_pretrained

    save_pretrained(model, root / "model", overwrite=True)
    return model, root / "model", tok_path


def _hand_nll(model, ids):
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, one full forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 4), (37, 8, 3), (5, 16, 8), (2, 2, 1), (64, 16, 16)])
def test_strided_windows_score_each_token_once(n, context, stride):
    windows = E.strided_windows(n, context, stride)
    scored = [t for b, e, first in windows for t in range(first, e)]
    assert scored == list(range(1, n))
    for b, e, first in windows:
        assert 0 <= b < first <= e <= n and e - b <= context
        # every scored token sees at least context - stride tokens before it (or all tokens from the start)
        assert first - b >= min(first, context - stride, context - 1) or b == 0


def test_strided_windows_errors():
    with pytest.raises(E.EvalError, match="--stride"):
        E.strided_windows(10, 4, 5)
    with pytest.raises(E.EvalError, match="--context"):
        E.strided_windows(10, 1, 1)


def test_sequence_nll_equals_hand_computation(tiny):
    model = tiny[0]
    ids = torch.randint(0, 300, (41,))
    # one window covering everything = one forward pass by hand
    total, count = E.sequence_nll(model, ids, context=64, stride=32)
    assert count == 40
    assert total == pytest.approx(_hand_nll(model, ids), rel=1e-5)
    # strided windows, batched: each token's NLL computed by hand from its own window's context
    total, count = E.sequence_nll(model, ids, context=12, stride=5, batch_size=3)
    by_hand = 0.0
    for b, e, first in E.strided_windows(41, 12, 5):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, b:e]).logits[0].double(), -1)
        by_hand -= sum(float(logp[t - b - 1, ids[t]]) for t in range(first, e))
    assert count == 40 and total == pytest.approx(by_hand, rel=1e-5)


def test_evaluate_files_perplexity_and_bits_per_byte(tiny, tmp_path):
    from mambakit.tokenizer import load_tokenizer

    model, _, tok_path = tiny
    tok = load_tokenizer(tok_path)
    f = tmp_path / "t.py"
    f.write_text(TEXT)
    res = E.evaluate_files(model, tok, [str(f)], context=1024, stride=512, batch_size=2, device="cpu")
    ids = torch.tensor([tok.eos_token_id] + tok.encode(TEXT))
    nll = _hand_nll(model, ids)
    assert res["tokens"] == len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # without the end-of-text prefix the first token is context only
    res2 = E.evaluate_files(model, tok, [str(f)], context=1024, stride=512, batch_size=1, device="cpu",
                            eos_prefix=False)
    assert res2["tokens"] == len(ids) - 2


def test_eval_command(tiny, tmp_path, capsys):
    model, model_dir, _ = tiny
    f = tmp_path / "t.py"
    f.write_text(TEXT)
    assert E.main(["--model", str(model_dir), "--file", str(f), "--context", "16", "--stride", "8",
                   "--batch-size", "3", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    from mambakit.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = torch.tensor([tok.eos_token_id] + tok.encode(TEXT))
    total, count = E.sequence_nll(model, ids, 16, 8)
    assert res["tokens"] == count and res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert E.main(["--model", str(model_dir), "--file", str(f), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_command_errors(tiny, tmp_path, capsys):
    _, model_dir, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [(["--file", str(tmp_path / "nope.txt")], "does not exist"),
             (["--file", str(empty)], "is empty"),
             (["--file", str(empty), "--context", "8", "--stride", "9"], "--stride must be between")]
    for extra, message in cases:
        assert E.main(["--model", str(model_dir), "--device", "cpu", *extra]) == 2
        assert message in capsys.readouterr().err
