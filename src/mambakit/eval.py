"""`mambakit eval`: perplexity and bits per byte of a language model on text files.

Long texts are scored with strided windows (as in the Hugging Face perplexity guide): windows of ``context``
tokens start every ``stride`` tokens, and each window scores only the tokens that no earlier window scored, so
every token is predicted once, from at least ``context - stride`` tokens of context (except near the start).
``stride == context`` gives non-overlapping windows (fastest, least context).

Each file is one document: the end-of-text token is put in front (when the tokenizer has one, as in training),
so the first real token is scored too and bits per byte cover every byte of the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


class EvalError(ValueError):
    """A problem with the user's eval inputs; the message says what to change."""


# ---- scoring ----------------------------------------------------------------------------------------------

def nll_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood (nats) and the number of scored tokens.

    input_ids, labels: (batch, seqlen); position t's logits are scored against labels[:, t + 1], positions whose
    label is -100 are skipped (the same shift as ``MambaLMHeadModel(..., labels=...)``). Returns two scalar
    tensors (fp32 sum, int64 count) on the model's device, without a host sync.
    """
    logits = model(input_ids).logits  # (b, l, padded_vocab)
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    return total, (targets != -100).sum()


def strided_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_scored) over a sequence of ``num_tokens`` tokens.

    The window is tokens[begin:end]; tokens first_scored..end-1 are scored (predicted from the tokens before
    them in the window). Together the windows score tokens 1..num_tokens-1 exactly once.

    >>> strided_windows(10, 4, 2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    if context < 2:
        raise EvalError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise EvalError(f"--stride must be between 1 and --context ({context}), got {stride}")
    windows, prev_end, begin = [], 1, 0  # token 0 has no context, so scoring starts at 1
    while prev_end < num_tokens:
        end = min(begin + context, num_tokens)
        windows.append((begin, end, prev_end))
        prev_end = end
        # The next window must start before the first token it scores, so that token has context: with
        # stride == context the windows overlap by one token.
        begin = min(begin + stride, end - 1)
    return windows


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, context: int, stride: int, batch_size: int = 1,
                 device: torch.device | str = "cpu") -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of one token sequence ``ids`` (num_tokens,), scored with
    strided windows; windows of equal length are batched ``batch_size`` at a time."""
    windows = strided_windows(int(ids.numel()), context, stride)
    total, count = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        group = [windows[i]]
        while len(group) < batch_size and i + len(group) < len(windows) and \
                windows[i + len(group)][1] - windows[i + len(group)][0] == length:
            group.append(windows[i + len(group)])
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # (batch, length)
        labels = x.clone()
        for row, (b, _, first) in enumerate(group):
            labels[row, : first - b] = -100
        s, n = nll_sum(model, x, labels)
        total += s
        count += n
        i += len(group)
    return float(total), int(count)


def summarise(nll: float, tokens: int, num_bytes: int) -> dict:
    """Perplexity exp(mean NLL) and bits per byte (total NLL in bits / UTF-8 bytes scored)."""
    if tokens == 0:
        raise EvalError("nothing was scored: the text has fewer than two tokens")
    return {"tokens": tokens, "bytes": num_bytes, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / math.log(2) / num_bytes if num_bytes else float("nan")}


# ---- command ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambakit eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model directory or Hub name (state-spaces/mamba-130m); default: the model shipped in "
                        "the package")
    p.add_argument("--file", nargs="+", required=True, help="text file(s) to score, each as one document")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--context", type=int, default=1024, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context // 2)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-eos-prefix", action="store_true",
                   help="do not put the end-of-text token in front of each file (then its first token is unscored)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda given but no CUDA device is available; use --device cpu")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def _load(args, device, dtype):
    from .hub import default_model_path, load_pretrained
    from .models.lm import MambaLMHeadModel
    from .tokenizer import load_tokenizer

    name = args.model or str(default_model_path())
    tok_path = args.tokenizer
    if tok_path is None:
        local = Path(name) / "tokenizer.json"
        tok_path = str(local) if local.exists() else name
    model = load_pretrained(MambaLMHeadModel, name, device=device, dtype=dtype)
    model.eval()
    return model, load_tokenizer(tok_path)


def evaluate_files(model, tokenizer, files: list[str], context: int, stride: int, batch_size: int,
                   device, eos_prefix: bool = True) -> dict:
    """Score each file as a document; returns the summary of summarise() over all files together."""
    total, tokens, num_bytes = 0.0, 0, 0
    eos = getattr(tokenizer, "eos_token_id", None) if eos_prefix else None
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise EvalError(f"--file {f!r} does not exist or is not a file")
        text = path.read_text(encoding="utf-8")
        if not text:
            raise EvalError(f"--file {f!r} is empty")
        ids = list(tokenizer.encode(text))
        nbytes = len(text.encode("utf-8"))
        if eos is not None:
            ids = [eos] + ids
        else:  # the first token is context only: its bytes are not scored
            nbytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
        s, n = sequence_nll(model, torch.tensor(ids, dtype=torch.long), context, stride, batch_size, device)
        total, tokens, num_bytes = total + s, tokens + n, num_bytes + nbytes
    return summarise(total, tokens, num_bytes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device, dtype = _device_dtype(args.device, args.dtype)
        stride = args.stride or max(1, args.context // 2)
        strided_windows(args.context, args.context, stride)  # checks --context/--stride before loading anything
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        model, tokenizer = _load(args, device, dtype)
        result = evaluate_files(model, tokenizer, args.file, args.context, stride, args.batch_size, device,
                                eos_prefix=not args.no_eos_prefix)
    except EvalError as e:
        print(f"mambakit eval: error: {e}", file=sys.stderr)
        return 2
    result.update(context=args.context, stride=stride)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"tokens scored   {result['tokens']:,}  ({result['bytes']:,} bytes)")
        print(f"NLL per token   {result['nll_per_token']:.4f} nats")
        print(f"perplexity      {result['perplexity']:.3f}")
        print(f"bits per byte   {result['bits_per_byte']:.4f}")
        print(f"(context {args.context}, stride {stride})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
