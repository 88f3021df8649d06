"""A thin wrapper over the `tokenizers` library with the parts of transformers' tokenizer API that generation code
uses (``tokenizer(prompts, return_tensors="pt").input_ids``, ``decode``, ``eos_token_id``...).

``load_tokenizer`` reads ``tokenizer.json`` from a checkpoint directory; checkpoints without one (the official
state-spaces repos) use the GPT-NeoX-20B tokenizer, fetched from the Hub when online.

Vocabulary padding: models pad their embedding to a multiple of 8 or 16 rows (50277 tokens -> 50280 rows), so
logits have more columns than the tokenizer has ids. ``Tokenizer.vocab_size`` is the number of ids the tokenizer
can decode (added tokens included, unlike transformers' ``vocab_size``); mask the rest with
``mask_padded_vocab(logits, tokenizer.vocab_size)`` before sampling. ``decode`` refuses ids outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

TOKENIZER_FILE = "tokenizer.json"
GPT_NEOX_20B = "EleutherAI/gpt-neox-20b"  # the tokenizer of the official Mamba / Mamba-2 models

# Names tried, in order, when a tokenizer ships no tokenizer_config.json / special_tokens_map.json.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_NAMES = ("<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """logits (..., padded_vocab) -> a copy with the columns >= vocab_size set to -inf (ids no tokenizer has)."""
    if logits.shape[-1] <= vocab_size:
        return logits
    out = logits.clone()
    out[..., vocab_size:] = float("-inf")
    return out


class BatchEncoding(dict):
    """``input_ids`` (batch, seqlen) and ``attention_mask`` (batch, seqlen), as keys and as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class Tokenizer:
    """Text <-> token ids. Build with ``load_tokenizer``; wraps a ``tokenizers.Tokenizer`` (``.backend``)."""

    padding_side = "left"  # prompts end where generation starts

    def __init__(self, backend, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None, name_or_path: str | None = None):
        self.backend = backend
        self.name_or_path = name_or_path
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_token = eos_token if eos_token is not None else _first_in(_EOS_NAMES, vocab)
        self.bos_token = bos_token if bos_token is not None else _first_in(_BOS_NAMES, vocab)
        self.pad_token = pad_token if pad_token is not None else (_first_in(_PAD_NAMES, vocab) or self.eos_token)
        for role in ("eos", "bos", "pad"):
            token = getattr(self, f"{role}_token")
            if token is not None and token not in vocab:
                raise ValueError(f"{role}_token {token!r} is not in the tokenizer's vocabulary")

    # ---- ids of special tokens ---------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"bos={self.bos_token!r}, pad={self.pad_token!r})")

    # ---- encode / decode ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}; use tokenizer(list_of_texts) "
                            "for a batch")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """ids: a sequence of ints or a 1-D tensor (a (1, seqlen) tensor is accepted too)."""
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary [0, {self.vocab_size}): "
                             "the model's vocabulary is padded; mask the padding columns before sampling with "
                             "mambakit.tokenizer.mask_padded_vocab(logits, tokenizer.vocab_size)")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """sequences: (batch, seqlen) tensor or a list of id lists."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = "pt", padding: bool = True,
                 add_special_tokens: bool = True) -> BatchEncoding:
        """text or list of texts -> BatchEncoding with input_ids and attention_mask (batch, seqlen).

        A list is left-padded with ``pad_token_id`` (mask 0 on padding) so that every prompt ends at the last
        column. return_tensors: "pt" (tensors), "np" (arrays) or None (lists; a single text gives a flat list).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer() takes a string or a non-empty list of strings")
        seqs = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        longest = max(len(s) for s in seqs)
        if padding and len(set(map(len, seqs))) > 1:
            if self.pad_token_id is None:
                raise ValueError("padding a batch needs a pad token: this tokenizer has neither a pad nor an eos "
                                 "token; set tokenizer.pad_token to one of its tokens")
            masks = [[0] * (longest - len(s)) + [1] * len(s) for s in seqs]
            seqs = [[self.pad_token_id] * (longest - len(s)) + s for s in seqs]
        else:
            masks = [[1] * len(s) for s in seqs]
        if return_tensors is None:
            return BatchEncoding(input_ids=seqs[0] if single else seqs, attention_mask=masks[0] if single else masks)
        if len(set(map(len, seqs))) > 1:
            raise ValueError("texts of different lengths cannot form one tensor without padding=True")
        if return_tensors == "pt":
            return BatchEncoding(input_ids=torch.tensor(seqs, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors == "np":
            import numpy as np

            return BatchEncoding(input_ids=np.array(seqs, dtype=np.int64), attention_mask=np.array(masks, np.int64))
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    # ---- files -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write tokenizer.json and tokenizer_config.json (special tokens); refuses to replace them unless asked."""
        directory = Path(directory).expanduser()
        targets = [directory / TOKENIZER_FILE, directory / "tokenizer_config.json"]
        existing = [p.name for p in targets if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{directory} already holds {existing}; pass overwrite=True to replace them")
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(targets[0]))
        special = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token}
        targets[1].write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        return directory


def _first_in(names: Sequence[str], vocab: dict) -> str | None:
    return next((n for n in names if n in vocab), None)


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}; "
                             "use batch_decode for a batch")
        return ids.tolist()
    return [int(i) for i in ids]


