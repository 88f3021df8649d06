"""Training data: text files -> one token file, tokenised once -> random windows for training, fixed ones for
validation.

The token file is a flat numpy memmap (uint16 when the vocabulary fits, else uint32) with a small JSON header
beside it. The header holds a fingerprint of the corpus (each file's path, size and mtime) and of the tokenizer
(sha256 of tokenizer.json), so the next run reuses the file when neither changed and rebuilds it otherwise.
Each file's tokens are followed by the end-of-text token, so windows that cross a file boundary see where one
document stops and the next starts (the GPT-2/Pile convention the official Mamba models were trained with).

The held-out split is the tail of the stream: the last ``val_fraction`` of tokens ("tokens"), or whole files
picked by a hash of their path and placed at the end of the stream ("files"), so validation is always one
contiguous range [train_end, num_tokens).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

EOS_TOKEN = "<|endoftext|>"
FORMAT = "mambakit-tokens"
VERSION = 1
# Texts are handed to the tokenizer in batches of about this many characters (its encode_batch runs in parallel);
# longer files are cut at a line break into pieces of at most this size.
_BATCH_CHARS = 1 << 24
_PIECE_CHARS = 1 << 22


class DataError(ValueError):
    """A problem with the user's data or data flags; the message says what to change."""


# ---- finding the corpus ------------------------------------------------------------------------------------

def _excluded(rel_parts: tuple[str, ...], patterns: Iterable[str]) -> bool:
    """A pattern excludes a path when it matches the whole relative path or any one of its components."""
    rel = "/".join(rel_parts)
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(part, p) for part in rel_parts) for p in patterns)


def find_files(paths: Iterable[str | os.PathLike], glob: str = "*", exclude: Iterable[str] = ()) -> list[Path]:
    """Expand files and directories into a sorted list of files.

    Directories are walked recursively; a file is kept when its name matches ``glob`` and no ``exclude`` pattern
    matches its path relative to the directory or one of that path's components (``--exclude test`` drops every
    ``test/`` directory). Hidden files and directories (names starting with '.') and ``__pycache__`` are skipped.
    Files named explicitly are always kept.
    """
    exclude = list(exclude)
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"data path {str(p)!r} does not exist")
        if p.is_file():
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            rel_root = Path(root).relative_to(p).parts
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                             and not _excluded(rel_root + (d,), exclude))
            for name in sorted(files):
                if name.startswith(".") or not fnmatch.fnmatch(name, glob):
                    continue
                if not _excluded(rel_root + (name,), exclude):
                    found.append(Path(root) / name)
    if not found:
        raise DataError(f"no data files found in {[str(p) for p in paths]} (glob {glob!r}, exclude {exclude}); "
                        "check the paths, or set --glob (e.g. --glob '*.py')")
    return found


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary files in a data directory are skipped)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _pieces(text: str) -> Iterator[str]:
    """Cut very long texts at line breaks so that no single tokenizer call holds a whole large file."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.rfind("\n", start, start + _PIECE_CHARS) + 1
        cut = cut if cut > start else start + _PIECE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def iter_texts(files: Iterable[Path]) -> Iterator[str]:
    for f in files:
        text = read_text(f)
        if text:
            yield from _pieces(text)


# ---- tokenizer --------------------------------------------------------------------------------------------

def train_bpe(files: list[Path], vocab_size: int, out_path: str | os.PathLike, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE (GPT-2 style: every byte is a token, so any text encodes) with ``<|endoftext|>`` as
    token 0, and save it as tokenizer.json at ``out_path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs at least 257 "
                        "(256 bytes + <|endoftext|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_texts(files), trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out_path)
    return out_path


def eos_token_id(tokenizer) -> int | None:
    """The end-of-text id of a `tokenizers.Tokenizer`, looked up under the usual names; None if it has none."""
    for name in (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>"):
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the token file ---------------------------------------------------------------------------------------

@dataclass
class TokenData:
    """A tokenised corpus: ``tokens`` (num_tokens,) memmap; training range [0, train_end), validation after it."""

    tokens: np.ndarray
    train_end: int
    header: dict

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def val_tokens(self) -> int:
        return self.num_tokens - self.train_end


def split_files(files: list[Path], val_split: str, fraction: float) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files). Only val_split "files" holds files out: they are ordered by a hash of
    their path (stable from run to run and not biased towards the end of the alphabet) and taken until they
    hold ``fraction`` of the bytes; at least one file, never all of them."""
    if val_split != "files" or fraction <= 0 or len(files) < 2:
        return list(files), []
    order = sorted(files, key=lambda f: hashlib.sha1(str(f).encode()).hexdigest())
    total = sum(f.stat().st_size for f in files)
    picked, size = set(), 0
    for f in order[:-1]:
        if picked and size >= fraction * total:
            break
        picked.add(f)
        size += f.stat().st_size
    return [f for f in files if f not in picked], [f for f in files if f in picked]


