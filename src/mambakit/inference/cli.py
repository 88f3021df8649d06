"""`mambakit generate PROMPT`: generate text from a prompt and stream it to stdout as it is produced.

Without ``--model`` it uses the small model shipped inside the package (``mambakit.hub.default_model_path()``),
so it works offline right after ``pip install``. Greedy by default (the official default, top_k=1); giving
--temperature, --top-p, --min-p or a --top-k other than 1 turns sampling on, e.g. ``--top-p 0.9 --seed 0``.

Tensor parallelism over the GPUs of one node (Mamba-2 and hybrid models): ``torchrun --nproc-per-node 2 -m
mambakit generate --tp --model DIR "prompt"``; every rank loads the model and keeps its part, rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambakit generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    p.add_argument("--model", default=None,
                   help="model directory or Hugging Face Hub id (default: the model shipped with mambakit)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, tokenizer.json file or Hub id (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="number of tokens to generate at most (default: 100)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divide the logits by this when sampling (default: 1.0)")
    p.add_argument("--top-k", type=int, default=1,
                   help="sample among the k most likely tokens; 1 = greedy (the default, as in mamba_ssm), "
                        "0 = no limit")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass in (0, 1); 0 = off (default)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p x the most likely one; 0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL penalty on tokens already in the text (> 1 discourages repeats); 1 = off (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling generator, for reproducible output (default: random)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="prompt tokens per forward pass (bounds memory for long prompts); 0 = whole prompt "
                        "(default: automatic, chunks only for very long prompts)")
    p.add_argument("--cg", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the decode step in a CUDA graph (default: on for CUDA without --tp, where it "
                        "makes decoding 20-30x faster than eager launches; --no-cg turns it off)")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    p.add_argument("--tp", action="store_true",
                   help="tensor parallelism: launch with `torchrun --nproc-per-node N -m mambakit generate --tp ...`; "
                        "the model is split over the N processes (cuda:LOCAL_RANK with NCCL, or CPU with Gloo)")
    return p


def _load(args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from --model / --tokenizer, through mambakit.hub and mambakit.tokenizer."""
    from ..hub import load_pretrained
    from ..models.lm import MambaLMHeadModel
    from ..tokenizer import load_tokenizer

    # None = the shipped default model (mambakit.hub.default_model_path()) and its tokenizer.
    model = load_pretrained(MambaLMHeadModel, args.model, device=device, dtype=dtype)
    model.eval()
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    return model, tokenizer


def _wants_sampling(args) -> bool:
    """Any sampling option given means sampling, even with the greedy default --top-k 1 (then: no top-k)."""
    return args.top_k != 1 or args.top_p > 0 or args.min_p > 0 or args.temperature != 1.0


def _setup_tp(args):
    """torch.distributed from torchrun's variables; returns the DistEnv (its device replaces --device)."""
    from ..distributed import setup_from_env

    if args.device is not None:
        raise ValueError("--device cannot be combined with --tp: each rank uses cuda:LOCAL_RANK (or the CPU)")
    try:
        return setup_from_env()
    except RuntimeError as e:  # not launched by torchrun, or more ranks than GPUs: the message says what to do
        raise ValueError(str(e)) from e


def _shared_seed(env, device: torch.device) -> int:
    """One random seed drawn on rank 0 and broadcast, so every rank samples the same tokens."""
    import torch.distributed as dist

    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    dist.broadcast(seed, src=dist.get_global_rank(env.group, 0), group=env.group)
    return int(seed.item())


def _run(args, env) -> None:
    from .generate import generate
    from .streamer import TextStreamer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    device = env.device if env else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    model, tokenizer = _load(args, device, dtype)
    if env is not None:
        from ..distributed import parallelize

        parallelize(model, env.group)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ValueError("empty prompt: give some text to continue")
    # Never produce ids the tokenizer cannot decode (the embedding is padded past the vocabulary).
    vocab = min(int(tokenizer.vocab_size), model.config.vocab_size)
    seed = args.seed
    if env is not None and seed is None and _wants_sampling(args):
        seed = _shared_seed(env, device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    printer = env is None or env.rank == 0
    generate(model, torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, temperature=args.temperature,
             repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
             do_sample=_wants_sampling(args), generator=generator, vocab_size=vocab,
             cg=args.cg if args.cg is not None else (device.type == "cuda" and env is None),
             prefill_chunk_size=args.prefill_chunk_size,
             streamer=TextStreamer(tokenizer, skip_prompt=args.no_echo) if printer else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = None
    try:
        env = _setup_tp(args) if args.tp else None
        _run(args, env)
        if env is not None:
            import torch.distributed as dist

            # every rank's collectives finish before any tears the group down: a Gloo worker thread still
            # holding a collective's tensors at interpreter exit aborts the process (seen under load in CI)
            dist.barrier()
    except (ValueError, FileNotFoundError) as e:
        where = f" (rank {env.rank})" if env is not None else ""
        print(f"mambakit generate{where}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
