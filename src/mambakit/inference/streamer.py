"""Streamers: objects that receive tokens while ``generate`` produces them.

The protocol is transformers' (``transformers.generation.streamers``): ``put(token_ids)`` is called first with
the prompt (batch, prompt_len), then once per step with the new tokens (batch, 1), and ``end()`` once at the
end. Any object with these two methods works, transformers' own ``TextStreamer`` included; the classes here
do the same without depending on transformers.

``TextStreamer`` prints text to stdout as soon as it is final; ``TextIteratorStreamer`` hands it to another
thread through a queue (run ``generate`` in a thread and iterate over the streamer in the main one).
The tokenizer only needs ``decode(ids: list[int]) -> str`` (mambakit's, tokenizers', or transformers').
"""

from __future__ import annotations

import sys
from queue import Queue

import torch

__all__ = ["BaseStreamer", "TextStreamer", "TextIteratorStreamer"]


class BaseStreamer:
    """The interface ``generate`` calls: ``put(token_ids)`` for each new piece, ``end()`` once at the end."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Decode tokens as they come and print the text that can no longer change.

    A token's text is final once a later piece of text starts with whitespace or the text ends a line;
    until then it is held back, because byte-level tokenizers may need the next token to complete a
    character (the held text ends in U+FFFD) and some tokenizers join word pieces.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str``.
        skip_prompt: do not print the prompt (the first ``put``).
        decode_kwargs: passed to ``tokenizer.decode`` (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """value: (1, n) or (n,) token ids; batch > 1 cannot be printed as one text and is refused."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"{type(self).__name__} streams one sequence; got a batch of {value.shape[0]}")
        ids = value.reshape(-1).tolist()
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            if self.skip_prompt:
                return
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self._restart()
        elif text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the rest
        else:
            # Print up to the last whitespace: the word after it may still grow.
            cut = max(text.rfind(" "), text.rfind("\t")) + 1
            printable = text[self.print_len:cut] if cut > self.print_len else ""
            self.print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left and finish the line."""
        text = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len:]
        self._restart()
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def _restart(self) -> None:
        self.token_cache = []
        self.print_len = 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where final text goes: stdout, flushed at once. Override to send it elsewhere."""
        print(text, flush=True, end="" if not stream_end else "\n")


class TextIteratorStreamer(TextStreamer):
    """A TextStreamer whose text is read by iterating over it, from another thread::

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, args=(ids,), kwargs=dict(max_new_tokens=50, streamer=streamer)).start()
        for piece in streamer:
            print(piece, end="")

    timeout: seconds to wait for the next piece before ``queue.Empty`` is raised (None: wait forever).
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
