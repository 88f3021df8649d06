"""GPU check of tensor parallelism: TP=2 against TP=1 on a 2.7b-shape Mamba-2, correctness then speed.

    torchrun --nproc-per-node 2 scripts/gpu_check_tp.py --out $OUT/tp
    torchrun --nproc-per-node 2 scripts/gpu_check_tp.py --smoke --out /tmp/tp   # CPU/Gloo dry run, tiny shape

Random weights (seeded, then broadcast from rank 0 so both ranks hold the same full model); rank 0 keeps a
full copy as the TP=1 reference. The 2.7b shape of the released checkpoints (d_model 2560, 64 layers, headdim 64,
d_state 128, ngroups 1: B/C replicated on both ranks, the gated RMSNorm's group spanning them); --ngroups 2
checks the split-groups path instead; --hybrid adds the attention layers of mamba2attn-2.7b.

1. logits, fp32, batch 2 x 256: TP=2 vs TP=1 relative error (only the reduction order differs) and, bf16,
   the same plus argmax agreement; gather_state_dict() == the reference's state dict, bit for bit;
2. speed, bf16: prefill batch 1 x 2048 (ms) and decode ms/token at batch 1 (eager and one CUDA graph per
   step), TP=2 (both GPUs) and TP=1 (rank 0 alone).
Prints a table last; rank 0 writes JSON to --out (a directory, or a .json path).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from mambakit import InferenceParams, MambaConfig, MambaLMHeadModel
from mambakit.distributed import gather_state_dict, parallelize, setup_from_env

SHAPE = dict(d_model=2560, n_layer=64, vocab_size=50277,
             ssm_cfg={"layer": "Mamba2", "headdim": 64, "d_state": 128, "ngroups": 1})
SMOKE = dict(d_model=64, n_layer=4, vocab_size=1000,
             ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 16, "ngroups": 1, "chunk_size": 32})
HYBRID = dict(attn_layer_idx=[9, 18, 27, 36, 45, 56],
              attn_cfg={"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "num_heads_kv": 30,
                        "out_proj_bias": False, "qkv_proj_bias": False, "rotary_emb_dim": 64})
SMOKE_HYBRID = dict(attn_layer_idx=[1], attn_cfg={"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 4,
                                                  "rotary_emb_dim": 8})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory (writes tp.json) or .json path for the results")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU with Gloo: a dry run of the script")
    p.add_argument("--hybrid", action="store_true", help="add mamba2attn-2.7b's attention layers")
    p.add_argument("--ngroups", type=int, default=1,
                   help="Mamba-2 ngroups (default 1, as the released checkpoints: B/C replicated across ranks; "
                        "2: each rank holds whole groups)")
    p.add_argument("--prefill-len", type=int, default=2048, help="prompt length of the timed prefill (batch 1)")
    p.add_argument("--decode-tokens", type=int, default=128, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn, repeats: int, warmup: int = 1) -> float:
        """Median wall seconds of fn(), GPU synchronised around each call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(args, device) -> MambaLMHeadModel:
    cfg = dict(SMOKE if args.smoke else SHAPE)
    cfg["ssm_cfg"] = {**cfg["ssm_cfg"], "ngroups": args.ngroups}
    if args.hybrid:
        cfg.update(SMOKE_HYBRID if args.smoke else HYBRID)
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**cfg), device=device, dtype=torch.float32).eval()
    with torch.no_grad():  # same full weights on every rank, whatever each device's RNG did
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    return model


def check_logits(model, ref, ids, rank: int) -> dict:
    """TP logits (every rank computes them; rank 0 compares with the TP=1 reference)."""
    with torch.inference_mode():
        tp = model(ids).logits
        if rank != 0:
            return {}
        full = ref(ids).logits
    return {"rel_err": rel(tp, full), "max_abs": float((tp.float() - full.float()).abs().max()),
            "argmax_agree": float((tp.argmax(-1) == full.argmax(-1)).float().mean())}


def check_gather(model, ref, rank: int) -> dict:
    gathered = gather_state_dict(model, device="cpu")
    if rank != 0:
        return {}
    want = ref.state_dict()
    same = set(gathered) == set(want) and all(torch.equal(gathered[k], want[k].cpu()) for k in want)
    return {"gather_state_dict_equal": bool(same), "keys": len(gathered)}


def new_cache(model, batch: int, max_seqlen: int, has_attn: bool, device) -> InferenceParams:
    params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch)
    params.key_value_memory_dict = model.allocate_inference_cache(batch, max_seqlen)
    if has_attn:  # attention reads its positions from this device tensor (CUDA-graph safe)
        params.lengths_per_sample = torch.zeros(batch, dtype=torch.int32, device=device)
    return params


