"""Autoregressive generation for Mamba language models: the official ``generate()`` and what it lacks.

``generate(model, input_ids, max_length=..., top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
repetition_penalty=1.0, eos_token_id=None, return_dict_in_generate=False, output_scores=False, cg=False,
streamer=None)`` has the official names and defaults (``mamba_ssm.utils.generation.decode``), and adds:

- ``max_new_tokens``, ``do_sample``, a seeded ``generator``, several EOS ids, per-row stopping with
  ``pad_token_id`` after EOS, and ``vocab_size`` (logits of the vocabulary padding are never sampled);
- batches of prompts of different lengths (``attention_mask``, or a list of token lists): rows are left-
  padded and the padding is kept out of the conv window and the SSM state with ``seq_idx``, so each row
  gets what it would get alone;
- the state as a first-class object: ``inference_params=`` continues from a cache (updated in place) and
  ``return_cache=True`` returns it, so a chat never reprocesses its history;
- chunked prefill (``prefill_chunk_size``): memory bounded by the chunk, not the prompt;
- ``stream_generate``: a Python iterator over the new tokens.

Flow: prepare the prompt -> prefill (chunks) -> loop { sample, stop, feed the token back } -> trim.
The loop never waits for the GPU except to check every few steps whether all rows have stopped (every
step with a streamer, whose ``put`` needs the tokens on the host anyway).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..cache import InferenceParams
from .sampling import apply_repetition_penalty, sample, validate_sampling_args

__all__ = ["generate", "stream_generate", "decode", "DecodeOutput", "GreedySearchDecoderOnlyOutput",
           "SampleDecoderOnlyOutput"]

# Prefill chunk used when prefill_chunk_size is None: about this many tokens per chunk over the batch.
AUTO_PREFILL_TOKENS = 1 << 18
# On CUDA, check for "every row has stopped" (a host sync) only every this many steps.
STOP_CHECK_EVERY = 16


@dataclass
class DecodeOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns.

    sequences: (batch, prompt_len + new_tokens) int64, prompts left-padded.
    scores: one (batch, vocab_size) logits tensor per generated token (before repetition penalty,
        temperature and filters, as the official), or None unless ``output_scores=True``.
    inference_params: the cache after every token of ``sequences`` (with ``return_cache=True``).
    """

    sequences: torch.Tensor
    scores: tuple | None = None
    inference_params: InferenceParams | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


class GreedySearchDecoderOnlyOutput(DecodeOutput):
    """Output of greedy decoding (transformers' / the official class name)."""


class SampleDecoderOnlyOutput(DecodeOutput):
    """Output of sampling (transformers' / the official class name)."""


# ---- input preparation ----------------------------------------------------------------------------------
def _as_ids(input_ids, attention_mask, device):
    """Tensor or list of token lists -> ids (b, l) int64 and mask (b, l) bool or None, on ``device``."""
    if isinstance(input_ids, (list, tuple)):
        rows = [list(r) for r in input_ids] if input_ids and isinstance(input_ids[0], (list, tuple)) \
            else [list(input_ids)]
        if attention_mask is not None:
            raise ValueError("attention_mask cannot be combined with input_ids given as lists; the lists "
                             "already say each prompt's length")
        width = max((len(r) for r in rows), default=0)
        if width == 0 or any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt: every row of input_ids needs at least one token")
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = True
        return ids.to(device), (mask.to(device) if not bool(mask.all()) else None)
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a (batch, seqlen) tensor or a list of token lists, "
                         f"got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be (batch, seqlen) integer token ids, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token")
    ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return ids, None
    attention_mask = torch.as_tensor(attention_mask)
    if tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected input_ids' "
                         f"{tuple(ids.shape)}")
    mask = attention_mask.to(device) != 0
    return ids, (None if bool(mask.all()) else mask)