def corpus_fingerprint(files: list[Path], tokenizer_sha: str, val_split: str, val_fraction: float) -> str:
    """Hash of what decides the token file's content: files (path, size, mtime), tokenizer, file-split choice."""
    entries = []
    for f in files:
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    # In "tokens" mode the split point is computed at load time, so the fraction does not change the file.
    split = [val_split, val_fraction] if val_split == "files" else ["tokens"]
    blob = json.dumps({"v": VERSION, "files": entries, "tokenizer": tokenizer_sha, "split": split})
    return hashlib.sha256(blob.encode()).hexdigest()


def _header_path(cache_dir: Path) -> Path:
    return cache_dir / "tokens.json"


def _load_cached(cache_dir: Path, fingerprint: str) -> dict | None:
    """The header of a valid token file with this fingerprint, or None."""
    hp, bp = _header_path(cache_dir), cache_dir / "tokens.bin"
    if not hp.exists() or not bp.exists():
        return None
    try:
        header = json.loads(hp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if header.get("format") != FORMAT or header.get("fingerprint") != fingerprint:
        return None
    if bp.stat().st_size != header["num_tokens"] * np.dtype(header["dtype"]).itemsize:
        return None  # interrupted or truncated write
    return header


def _write_tokens(files: list[Path], tokenizer, eos: int | None, dtype: np.dtype, out: Path,
                  log: Callable[[str], None]) -> tuple[list[dict], int]:
    """Tokenise ``files`` in order into ``out``; returns (per-file records, number of files skipped)."""
    records, skipped, offset = [], 0, 0
    batch: list[tuple[Path, str]] = []

    def flush(fh) -> None:
        nonlocal offset
        texts = [t for _, t in batch]
        encs = tokenizer.encode_batch(texts, add_special_tokens=False)
        by_file: dict[Path, list[int]] = {}
        for (f, _), enc in zip(batch, encs):
            by_file.setdefault(f, []).extend(enc.ids)
        for f, ids in by_file.items():
            if eos is not None:
                ids.append(eos)
            np.asarray(ids, dtype=dtype).tofile(fh)
            records.append({"path": str(f), "offset": offset, "num_tokens": len(ids)})
            offset += len(ids)
        batch.clear()

    with open(out, "wb") as fh:
        chars = 0
        for i, f in enumerate(files):
            text = read_text(f)
            if not text:
                skipped += 1
                continue
            batch.extend((f, piece) for piece in _pieces(text))
            chars += len(text)
            if chars >= _BATCH_CHARS:
                flush(fh)
                chars = 0
                log(f"tokenised {i + 1}/{len(files)} files, {offset:,} tokens")
        if batch:
            flush(fh)
    return records, skipped


def prepare_tokens(files: list[Path], tokenizer_path: str | os.PathLike, cache_dir: str | os.PathLike,
                   val_fraction: float = 0.0, val_split: str = "tokens", build: bool = True,
                   log: Callable[[str], None] = print) -> TokenData:
    """Tokenise ``files`` into ``cache_dir/tokens.bin`` (+ tokens.json), or reuse the file already there when the
    corpus and tokenizer are unchanged. ``build=False`` only loads (ranks other than 0 under torchrun).

    Returns a TokenData whose validation range is the last ``val_fraction`` of tokens (val_split "tokens") or the
    held-out files (val_split "files").
    """
    from tokenizers import Tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_split not in ("tokens", "files"):
        raise DataError(f"--val-split must be 'tokens' or 'files', got {val_split!r}")
    cache_dir = Path(cache_dir)
    tok_sha = file_sha256(tokenizer_path)
    fingerprint = corpus_fingerprint(files, tok_sha, val_split, val_fraction)
    header = _load_cached(cache_dir, fingerprint)
    if header is not None:
        log(f"reusing token file {cache_dir / 'tokens.bin'} ({header['num_tokens']:,} tokens)")
    elif not build:
        raise DataError(f"token file in {cache_dir} is missing or stale (rank 0 should have built it)")
    else:
        header = _build(files, Tokenizer.from_file(str(tokenizer_path)), cache_dir, fingerprint, tok_sha,
                        val_split, val_fraction, log)
    tokens = np.memmap(cache_dir / "tokens.bin", dtype=np.dtype(header["dtype"]), mode="r")
    n = int(header["num_tokens"])
    if val_split == "files":
        train_end = int(header["train_end"])
    else:
        train_end = n - int(math.ceil(val_fraction * n))
    return TokenData(tokens=tokens, train_end=train_end, header=header)


def _build(files, tokenizer, cache_dir: Path, fingerprint: str, tok_sha: str, val_split: str,
           val_fraction: float, log) -> dict:
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    eos = eos_token_id(tokenizer)
    train_files, val_files = split_files(files, val_split, val_fraction)
    held_out = set(val_files)
    ordered = train_files + val_files
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"tokenising {len(files)} files into {cache_dir / 'tokens.bin'}")
    tmp = cache_dir / "tokens.bin.tmp"
    records, skipped = _write_tokens(ordered, tokenizer, eos, dtype, tmp, log)
    if not records:
        raise DataError(f"all {len(files)} data files are empty or not UTF-8 text; nothing to train on")
    if skipped:
        log(f"skipped {skipped} empty or non-UTF-8 files")
    num_tokens = records[-1]["offset"] + records[-1]["num_tokens"]
    val_start = [r["offset"] for r in records if Path(r["path"]) in held_out]
    header = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "dtype": dtype.name,
        "num_tokens": num_tokens, "vocab_size": vocab, "eos_token_id": eos, "tokenizer_sha256": tok_sha,
        "val_split": val_split, "train_end": min(val_start) if val_start else num_tokens,
        "files": [dict(r, split="val" if Path(r["path"]) in held_out else "train") for r in records],
    }
    os.replace(tmp, cache_dir / "tokens.bin")
    hp = _header_path(cache_dir)
    hp.with_suffix(".json.tmp").write_text(json.dumps(header, indent=1))
    os.replace(hp.with_suffix(".json.tmp"), hp)
    log(f"{num_tokens:,} tokens ({dtype.name}) from {len(records)} files")
    return header