def prefill(model, ids, params):
    params.seqlen_offset = 0
    if params.lengths_per_sample is not None:
        params.lengths_per_sample.zero_()
    model(ids, inference_params=params, num_last_tokens=1)
    params.seqlen_offset = ids.shape[1]
    if params.lengths_per_sample is not None:
        params.lengths_per_sample.fill_(ids.shape[1])


def capture_decode(model, params, tok, device):
    """One decode step in a CUDA graph (NCCL all-reduces included); returns replay()."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model.decode_step(tok, params)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.decode_step(tok, params)
    return graph.replay


def time_model(model, args, device, has_attn: bool, timer: Timer) -> dict:
    """Prefill (batch 1 x prefill_len) and decode ms/token, eager and graphed."""
    n = args.decode_tokens
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 1000, (1, args.prefill_len), generator=gen).to(device)
    tok = ids[:, -1:].clone()
    params = new_cache(model, 1, args.prefill_len + 5 * n + 8, has_attn, device)  # warmup + 3 repeats
    out = {}
    with torch.inference_mode():
        out["prefill_ms"] = 1e3 * timer.median(lambda: prefill(model, ids, params), args.repeats)

        def eager():
            for _ in range(n):
                model.decode_step(tok, params)
                params.seqlen_offset += 1
                if params.lengths_per_sample is not None:
                    params.lengths_per_sample += 1
        prefill(model, ids, params)
        out["decode_eager_ms_per_token"] = 1e3 * timer.median(eager, 3) / n
        if timer.cuda:
            prefill(model, ids, params)
            replay = capture_decode(model, params, tok, device)

            def graphed():
                for _ in range(n):
                    replay()
            out["decode_graph_ms_per_token"] = 1e3 * timer.median(graphed, 3) / n
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    env = setup_from_env(backend="gloo" if args.smoke else None)
    device = torch.device("cpu") if args.smoke else env.device
    if not args.smoke and env.device.type != "cuda":
        raise SystemExit("no CUDA device: run with --smoke for a CPU dry run")
    if args.smoke:
        args.prefill_len, args.decode_tokens, args.repeats = min(args.prefill_len, 64), min(args.decode_tokens, 4), 1
    timer, rank = Timer(device), env.rank
    has_attn = args.hybrid
    model = build(args, device)
    ref = copy.deepcopy(model) if rank == 0 else None  # TP=1 reference
    parallelize(model, env.group)
    result = {"world_size": env.world_size, "device": torch.cuda.get_device_name(device) if timer.cuda else "cpu",
              "shape": ("smoke" if args.smoke else "mamba2-2.7b") + f" (ngroups={args.ngroups})"
                       + (" + attention" if args.hybrid else "")}

    ids = torch.randint(0, 1000, (2, 256 if not args.smoke else 40), generator=torch.Generator().manual_seed(2))
    result["fp32"] = check_logits(model, ref, ids.to(device), rank)
    result.update(check_gather(model, ref, rank))
    model.to(torch.bfloat16)
    if ref is not None:
        ref.to(torch.bfloat16)
    result["bf16"] = check_logits(model, ref, ids.to(device), rank)

    result["tp"] = time_model(model, args, device, has_attn, timer)
    dist.barrier()
    if rank == 0:
        result["tp1"] = time_model(ref, args, device, has_attn, timer)
    dist.barrier()
    if rank == 0:
        report(result, args.out)
    dist.destroy_process_group()
    return 0


def report(result: dict, out: str | None) -> None:
    print(json.dumps({k: v for k, v in result.items() if k not in ("tp", "tp1")}, indent=1))
    cols = ["prefill_ms", "decode_eager_ms_per_token", "decode_graph_ms_per_token"]
    print(f"\n{result['shape']} on {result['device']}")
    print(f"| TP | {' | '.join(cols)} |")
    print("|---|" + "---|" * len(cols))
    for name, label in (("tp1", "1"), ("tp", str(result["world_size"]))):
        row = result.get(name, {})
        print(f"| {label} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in cols) + " |")
    fp32, bf16 = result["fp32"], result["bf16"]
    print(f"logits TP vs TP=1: fp32 rel err {fp32['rel_err']:.2e}; bf16 rel err {bf16['rel_err']:.2e}, argmax "
          f"agreement {bf16['argmax_agree']:.4f}; gather_state_dict equal: {result['gather_state_dict_equal']}")
    if out:
        path = out if out.endswith(".json") else os.path.join(out, "tp.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