def _left_align(ids: torch.Tensor, mask: torch.Tensor, pad: int):
    """Move each row's real tokens (one contiguous block, any padding side) to the right end.

    ids, mask: (b, l). Returns ids, mask (b, l) left-padded and starts: list of each row's first real index.
    """
    lengths = mask.sum(dim=1).tolist()
    if min(lengths) == 0:
        raise ValueError(f"empty prompt: row {lengths.index(0)} of attention_mask has no token")
    first = mask.int().argmax(dim=1).tolist()
    l = ids.shape[1]
    out_ids = torch.full_like(ids, pad)
    out_mask = torch.zeros_like(mask)
    for row, (n, f) in enumerate(zip(lengths, first)):
        if not bool(mask[row, f:f + n].all()):
            raise ValueError(f"attention_mask row {row} has holes: each row must be one block of 1s "
                             "(left or right padding)")
        out_ids[row, l - n:] = ids[row, f:f + n]
        out_mask[row, l - n:] = True
    return out_ids, out_mask, [l - n for n in lengths]


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def _special_ids(eos_token_id, pad_token_id, padded_vocab: int) -> tuple[list[int], int]:
    """(EOS ids, pad id); the pad defaults to the first EOS id (transformers' habit), else 0."""
    eos = _eos_list(eos_token_id)
    pad = (eos[0] if eos else 0) if pad_token_id is None else pad_token_id
    for name, tok in [("eos_token_id", t) for t in eos] + [("pad_token_id", pad)]:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < padded_vocab:
            raise ValueError(f"{name}={tok!r} is not a token id in [0, {padded_vocab})")
    return eos, pad


def _check_options(prefill_chunk_size, generator, streamer) -> None:
    if prefill_chunk_size is not None and (isinstance(prefill_chunk_size, bool)
                                           or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 0):
        raise ValueError(f"prefill_chunk_size must be None (automatic), 0 (one pass) or a positive integer, "
                         f"got {prefill_chunk_size!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise ValueError("streamer must have put(token_ids) and end() methods (transformers' protocol)")


def _num_new_tokens(prompt_len: int, max_length, max_new_tokens) -> int:
    if max_length is not None and max_new_tokens is not None:
        raise ValueError(f"give max_length ({max_length}) or max_new_tokens ({max_new_tokens}), not both")
    if max_length is None and max_new_tokens is None:
        raise ValueError("give max_length (prompt + new tokens, the official argument) or max_new_tokens")
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        return max_new_tokens
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")
    if max_length < prompt_len:
        raise ValueError(f"max_length={max_length} is smaller than the prompt ({prompt_len} tokens); "
                         f"max_length counts prompt + new tokens: use max_length >= {prompt_len} or max_new_tokens")
    return max_length - prompt_len


# ---- sampling and stopping --------------------------------------------------------------------------------
class _Sampler:
    """Logits (b, padded_vocab) -> tokens (b,): vocabulary mask, repetition penalty, then ``sample``."""

    def __init__(self, ids, mask, vocab_size, padded_vocab, greedy, top_k, top_p, min_p, temperature,
                 repetition_penalty, generator):
        self.vocab_size, self.greedy, self.generator = vocab_size, greedy, generator
        self.top_k, self.top_p, self.min_p, self.temperature = top_k, top_p, min_p, temperature
        self.penalty = repetition_penalty
        self.seen = None
        if repetition_penalty != 1.0:
            # Presence of each token in the row so far (padding excluded): (b, padded_vocab) bool.
            counts = torch.zeros(ids.shape[0], padded_vocab, dtype=torch.int32, device=ids.device)
            weight = torch.ones_like(ids, dtype=torch.int32) if mask is None else mask.to(torch.int32)
            self.seen = counts.scatter_add_(1, ids, weight) > 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, : self.vocab_size]
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[:, : self.vocab_size], self.penalty)
        if self.greedy:
            return logits.argmax(dim=-1)
        return sample(logits, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                      temperature=self.temperature, generator=self.generator)

    def observe(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)