def _special_tokens(directory: Path) -> dict:
    """eos/bos/pad tokens from tokenizer_config.json or special_tokens_map.json, when the checkpoint has them."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        for role in ("eos_token", "bos_token", "pad_token"):
            value = data.get(role)
            if isinstance(value, dict):  # transformers' AddedToken form
                value = value.get("content")
            if isinstance(value, str):
                found[role] = value
    return found


def _from_file(path: Path, name_or_path: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path} is not a readable tokenizers file: {e}") from None
    return Tokenizer(backend, name_or_path=name_or_path, **_special_tokens(path.parent))


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a checkpoint directory, a Hub id, or None/"default".

    A directory or Hub repo without tokenizer.json (the official state-spaces checkpoints) gets the GPT-NeoX-20B
    tokenizer ("EleutherAI/gpt-neox-20b"), as the official models do; None / "default" uses the shipped model's.
    """
    from .hub import _is_hub_id, default_model_path

    if name_or_path is None or name_or_path == "default":
        name_or_path = default_model_path()
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    hub_kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if path.is_file():
        return _from_file(path, text)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return _from_file(path / TOKENIZER_FILE, text)
        return _hub_tokenizer(GPT_NEOX_20B, dict(cache_dir=cache_dir, local_files_only=local_files_only),
                              missing_in=text)
    if not _is_hub_id(text) or path.is_absolute():
        raise FileNotFoundError(f"tokenizer path {text} does not exist")
    return _hub_tokenizer(text, hub_kw, missing_in=None)


def _known_missing(repo_id: str, hub_kw: dict) -> bool:
    """Whether the Hugging Face cache records that ``repo_id`` has no tokenizer.json (a cached 404)."""
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(repo_id, TOKENIZER_FILE, cache_dir=hub_kw.get("cache_dir"),
                                                   revision=hub_kw.get("revision"))
    return found is huggingface_hub._CACHED_NO_EXIST


def _hub_tokenizer(repo_id: str, hub_kw: dict, missing_in: str | None) -> Tokenizer:
    """tokenizer.json of a Hub repo (falling back to GPT-NeoX-20B when the repo has none)."""
    what = f"{missing_in} has no {TOKENIZER_FILE}, so the GPT-NeoX-20B tokenizer of the official models is used"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ImportError(f"{what if missing_in else repr(repo_id) + ' is not a local path'}; fetching it from the "
                          "Hub needs huggingface_hub: pip install huggingface_hub, or put tokenizer.json next to the "
                          "weights") from None
    from .hub import _env_true

    offline = bool(hub_kw.get("local_files_only")) or _env_true("HF_HUB_OFFLINE")
    hub_kw = {**hub_kw, "local_files_only": offline}
    neox_kw = {k: v for k, v in hub_kw.items() if k != "revision"}
    try:
        file = Path(hf_hub_download(repo_id, TOKENIZER_FILE, **hub_kw))
    except LocalEntryNotFoundError as e:
        if repo_id != GPT_NEOX_20B and _known_missing(repo_id, hub_kw):
            # an earlier online visit recorded that this repo has no tokenizer.json (official repos)
            return _hub_tokenizer(GPT_NEOX_20B, neox_kw, missing_in=repo_id)
        lead = f"{what}, but it" if missing_in else f"'{repo_id}' is not a local path and its {TOKENIZER_FILE}"
        raise FileNotFoundError(
            f"{lead} is not in the Hugging Face cache and cannot be downloaded "
            f"({'offline mode' if offline else 'the Hub is unreachable'}). Provide {TOKENIZER_FILE}: download it "
            f"where there is network access with `hf download {repo_id} {TOKENIZER_FILE}`, then put it into the "
            "checkpoint directory or pass its path to load_tokenizer") from e
    except EntryNotFoundError:
        if repo_id == GPT_NEOX_20B:
            raise
        return _hub_tokenizer(GPT_NEOX_20B, neox_kw, missing_in=repo_id)
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"'{repo_id}' is neither a local path nor a Hub repository you can access") from e
    try:  # special tokens, when the repo has them (GPT-NeoX-20B's are found by name otherwise)
        hf_hub_download(repo_id, "tokenizer_config.json", **hub_kw)
    except Exception:  # noqa: BLE001 - optional file; any failure just means "not available"
        pass
    return _from_file(file, repo_id)
