"""mambakit.data: corpus discovery, BPE training, the tokenise-once token file, windows, unigram baseline."""

import json
import math
import os
import time

import numpy as np
import pytest

from mambakit import data as D

CODE = '''def read_config(path):
    """Read a config file."""
    with open(path) as f:
        return json.load(f)


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
'''


def _corpus(root, n=6, reps=4):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"mod{i}.py").write_text(CODE.replace("Point", f"Point{i}") * reps + f"\nVALUE = {i}\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus") / "src")


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return D.train_bpe(D.find_files([corpus]), 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_find_files_glob_exclude_hidden(tmp_path):
    (tmp_path / "pkg" / "test").mkdir(parents=True)
    (tmp_path / "pkg" / ".hidden").mkdir()
    (tmp_path / "site-packages").mkdir()
    for rel in ["a.py", "b.txt", "pkg/c.py", "pkg/test/d.py", "pkg/.hidden/e.py", "site-packages/f.py", ".g.py"]:
        (tmp_path / rel).write_text("x = 1\n")
    found = D.find_files([tmp_path], glob="*.py", exclude=["test", "site-packages"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.py", "pkg/c.py"]
    assert len(D.find_files([tmp_path])) == 5  # every non-hidden file without filters
    # An explicit file is kept whatever the glob says
    assert D.find_files([tmp_path / "b.txt"], glob="*.py") == [tmp_path / "b.txt"]


def test_find_files_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.find_files([tmp_path / "missing"])
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(D.DataError, match="no data files found.*--glob"):
        D.find_files([tmp_path], glob="*.py")


def test_train_bpe_roundtrip(tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    assert tok.token_to_id(D.EOS_TOKEN) == 0
    assert 257 <= tok.get_vocab_size() <= 300
    text = "def f(x):\n        return {'a': x}  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips
    assert len(tok.encode(CODE).ids) < len(CODE.encode()) / 1.5  # merges learned on code compress it
    with pytest.raises(D.DataError, match="at least 257"):
        D.train_bpe([], 200, tokenizer.parent / "x.json")


def test_prepare_tokens_content_and_reuse(corpus, tokenizer, tmp_path):
    from tokenizers import Tokenizer

    files = D.find_files([corpus])
    logs = []
    data = D.prepare_tokens(files, tokenizer, tmp_path, val_fraction=0.1, log=logs.append)
    tok = Tokenizer.from_file(str(tokenizer))
    assert data.tokens.dtype == np.uint16
    # Each file's tokens followed by end-of-text, in file order
    expected = []
    for f in files:
        expected += tok.encode(f.read_text()).ids + [0]
    np.testing.assert_array_equal(np.asarray(data.tokens), expected)
    assert data.train_end == data.num_tokens - math.ceil(0.1 * data.num_tokens)
    header = json.loads((tmp_path / "tokens.json").read_text())
    assert header["num_tokens"] == data.num_tokens and header["eos_token_id"] == 0
    # Second run with nothing changed: reused, not rewritten
    mtime = os.stat(tmp_path / "tokens.bin").st_mtime_ns
    logs.clear()
    again = D.prepare_tokens(files, tokenizer, tmp_path, val_fraction=0.2, log=logs.append)
    assert any("reusing" in m for m in logs) and os.stat(tmp_path / "tokens.bin").st_mtime_ns == mtime
    assert again.train_end == again.num_tokens - math.ceil(0.2 * again.num_tokens)  # split set at load time
    # A corpus file changed (size/mtime): rebuilt
    time.sleep(0.01)
    files[0].write_text(files[0].read_text() + "\nEXTRA = 1\n")
    logs.clear()
    rebuilt = D.prepare_tokens(files, tokenizer, tmp_path, val_fraction=0.1, log=logs.append)
    assert not any("reusing" in m for m in logs) and rebuilt.num_tokens > data.num_tokens
    with pytest.raises(D.DataError, match="missing or stale"):
        D.prepare_tokens(files, tokenizer, tmp_path / "other", build=False, log=logs.append)


def test_prepare_tokens_other_tokenizer_rebuilds(corpus, tokenizer, tmp_path):
    files = D.find_files([corpus])
    D.prepare_tokens(files, tokenizer, tmp_path, log=lambda s: None)
    tok2 = D.train_bpe(files, 280, tmp_path / "tok2.json")
    logs = []
    data = D.prepare_tokens(files, tok2, tmp_path, log=logs.append)
    assert not any("reusing" in m for m in logs)
    assert data.header["vocab_size"] <= 280


def test_split_by_file(tmp_path, tokenizer):
    corpus = _corpus(tmp_path / "c", n=10, reps=1)
    files = D.find_files([corpus])
    data = D.prepare_tokens(files, tokenizer, tmp_path / "cache", val_fraction=0.25, val_split="files",
                            log=lambda s: None)
    records = data.header["files"]
    val = [r for r in records if r["split"] == "val"]
    assert 2 <= len(val) <= 4 and all(r["split"] == "val" for r in records[-len(val):])  # held-out files last
    assert data.train_end == val[0]["offset"]
    _, held = D.split_files(files, "files", 0.25)
    assert {r["path"] for r in val} == {str(f) for f in held}


def test_skips_binary_and_rejects_all_empty(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "d" / "b.bin").write_bytes(b"\x00\x01\xff" * 10)
    (tmp_path / "d" / "c.txt").write_bytes(b"caf\xe9\n")  # latin-1, not UTF-8
    data = D.prepare_tokens(D.find_files([tmp_path / "d"]), tokenizer, tmp_path / "cache", log=lambda s: None)
    assert [r["path"].endswith("a.txt") for r in data.header["files"]] == [True]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty1.txt").write_text("")
    (tmp_path / "e" / "empty2.txt").write_text("")
    with pytest.raises(D.DataError, match="empty or not UTF-8"):
        D.prepare_tokens(D.find_files([tmp_path / "e"]), tokenizer, tmp_path / "cache2", log=lambda s: None)


def test_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    a = D.sample_windows(tokens, 900, 16, 8, seed=1, step=5)
    assert a.shape == (8, 16) and a.dtype == np.int64
    assert np.all(np.diff(a, axis=1) == 1) and a.max() < 900  # contiguous, inside the training range
    np.testing.assert_array_equal(a, D.sample_windows(tokens, 900, 16, 8, seed=1, step=5))  # stateless
    assert not np.array_equal(a, D.sample_windows(tokens, 900, 16, 8, seed=1, step=6))
    assert not np.array_equal(a, D.sample_windows(tokens, 900, 16, 8, seed=1, step=5, rank=1))
    assert not np.array_equal(a, D.sample_windows(tokens, 900, 16, 8, seed=1, step=5, micro=1))
    assert D.val_window_starts(900, 1000, 16) == list(range(900, 985, 16))
    capped = D.val_window_starts(0, 1000, 10, max_tokens=50)
    assert len(capped) == 5 and capped[0] == 0 and capped[-1] > 700  # spread over the range


def test_window_fit_errors():
    data = D.TokenData(tokens=np.zeros(100, np.uint16), train_end=90, header={})
    D.check_window_fits(data, 10)
    with pytest.raises(D.DataError, match="training split has 90 tokens, fewer than one window"):
        D.check_window_fits(data, 128)
    with pytest.raises(D.DataError, match="validation split has 10 tokens"):
        D.check_window_fits(data, 32)


def test_unigram_baseline():
    tokens = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3], dtype=np.uint16)
    counts = D.unigram_counts(tokens, 10, vocab_size=5, chunk=3)
    np.testing.assert_array_equal(counts, [1, 2, 3, 4, 0])
    targets = np.array([3, 4, 1])
    by_hand = -np.mean([math.log((4 + 1) / 15), math.log(1 / 15), math.log(3 / 15)])
    assert D.unigram_nll(counts, targets) == pytest.approx(by_hand, rel=1e-12)