class _Stopper:
    """Per-row stopping: after a row emits an EOS id, its later tokens are ``pad``."""

    def __init__(self, eos: list[int], pad: int, batch: int, device):
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad = pad
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eos is None:
            return tokens
        tokens = torch.where(self.done, self.pad, tokens)
        self.done |= torch.isin(tokens, self.eos)
        return tokens

    def all_done(self) -> bool:
        return self.eos is not None and bool(self.done.all())

    def kept_length(self, tokens: torch.Tensor) -> int:
        """Columns up to the step where the last row stopped. tokens: (b, n) generated so far."""
        n = tokens.shape[1]
        if self.eos is None or n == 0:
            return n
        hit = torch.isin(tokens, self.eos)
        first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), n - 1)
        return int(first.max()) + 1


# ---- the state: prefill, frozen rows, CUDA graphs ------------------------------------------------------
def _state_tensors(params: InferenceParams):
    for states in params.key_value_memory_dict.values():
        yield from (states if isinstance(states, (tuple, list)) else (states,))


def _rows(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A (b,) mask shaped to broadcast over a (b, ...) state tensor."""
    return mask.view(-1, *([1] * (t.dim() - 1)))


def _advance(params: InferenceParams, n: int, per_row: torch.Tensor | None = None) -> None:
    """Count ``n`` positions fed: seqlen_offset (host int, shared by the rows) and, for attention layers,
    lengths_per_sample (device, per row: where the row's next K/V goes), which counts only real tokens:
    per_row (b,) gives them when some rows were padding."""
    params.seqlen_offset += n
    if params.lengths_per_sample is not None:
        params.lengths_per_sample += n if per_row is None else per_row.to(torch.int32)


def _step(step, tokens: torch.Tensor, params: InferenceParams, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step; the ``frozen`` rows (b,) bool, when given, keep their state unchanged.

    Freezing serves padding that arrives after a row's history started (pads after EOS when the cache is
    kept, ragged continuation inputs): the step runs on every row and the frozen rows get their old state back.
    """
    if frozen is None:
        logits = step(tokens)
        _advance(params, 1)
        return logits
    saved = [t.clone() for t in _state_tensors(params)]
    logits = step(tokens)
    for t, old in zip(_state_tensors(params), saved):
        t.copy_(torch.where(_rows(frozen, t), old, t))
    _advance(params, 1, per_row=~frozen)
    return logits


def _prefill(model, ids, mask, starts, params: InferenceParams, chunk: int) -> torch.Tensor:
    """Run the prompt through the model in chunks of ``chunk`` tokens, carrying the state across them.

    ids, mask: (b, l), left-padded (mask None: no padding); starts: each row's first real index.
    Padding is a separate sequence in seq_idx (0 for padding, 1 for the prompt), so the mixers start the
    prompt from a zero state and zero the padding out of its conv window. A chunk that begins exactly at a
    row's first real token has no padding left to separate it from, so that row's state is zeroed before it.
    Returns the last position's logits (b, padded_vocab).
    """
    l = ids.shape[1]
    logits = None
    for s in range(0, l, chunk):
        e = min(s + chunk, l)
        kwargs = {}
        if starts is not None:
            if s > 0 and any(st >= s for st in starts):
                fresh = torch.tensor([st >= s for st in starts], device=ids.device)
                for t in _state_tensors(params):
                    t.masked_fill_(_rows(fresh, t), 0)
            if any(st > s for st in starts):
                kwargs["seq_idx"] = mask[:, s:e].to(torch.int32)  # (b, e - s)
        logits = model(ids[:, s:e], inference_params=params, num_last_tokens=1, **kwargs).logits[:, -1]
        _advance(params, e - s, per_row=mask[:, s:e].sum(dim=1) if kwargs else None)
    return logits


def _copy_states(src: InferenceParams, dst: InferenceParams, keep_dst: bool) -> None:
    """dst's states <- src's. keep_dst: write into dst's tensors (CUDA-graph buffers must stay put; a KV cache
    may be longer than src's, its tail is zeroed); otherwise dst gets copies of src's tensors."""
    for layer, states in src.key_value_memory_dict.items():
        states = tuple(states) if isinstance(states, (tuple, list)) else (states,)
        if not keep_dst or layer not in dst.key_value_memory_dict:
            dst.key_value_memory_dict[layer] = tuple(t.clone() for t in states)
            continue
        for d, s in zip(dst.key_value_memory_dict[layer], states):
            if d.shape == s.shape:
                d.copy_(s)
            elif d.shape[0] == s.shape[0] and d.shape[2:] == s.shape[2:] and d.shape[1] >= s.shape[1]:
                d.zero_()
                d[:, : s.shape[1]].copy_(s)  # a KV cache (b, seqlen, ...) into a longer one
            else:
                raise ValueError(f"inference_params layer {layer} holds a state of shape {tuple(s.shape)}, "
                                 f"this model needs {tuple(d.shape)}")
    lengths = src.lengths_per_sample
    if lengths is not None and keep_dst and dst.lengths_per_sample is not None:
        dst.lengths_per_sample.copy_(lengths)
    elif lengths is not None:
        dst.lengths_per_sample = lengths.clone()
    dst.seqlen_offset = src.seqlen_offset


def _ensure_kv_capacity(params: InferenceParams, layers: list[int], needed: int) -> None:
    """Grow the KV caches (b, max_seqlen, 2, h, d) of attention ``layers`` to hold ``needed`` tokens."""
    params.max_seqlen = max(params.max_seqlen, needed)
    for layer in layers:
        states = params.key_value_memory_dict.get(layer)
        if states is None or states[0].shape[1] >= needed:
            continue
        kv = states[0]
        grown = kv.new_zeros(kv.shape[0], needed, *kv.shape[2:])
        grown[:, : kv.shape[1]] = kv
        params.key_value_memory_dict[layer] = (grown, *states[1:])


def _cuda_graphs_available(device: torch.device) -> bool:
    return device.type == "cuda"


def _cache_batch(params: InferenceParams) -> int | None:
    for t in _state_tensors(params):
        return t.shape[0]
    return None


# ---- one generation -------------------------------------------------------------------------------------
class _Generation:
    """Validated inputs, the state, and the decoding loop of one ``generate`` call."""

    def __init__(self, model, input_ids, *, max_length=None, max_new_tokens=None, top_k=1, top_p=0.0, min_p=0.0,
                 temperature=1.0, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, do_sample=None,
                 generator=None, attention_mask=None, inference_params=None, return_cache=False,
                 prefill_chunk_size=None, vocab_size=None, output_scores=False, cg=False, streamer=None,
                 teacher_outputs=None, check_every=None):
        self.model = model
        self.attn_layers = list(getattr(model.config, "attn_layer_idx", []) or [])
        param = next(model.parameters())
        self.device = param.device
        padded_vocab = model.config.padded_vocab_size
        greedy = do_sample is False or (do_sample is None and top_k == 1)
        if do_sample and top_k == 1:
            top_k = 0  # do_sample=True asks for sampling: the official greedy default top_k=1 means "no limit"
        validate_sampling_args(top_k, top_p, min_p, temperature, repetition_penalty, greedy=greedy)
        self.greedy = greedy
        self.vocab_size = model.config.vocab_size if vocab_size is None else vocab_size
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) \
                or not 0 < self.vocab_size <= padded_vocab:
            raise ValueError(f"vocab_size must be an integer in [1, {padded_vocab}], got {vocab_size!r}")
        eos, pad = _special_ids(eos_token_id, pad_token_id, padded_vocab)
        _check_options(prefill_chunk_size, generator, streamer)
        ids, mask = _as_ids(input_ids, attention_mask, self.device)
        self.starts = None
        if mask is not None:
            ids, mask, self.starts = _left_align(ids, mask, pad)
        self.ids, self.mask = ids, mask
        self.batch, self.prompt_len = ids.shape
        self.n_new = _num_new_tokens(self.prompt_len, max_length, max_new_tokens)
        self.chunk = self._chunk_size(prefill_chunk_size)
        self.sampler = _Sampler(ids, mask, self.vocab_size, padded_vocab, greedy, top_k, top_p, min_p,
                                temperature, repetition_penalty, generator)
        self.stopper = _Stopper(eos, pad, self.batch, self.device)
        self.streamer = streamer
        self.teacher = None if teacher_outputs is None else teacher_outputs.to(self.device)
        self.scores = [] if output_scores else None
        self.user_cache = inference_params
        self.return_cache = return_cache
        self.expose_cache = return_cache or inference_params is not None
        self.freeze = self.expose_cache and bool(eos)
        if check_every is None:
            check_every = 1 if streamer is not None or self.device.type != "cuda" else STOP_CHECK_EVERY
        self.check_every = check_every
        self._setup_state(cg)
        self.tokens = torch.empty(self.batch, self.n_new, dtype=torch.long, device=self.device)
        self.n_done = 0
        self.last_was_done = None

    def _chunk_size(self, requested) -> int:
        if requested == 0:
            return self.prompt_len
        if requested is None:  # whole prompt unless it is large; chunks of whole 256-token blocks
            per_row = max(256, AUTO_PREFILL_TOKENS // self.batch // 256 * 256)
            return self.prompt_len if self.prompt_len <= per_row else per_row
        return requested

    def _setup_state(self, cg: bool) -> None:
        """Pick the cache the model reads and writes, and the decode step: captured graph or eager."""
        user = self.user_cache
        if user is not None:
            if not isinstance(user, InferenceParams):
                raise ValueError(f"inference_params must be an InferenceParams, got {type(user).__name__}")
            rows = _cache_batch(user)
            if rows is not None and rows != self.batch:
                raise ValueError(f"inference_params holds {rows} rows but input_ids has {self.batch}; "
                                 f"select the rows you continue with inference_params.select(...)")
        self.continuing = user is not None and user.seqlen_offset > 0
        if cg and not _cuda_graphs_available(self.device):
            warnings.warn(f"cg=True needs a CUDA device; the model is on {self.device}, so decoding runs eagerly",
                          stacklevel=4)
            cg = False
        # Attention layers (hybrid models) keep a KV cache of max_seqlen tokens: every token must fit.
        needed = (user.seqlen_offset if self.continuing else 0) + self.prompt_len + self.n_new + 1
        if cg:
            from .cuda_graph import get_graph_decoder

            decoder = get_graph_decoder(self.model, self.batch, max_seqlen=needed if self.attn_layers else 1)
            self.params, self.step = decoder.inference_params, decoder
            self.params.seqlen_offset = 0
            if self.params.lengths_per_sample is not None:
                self.params.lengths_per_sample.zero_()
            if self.continuing:
                _copy_states(user, self.params, keep_dst=True)
        else:
            self.params = user if user is not None else InferenceParams(max_seqlen=0, max_batch_size=self.batch)
            self.step = lambda tok: self.model.decode_step(tok, self.params)
            _ensure_kv_capacity(self.params, self.attn_layers, needed)
            if self.attn_layers and (self.params.lengths_per_sample is None or not self.continuing):
                # Per-row token counts on the device: where each row's next K/V goes (left padding, no sync).
                self.params.lengths_per_sample = torch.full((self.batch,), self.params.seqlen_offset,
                                                            dtype=torch.int32, device=self.device)
        self.graphed = cg
        self.offset0 = self.params.seqlen_offset
        self.params.max_batch_size = self.batch

    def prefill(self) -> None:
        if self.streamer is not None:
            self.streamer.put(self.ids.cpu())
        if self.continuing and self.mask is not None:
            # Ragged new inputs after a history: token by token, padding rows frozen.
            for t in range(self.prompt_len):
                self.first_logits = _step(self.step, self.ids[:, t:t + 1], self.params, frozen=~self.mask[:, t])
        else:
            self.first_logits = _prefill(self.model, self.ids, self.mask, self.starts, self.params, self.chunk)

    def steps(self) -> Iterator[torch.Tensor]:
        """Yield each step's tokens (b,) on the model's device."""
        logits, was_done = self.first_logits, None
        for i in range(self.n_new):
            if i > 0:
                logits = self._feed(self.tokens[:, i - 1], was_done)
            if self.scores is not None:
                v = logits[:, : self.vocab_size]
                self.scores.append(v.clone() if self.graphed else v)
            pos = self.prompt_len + i
            tok = self.teacher[:, pos] if self.teacher is not None and pos < self.teacher.shape[1] \
                else self.sampler(logits)
            was_done = self.stopper.done.clone() if self.freeze else None
            self.last_was_done = was_done  # whether this token is padding after EOS, for its own feed
            tok = self.stopper(tok)
            self.tokens[:, i] = tok
            self.sampler.observe(tok)
            self.n_done = i + 1
            if self.streamer is not None:
                self.streamer.put(tok.unsqueeze(1).cpu())
            yield tok
            if self.n_done % self.check_every == 0 and self.stopper.all_done():
                break

    def _feed(self, tok: torch.Tensor, was_done) -> torch.Tensor:
        """Feed tokens (b,) into the state; rows that were already done keep theirs when frozen."""
        return _step(self.step, tok.unsqueeze(1), self.params, frozen=was_done if self.freeze else None)

    def finish(self, return_dict: bool):
        """Trim after the last EOS, settle the cache, and build the result."""
        generated = self.tokens[:, : self.n_done]
        n_keep = self.stopper.kept_length(generated)
        generated = generated[:, :n_keep]
        cache = None
        if self.expose_cache:
            if n_keep > 0 and n_keep == self.n_done:  # the last token has not been fed yet
                self._feed(generated[:, -1], self.last_was_done)
            self.params.seqlen_offset = self.offset0 + self.prompt_len + n_keep
            cache = self._settle_cache()
        if self.streamer is not None:
            self.streamer.end()
        sequences = torch.cat([self.ids, generated], dim=1)  # (b, prompt_len + n_keep)
        if not return_dict:
            return (sequences, cache) if self.return_cache else sequences
        cls = GreedySearchDecoderOnlyOutput if self.greedy else SampleDecoderOnlyOutput
        scores = None if self.scores is None else tuple(self.scores[:n_keep])
        return cls(sequences=sequences, scores=scores, inference_params=cache if self.return_cache else None)

    def _settle_cache(self) -> InferenceParams:
        """The cache to hand back: the user's (updated in place) or a new one; never the graph's buffers."""
        if not self.graphed:
            return self.params
        if self.user_cache is not None:
            _copy_states(self.params, self.user_cache, keep_dst=False)
            return self.user_cache
        return self.params.clone()


# ---- public API -------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(model, input_ids, max_length: int | None = None, max_new_tokens: int | None = None, top_k: int = 1,
             top_p: float = 0.0, min_p: float = 0.0, temperature: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             do_sample: bool | None = None, generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, inference_params: InferenceParams | None = None,
             return_cache: bool = False, prefill_chunk_size: int | None = None, vocab_size: int | None = None,
             return_dict_in_generate: bool = False, output_scores: bool = False, cg: bool = False, streamer=None,
             teacher_outputs: torch.Tensor | None = None, enable_timing: bool = False):
    """Generate tokens after ``input_ids`` (the official ``MambaLMHeadModel.generate``, extended).

    Args:
        input_ids: (batch, prompt_len) int token ids, or a list of token lists of different lengths.
        max_length: prompt_len + new tokens (official); or max_new_tokens: the number of new tokens.
        top_k: 1 = greedy (official default), 0 = no top-k filter. top_p, min_p: 0 = off.
        temperature: divides the logits when sampling (ignored when greedy).
        repetition_penalty: CTRL penalty on tokens already in the row (prompt included); 1.0 = off.
        eos_token_id: int or list; a row stops at its first EOS and is filled with pad_token_id (default:
            the first EOS id) until every row has stopped.
        do_sample: None = official rule (sample unless top_k == 1); False = greedy; True = sample (then a
            top_k of 1 means no top-k limit).
        generator: a seeded torch.Generator for reproducible sampling (any device).
        attention_mask: (batch, prompt_len), 1 for tokens, 0 for padding on either side; rows are returned
            left-padded and each equals its own generation.
        inference_params: continue from this cache (input_ids are then the *new* tokens only); it is updated
            in place to hold every returned token. return_cache: also return the cache.
        prefill_chunk_size: prompt tokens per forward pass (None: automatic, ~2^18 tokens per chunk over the
            batch; 0: the whole prompt at once). The state is carried across chunks.
        vocab_size: tokens >= vocab_size are never generated (default: config.vocab_size, so the padding rows
            of the embedding are excluded).
        cg: capture the decode step in a CUDA graph (CUDA only; ignored with a warning elsewhere).
        streamer: object with put(token_ids) / end() (transformers' protocol), e.g. TextStreamer.
        teacher_outputs: (batch, L) tokens forced at positions < L instead of sampled (official, for tests).
        enable_timing: print the prefill and decode times.
    Returns:
        sequences (batch, prompt_len + new) int64; with return_cache, (sequences, cache); with
        return_dict_in_generate, a GreedySearchDecoderOnlyOutput / SampleDecoderOnlyOutput with .sequences,
        .scores (when output_scores) and .inference_params (when return_cache).
    """
    run = _Generation(model, input_ids, max_length=max_length, max_new_tokens=max_new_tokens, top_k=top_k,
                      top_p=top_p, min_p=min_p, temperature=temperature, repetition_penalty=repetition_penalty,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                      generator=generator, attention_mask=attention_mask, inference_params=inference_params,
                      return_cache=return_cache, prefill_chunk_size=prefill_chunk_size, vocab_size=vocab_size,
                      output_scores=output_scores, cg=cg, streamer=streamer, teacher_outputs=teacher_outputs)
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    run.prefill()
    if enable_timing:
        sync()
        t1 = time.perf_counter()
    for _ in run.steps():
        pass
    out = run.finish(return_dict_in_generate)
    if enable_timing:
        sync()
        t2 = time.perf_counter()
        print(f"Prompt processing: {(t1 - t0) * 1e3:.1f} ms; decoding {run.n_done} tokens: "
              f"{(t2 - t1) * 1e3:.1f} ms; total {(t2 - t0) * 1e3:.1f} ms")
    return out


def decode(input_ids, model, max_length: int, **kwargs) -> DecodeOutput:
    """The official ``mamba_ssm.utils.generation.decode`` call: returns the output object with scores."""
    kwargs.setdefault("output_scores", True)
    return generate(model, input_ids, max_length=max_length, return_dict_in_generate=True, **kwargs)


@torch.inference_mode()
def stream_generate(model, input_ids, **kwargs) -> Iterator[torch.Tensor]:
    """Like ``generate`` but a Python iterator: yields each step's new tokens as a (batch,) int64 CPU tensor.

    Takes the keyword arguments of ``generate`` (not return_dict_in_generate / output_scores / streamer).
    Pass ``inference_params=`` to keep the state: it is updated in place, also when the loop is left early
    (it then holds every token yielded so far). For batch 1 the iteration ends right after an EOS token.
    """
    for name in ("return_dict_in_generate", "output_scores", "streamer", "enable_timing"):
        if kwargs.get(name):
            raise ValueError(f"stream_generate does not take {name}; use generate for that")
        kwargs.pop(name, None)
    run = _Generation(model, input_ids, check_every=1, **kwargs)
    run.prefill()
    try:
        for tok in run.steps():
            yield tok.cpu()
    finally:
        run.finish(return_dict=False)