# ---- windows ----------------------------------------------------------------------------------------------

def check_window_fits(data: TokenData, seq_len: int) -> None:
    """Clear errors when a split is shorter than one window."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (one input and one target), got {seq_len}")
    if data.train_end < seq_len:
        raise DataError(f"the training split has {data.train_end:,} tokens, fewer than one window of --seq-len "
                        f"{seq_len}; give more text or a shorter --seq-len")
    if 0 < data.val_tokens < seq_len:
        raise DataError(f"the validation split has {data.val_tokens:,} tokens, fewer than one window of --seq-len "
                        f"{seq_len}; raise --val-fraction, lower --seq-len, or pass --val-fraction 0")


def sample_windows(tokens: np.ndarray, end: int, seq_len: int, batch_size: int, seed: int, step: int,
                   micro: int = 0, rank: int = 0) -> np.ndarray:
    """Random contiguous windows from tokens[0:end] -> (batch_size, seq_len) int64.

    The windows depend only on (seed, step, micro, rank): the sampler has no state, so resuming at a step
    draws exactly the batches an uninterrupted run would have drawn, and each rank draws different ones.
    """
    rng = np.random.default_rng([seed, step, micro, rank])
    starts = rng.integers(0, end - seq_len + 1, size=batch_size)
    return np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts])


def val_window_starts(start: int, end: int, seq_len: int, max_tokens: int | None = None) -> list[int]:
    """Starts of non-overlapping windows covering tokens[start:end]; at most ``max_tokens`` worth of them,
    spread evenly over the range when capped."""
    starts = list(range(start, end - seq_len + 1, seq_len))
    if max_tokens is not None and len(starts) * seq_len > max_tokens:
        keep = max(1, max_tokens // seq_len)
        starts = [starts[i * len(starts) // keep] for i in range(keep)]
    return starts


# ---- unigram baseline -------------------------------------------------------------------------------------

def unigram_counts(tokens: np.ndarray, end: int, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token counts of tokens[0:end] -> (vocab_size,) int64, read in chunks so a large memmap is never copied."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, end, chunk):
        counts += np.bincount(np.asarray(tokens[i:min(end, i + chunk)]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_nll(counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under the add-one smoothed unigram model of ``counts``:
    the perplexity a model gets from token frequencies alone, the floor any trained LM must beat."""
    logp = np.log(counts + 1.0) - np.log(counts.sum() + counts.shape[0])
    return float(-logp[np.asarray(targets, dtype=np.int64)].mean())
