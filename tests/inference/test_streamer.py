"""TextStreamer / TextIteratorStreamer: transformers' protocol, text released only when final."""
import threading

import pytest
import torch
from gen_helpers import random_ids

from mambakit.inference.generate import generate
from mambakit.inference.streamer import TextIteratorStreamer, TextStreamer


class WordTokenizer:
    """id i -> 'wi', joined by spaces (a decode in which a word's text can change as tokens arrive)."""

    def decode(self, ids, **kwargs):
        return " ".join(f"w{i}" for i in ids)


class ByteTokenizer:
    """ids are UTF-8 bytes: an unfinished multi-byte character decodes to U+FFFD."""

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_streamer_prints_the_decoded_generation(model, capsys):
    prompt = random_ids(1, 5, seed=20)
    seq = generate(model, prompt, max_new_tokens=7, streamer=TextStreamer(WordTokenizer()))
    assert capsys.readouterr().out == WordTokenizer().decode(seq[0].tolist()) + "\n"
    generate(model, prompt, max_new_tokens=7, streamer=TextStreamer(WordTokenizer(), skip_prompt=True))
    assert capsys.readouterr().out == WordTokenizer().decode(seq[0, 5:].tolist()) + "\n"


def test_text_streamer_holds_back_incomplete_text(capsys):
    streamer = TextStreamer(ByteTokenizer())
    pieces = []
    streamer.on_finalized_text = lambda text, stream_end=False: pieces.append(text)
    data = "héllo wörld\nnext".encode()
    streamer.put(torch.tensor([list(data[:2])]))  # 'h' + first byte of 'é'
    assert pieces == []
    for b in data[2:]:
        streamer.put(torch.tensor([[b]]))
        assert "\ufffd" not in "".join(pieces)
    streamer.end()
    assert "".join(pieces) == "héllo wörld\nnext"


def test_text_streamer_refuses_batches():
    with pytest.raises(ValueError, match="one sequence"):
        TextStreamer(WordTokenizer()).put(torch.zeros(2, 3, dtype=torch.long))


def test_iterator_streamer_from_another_thread(model):
    prompt = random_ids(1, 4, seed=21)
    streamer = TextIteratorStreamer(WordTokenizer(), skip_prompt=True, timeout=60)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "seq", generate(model, prompt, max_new_tokens=6, streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == WordTokenizer().decode(result["seq"][0, 4:].tolist())
