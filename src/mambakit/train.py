"""`mambakit train`: train or fine-tune a Mamba language model on text files.

    mambakit train DATA... --out DIR [--preset small --layer Mamba2 | --config config.json | --init-from CKPT]
    torchrun --nproc-per-node 8 -m mambakit train DATA... --out DIR [--fsdp]

One process trains on one device (CUDA if present, else CPU); under torchrun each process takes one GPU (or a
CPU slice with gloo) and the model is replicated (DDP) or sharded (FSDP2, ``--fsdp``). The corpus is tokenised
once into a memmap (``mambakit.data``); batches are random windows drawn from (seed, step, rank) alone, so a
checkpoint's step number is the whole sampler state and ``--resume`` continues exactly.

Output directory:
    run.json            the arguments of the run (a directory holding one is never reused without --resume)
    tokenizer.json      the tokenizer (trained here, or copied from --tokenizer / --init-from)
    config.json, model.safetensors   the final model (state-spaces layout: `mambakit generate --model DIR`)
    log.csv, metrics.json, loss.png  training curve, final numbers, plot (matplotlib optional)
    checkpoints/step_XXXXXXXX/       model + optimiser (safetensors + JSON), step, RNG states
    tokens/             the tokenised corpus (--data-cache to share it between runs)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from .config import MambaConfig
from .data import DataError

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
UNPLANNED = 10 ** 9  # planned_steps of a time-limited run before its step time is measured
OWNED_FILES = (RUN_FILE, "log.csv", "metrics.json", "loss.png", "config.json", "model.safetensors",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TrainError(ValueError):
    """A problem with the user's flags, data or output directory; the message says what to change."""


# ---- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambakit train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="+", help="text files and/or directories (searched recursively)")
    p.add_argument("--out", required=True, help="output directory (model, tokenizer, logs, checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (starts fresh if it has none)")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start again")
    g = p.add_argument_group("data")
    g.add_argument("--glob", default="*", help="file name pattern inside directories, e.g. '*.py'")
    g.add_argument("--exclude", action="append", default=[],
                   help="skip paths matching this pattern or with a component matching it (repeatable: "
                        "--exclude test --exclude 'site-packages')")
    g.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    g.add_argument("--val-fraction", type=float, default=0.01, help="share of the data held out for validation")
    g.add_argument("--val-split", choices=["tokens", "files"], default="tokens",
                   help="hold out the last tokens of the stream, or whole files")
    g.add_argument("--val-tokens", type=int, default=262144, help="at most this many tokens per validation")
    g.add_argument("--data-cache", default=None, help="directory of the token file (default: OUT/tokens)")
    g.add_argument("--prepare-only", action="store_true", help="tokenise (and train the tokenizer), then exit")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (or a directory holding one) to use")
    g.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary of the byte-level BPE trained on the data when no tokenizer is given")
    g.add_argument("--bpe-min-frequency", type=int, default=2, help="least count of a pair merged by the BPE")
    _model_and_optimiser_args(p)
    _run_args(p)
    return p


def _model_and_optimiser_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)} (default: small)")
    g.add_argument("--layer", default=None, help="mixer of a preset: Mamba1 (default) or Mamba2")
    g.add_argument("--config", default=None, help="a config.json (MambaConfig fields) instead of a preset")
    g.add_argument("--init-from", default=None, help="fine-tune this checkpoint (directory or Hub id)")
    for name, help_ in (("d-model", "width"), ("n-layer", "number of blocks"), ("d-state", "SSM state size"),
                        ("headdim", "Mamba2 head dimension")):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {help_}")
    g.add_argument("--expand", type=int, default=None, help="override the preset's expansion factor")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="windows per device per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 5%% of the steps, at most 1000; 100 for time-limited runs)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (never on A_log, D, dt_bias, norms, biases, embeddings)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (first-moment decay)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (second-moment decay)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("length (the first limit reached ends training; default: one epoch)")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training tokens (sets the steps)")
    g.add_argument("--max-time-minutes", type=float, default=None,
                   help="wall-clock budget; the cosine schedule is fitted to the measured step time")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype; parameters stay fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (torchrun, PyTorch >= 2.6)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data windows")
    g = p.add_argument_group("logging and saving")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    g.add_argument("--eval-every", type=int, default=250, help="steps between validations (0: only at the end)")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the final model.safetensors")
    g.add_argument("--export", choices=["last", "best"], default="last",
                   help="final model: the last weights, or those with the best validation loss")


# ---- model presets ----------------------------------------------------------------------------------------------

# name: (d_model, n_layer). 130m..2.8b are the official state-spaces shapes (Mamba-2 names them 780m/1.3b/2.7b).
PRESETS = {"tiny": (64, 2), "small": (256, 8), "medium": (512, 16), "130m": (768, 24), "370m": (1024, 48),
           "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
_PRESET_ALIASES = {"780m": "790m", "1.3b": "1.4b", "2.7b": "2.8b"}
_MODEL_FLAGS = ("preset", "layer", "d_model", "n_layer", "d_state", "headdim", "expand")


def _layer_name(layer: str | None) -> str:
    key = (layer or "Mamba1").lower().replace("-", "").replace("_", "")
    names = {"mamba1": "Mamba1", "mamba": "Mamba1", "1": "Mamba1", "mamba2": "Mamba2", "2": "Mamba2"}
    if key not in names:
        raise TrainError(f"--layer {layer!r} is not a mixer; use Mamba1 or Mamba2")
    return names[key]


def preset_config(args, vocab_size: int) -> MambaConfig:
    """MambaConfig of a preset (+ size overrides) for a tokenizer of ``vocab_size`` tokens."""
    name = _PRESET_ALIASES.get(args.preset or "small", args.preset or "small")
    if name not in PRESETS:
        raise TrainError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    d_model, n_layer = PRESETS[name]
    layer = _layer_name(args.layer)
    ssm_cfg: dict = {"layer": layer} if layer == "Mamba2" else {}
    if layer == "Mamba2" and name in ("tiny", "small", "medium"):
        ssm_cfg["d_state"] = 64  # the official 128 is sized for d_model >= 768
    for flag in ("d_state", "expand", "headdim"):
        if getattr(args, flag) is not None:
            if flag == "headdim" and layer != "Mamba2":
                raise TrainError("--headdim applies to Mamba2 only; add --layer Mamba2 or drop --headdim")
            ssm_cfg[flag] = getattr(args, flag)
    try:
        return MambaConfig(d_model=args.d_model or d_model, n_layer=args.n_layer or n_layer, vocab_size=vocab_size,
                           ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                           pad_vocab_size_multiple=16 if layer == "Mamba2" else 8, tie_embeddings=True)
    except ValueError as e:
        raise TrainError(f"the preset with these overrides is not a valid model: {e}") from None


def config_differences(a: MambaConfig, b: MambaConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k]]


def _flag_conflicts(args, base: MambaConfig) -> list[str]:
    """The model flags given on the command line whose value differs from the checkpoint's config ``base``."""
    import inspect

    from .modules.mamba1 import Mamba
    from .modules.mamba2 import Mamba2

    want: dict = {}
    if args.preset is not None:
        name = _PRESET_ALIASES.get(args.preset, args.preset)
        if name not in PRESETS:
            raise TrainError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        want["d_model"], want["n_layer"] = PRESETS[name]
    for flag in ("d_model", "n_layer", "d_state", "expand", "headdim"):
        if getattr(args, flag) is not None:
            want[flag] = getattr(args, flag)
    if args.layer is not None:
        want["layer"] = _layer_name(args.layer)
    mixer = Mamba2 if base.layer == "Mamba2" else Mamba
    defaults = {k: v.default for k, v in inspect.signature(mixer).parameters.items()}
    have = {"d_model": base.d_model, "n_layer": base.n_layer, "layer": base.layer,
            **{k: base.ssm_cfg.get(k, defaults.get(k)) for k in ("d_state", "expand", "headdim")}}
    return [f"--{k.replace('_', '-')} {v} vs {have[k]}" for k, v in want.items() if v != have[k]]


def resolve_config(args, vocab_size: int, base: MambaConfig | None, base_name: str) -> MambaConfig:
    """The model config: the checkpoint's (``base``: --init-from or the resumed run), --config, or a preset.

    With a checkpoint, --config and the model flags may repeat its values (so the command that started a run
    resumes it) but an error names every field where they differ."""
    model_flags = [f"--{f.replace('_', '-')}" for f in _MODEL_FLAGS if getattr(args, f) is not None]
    if args.config and model_flags:
        raise TrainError(f"--config sets the whole model; drop {', '.join(model_flags)}")
    wanted = None
    if args.config:
        try:
            wanted = MambaConfig.from_json_file(args.config)
        except (OSError, ValueError) as e:
            raise TrainError(f"--config {args.config}: {e}") from None
    if base is not None:
        if wanted is not None and config_differences(wanted, base):
            raise TrainError(f"--config contradicts {base_name}: " + "; ".join(config_differences(wanted, base)))
        conflicts = _flag_conflicts(args, base) if model_flags else []
        if conflicts:
            raise TrainError(f"the model flags contradict {base_name} (given vs checkpoint): {'; '.join(conflicts)}; "
                             "drop them or make them match")
        wanted = base
    elif wanted is None:
        wanted = preset_config(args, vocab_size)
    if wanted.vocab_size < vocab_size:
        raise TrainError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {wanted.vocab_size}; "
                         "use the model's own tokenizer or a config with a larger vocab_size")
    return wanted


# ---- processes and devices -----------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(t, op=red)
        return t


def setup_dist(device_flag: str) -> Dist:
    """Read torchrun's environment; one process per GPU (NCCL) or per CPU worker (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda given but no CUDA device is available; use --device cpu")
    if want_cuda:
        index = local if world > 1 or ":" not in device_flag else int(device_flag.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        from datetime import timedelta

        # Rank 0 tokenises while the others wait at a barrier: allow an hour before calling it a hang.
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo", timeout=timedelta(hours=1))
    return Dist(rank=rank, world=world, device=device)


# ---- output directory, tokenizer and data ---------------------------------------------------------------------

def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CHECKPOINT_DIR).glob("step_*[0-9]")) if (out / CHECKPOINT_DIR).is_dir() else []
    ckpts = [c for c in ckpts if (c / "state.json").is_file()]
    return ckpts[-1] if ckpts else None


def check_out_dir(out: Path, args, dist: Dist) -> None:
    """Refuse to reuse a directory that holds a run, unless --resume (continue) or --overwrite (start again)."""
    markers = [n for n in (RUN_FILE, CHECKPOINT_DIR, "config.json", "model.safetensors") if (out / n).exists()]
    held = [n for n in (*OWNED_FILES, CHECKPOINT_DIR) if (out / n).exists()]
    if markers and not args.resume and not args.overwrite:
        raise TrainError(f"{out} already holds a run or a model ({', '.join(markers)}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    dist.barrier()  # every rank has looked before rank 0 deletes or writes anything
    if held and args.overwrite and dist.main:
        for n in held:
            shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    dist.barrier()


def setup_tokenizer(args, out: Path, train_files: list[Path], dist: Dist, log) -> Path:
    """OUT/tokenizer.json: kept on resume, else copied from --tokenizer / --init-from, else a BPE trained here."""
    dest = out / "tokenizer.json"
    if args.tokenizer is not None:
        src = Path(args.tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        if not src.is_file():
            raise TrainError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
        if dest.exists() and data_mod.file_sha256(dest) != data_mod.file_sha256(src):
            raise TrainError(f"--tokenizer {src} differs from the run's {dest}; a run keeps its tokenizer")
        if dist.main and not dest.exists():
            shutil.copyfile(src, dest)
    elif args.init_from and not dest.exists() and (Path(args.init_from) / "tokenizer.json").is_file():
        if dist.main:  # with its special-token files, when the checkpoint has them
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(args.init_from) / name).is_file():
                    shutil.copyfile(Path(args.init_from) / name, out / name)
    elif args.init_from and not dest.exists():
        from .tokenizer import load_tokenizer

        try:  # a Hub checkpoint's tokenizer; GPT-NeoX-20B for the official ones, which ship none
            tok = load_tokenizer(args.init_from)
        except (OSError, ValueError, ImportError) as e:
            raise TrainError(f"--init-from {args.init_from}: no usable tokenizer ({e}); "
                             "pass --tokenizer PATH") from None
        if dist.main:
            tok.backend.save(str(dest))
    elif dest.exists():
        log(f"using the tokenizer already in {dest}")
    elif dist.main:
        log(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on {len(train_files)} files")
        data_mod.train_bpe(train_files, args.vocab_size, dest, args.bpe_min_frequency)
    dist.barrier()
    return dest


def setup_data(args, out: Path, dist: Dist, log) -> tuple[data_mod.TokenData, Path]:
    files = data_mod.find_files(args.data, args.glob, args.exclude)
    train_files, _ = data_mod.split_files(files, args.val_split, args.val_fraction)
    tok_path = setup_tokenizer(args, out, train_files, dist, log)
    cache = Path(args.data_cache) if args.data_cache else out / "tokens"
    token_data = None
    if dist.main:
        token_data = data_mod.prepare_tokens(files, tok_path, cache, args.val_fraction, args.val_split, log=log)
    dist.barrier()
    if not dist.main:
        token_data = data_mod.prepare_tokens(files, tok_path, cache, args.val_fraction, args.val_split,
                                             build=False, log=lambda s: None)
    data_mod.check_window_fits(token_data, args.seq_len)
    return token_data, tok_path


# ---- model and optimiser ---------------------------------------------------------------------------------------

def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters kept out of weight decay: flagged ``_no_weight_decay`` (A_log, D, dt_bias), 1-D ones (norms,
    biases) and embeddings (with a tied lm_head, that is the same tensor)."""
    names = set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.dim() < 2 or id(p) in embeddings:
            names.add(name)
    return names


def make_optimizer(model: torch.nn.Module, no_decay: set[str], args, device: torch.device):
    """AdamW with two groups; the fused CUDA kernel when the parameters are on a GPU."""
    decay, plain = [], []
    for name, p in model.named_parameters():  # (names of the wrapped model lose DDP's "module." prefix below)
        (plain if name.removeprefix("module.") in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, **extra)


def wrap_model(model: torch.nn.Module, args, dist: Dist) -> torch.nn.Module:
    """Move to the device and wrap for several processes: DDP, or FSDP2 (each block, then the root)."""
    if args.fsdp:
        if dist.world == 1:
            raise TrainError("--fsdp shards over several processes: launch with torchrun --nproc-per-node N")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise TrainError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.6); this is "
                             f"PyTorch {torch.__version__}: upgrade, or drop --fsdp to use DDP") from None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dist.device.type, (dist.world,))
        for block in model.backbone.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # moves the shards to the mesh's device
        return model
    model.to(dist.device)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at step ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- checkpoints -------------------------------------------------------------------------------------------------

def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module, config: MambaConfig) -> dict[str, torch.Tensor]:
    """Full state dict on the CPU (gathered from the shards under FSDP: every rank must call this), with a tied
    lm_head left out (safetensors stores each tensor once)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(cpu_offload=True))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().clone() for k, v in state.items()}


def _rng_state(dist: Dist) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (torch CPU/CUDA, numpy, Python)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": torch.tensor([np_state[2]]),
             "python": torch.tensor(list(py_state[1]), dtype=torch.int64)}
    if dist.device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(dist.device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], dist: Dist) -> None:
    torch.set_rng_state(state["torch_cpu"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "torch_cuda" in state and dist.device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"], dist.device)


def save_checkpoint(out: Path, model, optimizer, config: MambaConfig, run: dict, dist: Dist, keep: int) -> Path:
    """checkpoints/step_N/: model.safetensors, optimizer.safetensors + optimizer.json, state.json, rng_rankR.

    Written to a temporary directory renamed at the end, so a crash leaves the previous checkpoint intact."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = full_model_state(model, config)  # collective under FSDP
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    final = out / CHECKPOINT_DIR / f"step_{run['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(model_state, str(tmp / "model.safetensors"))
        tensors, structure = _flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(structure, indent=1))
        (tmp / "state.json").write_text(json.dumps({**run, "config": config.to_dict(), "world": dist.world},
                                                   indent=1))
    dist.barrier()
    save_file({k: v.contiguous() for k, v in _rng_state(dist).items()}, str(tmp / f"rng_rank{dist.rank}.safetensors"))
    dist.barrier()
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted((out / CHECKPOINT_DIR).glob("step_*[0-9]"))[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name -> (tensors "name/key", JSON: param groups + other values)."""
    tensors, scalars = {}, {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *structure["scalars"].items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: Path, model, optimizer, dist: Dist) -> None:
    """Optimizer and RNG states of checkpoint ``path`` (the weights are loaded before wrapping the model)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    structure = json.loads((path / "optimizer.json").read_text())
    optim_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), structure)
    set_optimizer_state_dict(model, optimizer, optim_state, options=_state_options())
    rng = path / f"rng_rank{dist.rank}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(str(rng)), dist)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    model.load_state_dict(state)


def export_model(state: dict[str, torch.Tensor], config: MambaConfig, out: Path, dtype: torch.dtype) -> None:
    """Write the final model with ``mambakit.hub.save_pretrained`` (config.json + model.safetensors)."""
    from .hub import save_pretrained
    from .models.lm import MambaLMHeadModel

    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    save_pretrained(model, out, overwrite=True)


# ---- progress, logs, plot --------------------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """One line redrawn with \\r on a terminal; plain lines otherwise (logs, CI). Silent on ranks > 0."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self._open = False

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            sys.stdout.write("\r" + text[:width].ljust(width))
            sys.stdout.flush()
            self._open = True
        else:
            print(text, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            sys.stdout.write("\n")
            self._open = False
        print(text, flush=True)


LOG_FIELDS = ("step", "tokens", "elapsed_s", "lr", "loss", "grad_norm", "tokens_per_s", "val_loss", "val_ppl")


class CsvLog:
    """log.csv: one row per progress line (train fields) or validation (val fields). On resume the rows after
    the checkpoint's step are dropped, so the file reads as one run."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        self.rows: list[dict] = []
        if keep_until is not None and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)

    def write(self, **row) -> None:
        row = {k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)


def plot_losses(rows: list[dict], path: Path, unigram_loss: float | None, title: str) -> str | None:
    """loss.png: training and validation loss against tokens seen, with the unigram baseline. Returns a note
    when matplotlib is missing (it is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so there is no loss.png (pip install matplotlib); log.csv has the numbers"
    train = [(float(r["tokens"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    val = [(float(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"] not in ("", None)]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=4)
    if unigram_loss is not None:
        ax.axhline(unigram_loss, color="gray", ls="--", label=f"unigram baseline ({unigram_loss:.2f})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- the training loop -----------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint needs besides tensors; the data sampler's position is ``step`` itself."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training wall time over all sessions (for --max-time-minutes)
    planned_steps: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None


class Trainer:
    def __init__(self, args, model, config: MambaConfig, token_data, dist: Dist, out: Path, ckpt: Path | None,
                 log):
        self.args, self.config, self.data, self.dist, self.out, self.log = args, config, token_data, dist, out, log
        unique = {id(p): p for p in model.parameters()}
        self.n_params = sum(p.numel() for p in unique.values())
        no_decay = no_decay_names(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = wrap_model(model, args, dist)
        self.optimizer = make_optimizer(self.model, no_decay, args, dist.device)
        self.state = RunState()
        if ckpt is not None:
            load_checkpoint(ckpt, self.model, self.optimizer, dist)
            saved = json.loads((ckpt / "state.json").read_text())
            self.state = RunState(**{k: saved[k] for k in asdict(self.state)})
            if saved.get("num_tokens") != token_data.num_tokens:
                log(f"note: the data changed since the checkpoint ({saved.get('num_tokens'):,} -> "
                    f"{token_data.num_tokens:,} tokens); training continues on the new data")
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist.world
        self.val_starts = data_mod.val_window_starts(token_data.train_end, token_data.num_tokens, args.seq_len,
                                                     args.val_tokens)
        self.fixed_steps = self._fixed_steps()
        self.warmup = args.warmup_steps if args.warmup_steps is not None else \
            (min(1000, max(1, self.fixed_steps // 20)) if self.fixed_steps else 100)
        self.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
        self.progress = Progress(dist.main)
        self.csv = CsvLog(out / "log.csv", keep_until=self.state.step if ckpt else None) if dist.main else None
        self.stop_signal: int | None = None
        self.last_val: tuple[int, float] | None = None
        self.unigram_loss: float | None = None

    # ---- plan -----------------------------------------------------------------------------------------------
    def _fixed_steps(self) -> int | None:
        a = self.args
        if a.max_steps is not None:
            return a.max_steps
        epochs = a.epochs if a.epochs is not None else (None if a.max_time_minutes else 1.0)
        if epochs is None:
            return None
        return max(1, math.ceil(epochs * self.data.train_end / self.tokens_per_step))

    def _replan(self, sec_per_step: float | None) -> None:
        """planned_steps: the fixed length, or what the time budget allows at the measured step time."""
        planned = self.fixed_steps
        budget = self.args.max_time_minutes
        if budget is not None and sec_per_step is None and self.state.planned_steps > self.state.step:
            return  # resumed: keep the checkpoint's plan until this session has measured its step time
        if budget is not None and sec_per_step:
            # 2% margin so that the cosine reaches its end before the clock does
            fit = self.state.step + int(0.98 * (budget * 60 - self.state.elapsed_s) / sec_per_step)
            planned = fit if planned is None else min(planned, fit)
        self.state.planned_steps = max(planned or UNPLANNED, self.state.step)

    def _lr(self) -> float:
        return lr_at(self.state.step, self.state.planned_steps, self.warmup, self.args.lr, self.min_lr)

    # ---- one optimiser step ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.args.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arr)
        if self.dist.device.type == "cuda":
            return x.pin_memory().to(self.dist.device, non_blocking=True)
        return x

    def _train_batch(self, step: int, micro: int) -> torch.Tensor:
        """(batch_size, seq_len) random training windows of this step, micro-step and rank."""
        a = self.args
        return self._to_device(data_mod.sample_windows(self.data.tokens, self.data.train_end, a.seq_len, a.batch_size,
                                                       a.seed, step, micro, self.dist.rank))

    def _val_batch(self, starts: list[int]) -> torch.Tensor:
        """(len(starts), seq_len) validation windows."""
        n = self.args.seq_len
        return self._to_device(np.stack([np.asarray(self.data.tokens[s:s + n], dtype=np.int64) for s in starts]))

    def _grad_sync(self, last: bool):
        """Gradients are reduced across processes on the last micro-step only."""
        if self.args.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.world > 1 and not last:
            return self.model.no_sync()
        return nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step over grad_accum micro-batches -> (mean loss, gradient norm before clipping)."""
        a = self.args
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.dist.device)
        for micro in range(a.grad_accum):
            x = self._train_batch(self.state.step, micro)
            with self._grad_sync(micro == a.grad_accum - 1):
                with self._autocast():
                    loss = self.model(x, labels=x).loss
                (loss / a.grad_accum).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip) if a.grad_clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / a.grad_accum, norm

    # ---- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss over the validation windows (split across processes)."""
        from .eval import nll_sum

        if not self.val_starts:
            return None
        d, bs = self.dist, self.args.batch_size
        mine = self.val_starts[d.rank::d.world]
        # Every process runs the same number of forwards (FSDP all-gathers in each); spare ones count zero.
        n_batches = math.ceil(math.ceil(len(self.val_starts) / d.world) / bs)
        total = torch.zeros((), device=d.device)
        count = torch.zeros((), device=d.device)
        self.model.eval()
        for i in range(n_batches):
            starts = mine[i * bs:(i + 1) * bs]
            weight = 1.0 if starts else 0.0
            x = self._val_batch(starts or self.val_starts[:1])
            with self._autocast():
                s, n = nll_sum(self.model, x, x)
            total += weight * s
            count += weight * n
        self.model.train()
        d.all_reduce(total), d.all_reduce(count)
        return float(total / count)

    def unigram_baseline(self) -> float | None:
        """Held-out loss of the add-one unigram model of the training tokens, over the validation targets."""
        if not self.val_starts:
            return None
        vocab = int(self.data.header["vocab_size"])
        counts = data_mod.unigram_counts(self.data.tokens, self.data.train_end, vocab)
        targets = np.concatenate([np.asarray(self.data.tokens[s + 1:s + self.args.seq_len]) for s in self.val_starts])
        return data_mod.unigram_nll(counts, targets)

    # ---- events ---------------------------------------------------------------------------------------------
    def _install_signals(self):
        """Ctrl-C / SIGTERM: finish the current step, save, export, exit. A second Ctrl-C aborts at once."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.progress.message(f"{signal.Signals(signum).name}: stopping after this step and saving a "
                                  "checkpoint (Ctrl-C again to abort without saving)")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop_reason(self, collective: bool) -> str | None:
        """Why to stop now, if at all; under several processes all of them must agree (collective call)."""
        st, a = self.state, self.args
        local = 0
        if self.stop_signal is not None:
            local = 2
        elif a.max_time_minutes is not None and st.elapsed_s >= a.max_time_minutes * 60:
            local = 1
        if self.dist.world > 1:
            if not collective:
                return None
            flag = self.dist.all_reduce(torch.tensor([local], device=self.dist.device), op="max")
            local = int(flag[0])
        return {0: None, 1: "time limit", 2: "interrupted"}[local]

    def _log_progress(self, loss: float, norm, sec_per_step: float | None, tok_s: float, lr: float) -> None:
        st = self.state
        if not math.isfinite(loss):
            raise TrainError(f"the loss is {loss} at step {st.step}: training diverged; lower --lr (now "
                             f"{self.args.lr}) or raise --warmup-steps, and restart from the last checkpoint with "
                             "--resume")
        eta = (st.planned_steps - st.step) * sec_per_step if sec_per_step and st.planned_steps < UNPLANNED else None
        total = st.planned_steps if st.planned_steps < UNPLANNED else "?"
        self.progress.update(f"step {st.step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s / 1e3:,.1f}k tok/s | "
                             f"{_fmt_time(st.elapsed_s)} | ETA {_fmt_time(eta) if eta is not None else '?'}")
        if self.csv:
            self.csv.write(step=st.step, tokens=st.tokens, elapsed_s=round(st.elapsed_s, 2), lr=f"{lr:.4e}",
                           loss=f"{loss:.5f}", grad_norm=None if norm is None else f"{norm:.4f}",
                           tokens_per_s=round(tok_s))

    def _run_validation(self) -> None:
        loss = self.validate()
        if loss is None:
            return
        st = self.state
        self.last_val = (st.step, loss)
        improved = st.best_val_loss is None or loss < st.best_val_loss
        if improved:
            st.best_val_loss, st.best_step = loss, st.step
        if improved and self.args.export == "best":
            self._save_best()
        base = f", unigram baseline {math.exp(self.unigram_loss):.2f}" if self.unigram_loss is not None else ""
        self.progress.message(f"step {st.step}: validation loss {loss:.4f}, perplexity {math.exp(loss):.3f}{base}")
        if self.csv:
            self.csv.write(step=st.step, tokens=st.tokens, elapsed_s=round(st.elapsed_s, 2), val_loss=f"{loss:.5f}",
                           val_ppl=f"{math.exp(loss):.4f}")
            self._plot()

    def _save_best(self) -> None:
        """checkpoints/best.safetensors: the weights with the lowest validation loss so far (kept on disk, so
        --export best survives --resume)."""
        from safetensors.torch import save_file

        state = full_model_state(self.model, self.config)  # every rank: a collective under FSDP
        if self.dist.main:
            path = self.out / CHECKPOINT_DIR / "best.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path.with_suffix(".tmp")), metadata={"step": str(self.state.step)})
            os.replace(path.with_suffix(".tmp"), path)

    def _plot(self) -> None:
        note = plot_losses(self.csv.rows, self.out / "loss.png", self.unigram_loss,
                           f"{self.config.layer}, {self.n_params / 1e6:.2f}M parameters")
        if note and not getattr(self, "_plot_noted", False):
            self.progress.message(note)
            self._plot_noted = True

    def save(self) -> Path:
        run = {**asdict(self.state), "num_tokens": self.data.num_tokens, "seed": self.args.seed}
        return save_checkpoint(self.out, self.model, self.optimizer, self.config, run, self.dist,
                               self.args.keep_checkpoints)

    # ---- main loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        a, st, d = self.args, self.state, self.dist
        if d.main:
            self.unigram_loss = self.unigram_baseline()
        self._replan(None)
        self._announce()
        previous = self._install_signals()
        session_start, elapsed_before = time.monotonic(), st.elapsed_s
        mark = None  # (time, step) of this session's first progress line: the step time is measured from there
        window = (time.monotonic(), st.step, st.tokens)
        loss_sum, n, last_saved, reason = torch.zeros((), device=d.device), 0, None, None
        try:
            while reason is None:
                if st.step >= st.planned_steps:
                    reason = "done"
                    break
                loss, norm = self.train_step()
                loss_sum += loss
                n += 1
                st.step += 1
                st.tokens += self.tokens_per_step
                st.elapsed_s = elapsed_before + time.monotonic() - session_start
                at_log = st.step % a.log_every == 0 or st.step >= st.planned_steps
                if at_log:
                    now = time.monotonic()
                    mark = mark or (now, st.step)
                    sec = (now - mark[0]) / (st.step - mark[1]) if st.step > mark[1] else None
                    self._replan(sec)
                    tok_s = (st.tokens - window[2]) / max(1e-9, now - window[0])
                    mean_loss = float(d.all_reduce(loss_sum / n)) / d.world  # over all processes' batches
                    self._log_progress(mean_loss, None if norm is None else float(_full(norm)), sec, tok_s,
                                       self.optimizer.param_groups[0]["lr"])
                    window, loss_sum, n = (now, st.step, st.tokens), torch.zeros((), device=d.device), 0
                reason = self._stop_reason(collective=at_log)
                if a.eval_every and st.step % a.eval_every == 0 and reason is None and st.step < st.planned_steps:
                    self._run_validation()
                if a.save_every and st.step % a.save_every == 0 and reason is None:
                    self.save()
                    last_saved = st.step
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self.finish(reason, last_saved)

    def finish(self, reason: str, last_saved: int | None) -> int:
        st = self.state
        self.progress.message(f"training ended ({reason}) at step {st.step}, {st.tokens:,} tokens, "
                              f"{_fmt_time(st.elapsed_s)}")
        if reason != "interrupted" and (self.last_val is None or self.last_val[0] != st.step):
            self._run_validation()
        if last_saved != st.step:
            path = self.save()
            self.progress.message(f"checkpoint: {path}")
        best = self.out / CHECKPOINT_DIR / "best.safetensors"
        use_best = self.args.export == "best" and best.is_file()
        state = None if use_best else full_model_state(self.model, self.config)  # collective under FSDP
        if self.dist.main:
            if use_best:
                from safetensors.torch import load_file

                state = load_file(str(best))
            export_model(state, self.config, self.out, getattr(torch, self.args.save_dtype))
            self._write_metrics(reason, use_best)
            if self.csv:
                self._plot()
            what = f"best validation weights (step {st.best_step})" if use_best else "final weights"
            self.progress.message(f"model ({what}, {self.args.save_dtype}): {self.out} -> "
                                  f"mambakit generate --model {self.out}")
        return 130 if reason == "interrupted" else 0

    def _write_metrics(self, reason: str, used_best: bool) -> None:
        st = self.state
        val = self.last_val[1] if self.last_val else None
        train_losses = [float(r["loss"]) for r in self.csv.rows if r["loss"] not in ("", None)] if self.csv else []

        def ppl(x):
            return None if x is None else math.exp(x)

        metrics = {
            "stopped": reason, "steps": st.step, "tokens": st.tokens, "train_time_s": round(st.elapsed_s, 1),
            "tokens_per_s": round(st.tokens / st.elapsed_s) if st.elapsed_s else None,
            "params": self.n_params, "config": self.config.to_dict(), "world_size": self.dist.world,
            "device": torch.cuda.get_device_name(self.dist.device) if self.dist.device.type == "cuda" else "cpu",
            "precision": self.args.precision, "final_train_loss": train_losses[-1] if train_losses else None,
            "val_loss": val, "val_ppl": ppl(val),
            "best_val_loss": st.best_val_loss, "best_val_ppl": ppl(st.best_val_loss),
            "best_step": st.best_step, "unigram_val_loss": self.unigram_loss, "unigram_val_ppl": ppl(self.unigram_loss),
            "exported": "best" if used_best else "last", "save_dtype": self.args.save_dtype,
            "train_tokens": self.data.train_end, "val_tokens": self.data.val_tokens,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    def _announce(self) -> None:
        a, c, d, st = self.args, self.config, self.dist, self.state
        dev = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
        plan = f"{st.planned_steps:,} steps" if self.fixed_steps else f"steps fitted to {a.max_time_minutes} min"
        self.progress.message(
            f"model: {c.layer}, d_model {c.d_model}, {c.n_layer} layers, vocab {c.vocab_size}: "
            f"{self.n_params / 1e6:.2f}M parameters\n"
            f"data: {self.data.num_tokens:,} tokens (train {self.data.train_end:,}, validation "
            f"{self.data.val_tokens:,}; {len(self.val_starts)} validation windows of {a.seq_len})\n"
            f"{self.tokens_per_step:,} tokens per step (batch {a.batch_size} x seq {a.seq_len} x accum "
            f"{a.grad_accum} x {d.world} process{'es' if d.world > 1 else ''}); {plan}, warm-up {self.warmup}; "
            f"{'starting' if st.step == 0 else 'resuming at step ' + str(st.step)}\n"
            f"device: {dev} x {d.world}, {'bf16 autocast' if a.precision == 'bf16' else 'fp32'}, fp32 parameters"
            f"{', FSDP' if a.fsdp else ', DDP' if d.world > 1 else ''}")
        if self.unigram_loss is not None:
            self.progress.message(f"unigram baseline: validation loss {self.unigram_loss:.4f}, "
                                  f"perplexity {math.exp(self.unigram_loss):.2f}")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- entry point -------------------------------------------------------------------------------------------------

def check_args(args) -> None:
    positive = {"--seq-len": args.seq_len, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--log-every": args.log_every, "--keep-checkpoints": args.keep_checkpoints}
    for flag, value in positive.items():
        if value < 1:
            raise TrainError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--max-steps": args.max_steps, "--epochs": args.epochs,
                        "--max-time-minutes": args.max_time_minutes, "--lr": args.lr}.items():
        if value is not None and value <= 0:
            raise TrainError(f"{flag} must be > 0, got {value}")
    if args.resume and args.overwrite:
        raise TrainError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.precision == "auto":
        args.precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if args.precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise TrainError("this GPU has no bf16 support; pass --precision fp32")


def build_model(args, ckpt: Path | None, vocab_size: int, dist: Dist, log):
    """The model with its starting weights: the checkpoint's (resume), --init-from's, or a fresh init."""
    from .models.lm import MambaLMHeadModel

    base, base_name, model = None, "", None
    if ckpt is not None:
        base = MambaConfig.from_dict(json.loads((ckpt / "state.json").read_text())["config"])
        base_name = f"the run being resumed ({ckpt})"
        if args.init_from:
            log(f"resuming: --init-from {args.init_from} is ignored (the checkpoint holds the weights)")
    elif args.init_from:
        from .hub import load_pretrained

        try:
            model = load_pretrained(MambaLMHeadModel, args.init_from, device="cpu", dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise TrainError(f"--init-from {args.init_from}: {e}") from None
        base, base_name = model.config, f"the checkpoint --init-from {args.init_from}"
    config = resolve_config(args, vocab_size, base, base_name)
    if model is None:
        torch.manual_seed(args.seed)  # the same init on every rank (FSDP shards a model built on each rank)
        device = "cpu" if args.fsdp or ckpt is not None else dist.device
        model = MambaLMHeadModel(config, device=device, dtype=torch.float32)
    if ckpt is not None:
        load_weights(model, ckpt)
    return model, config


def train(args) -> int:
    check_args(args)
    dist = setup_dist(args.device)
    log = (lambda s: print(s, flush=True)) if dist.main else (lambda s: None)
    out = Path(args.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    check_out_dir(out, args, dist)
    ckpt = latest_checkpoint(out) if args.resume else None
    if args.resume and ckpt is None:
        log(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}, starting from step 0")
    token_data, tok_path = setup_data(args, out, dist, log)
    if args.prepare_only:
        log(f"data ready: {token_data.num_tokens:,} tokens; tokenizer {tok_path}")
        return 0
    model, config = build_model(args, ckpt, int(token_data.header["vocab_size"]), dist, log)
    if dist.main and ckpt is None:
        (out / RUN_FILE).write_text(json.dumps({"args": vars(args), "argv": sys.argv, "torch": torch.__version__,
                                                "world_size": dist.world}, indent=1, default=str) + "\n")
    return Trainer(args, model, config, token_data, dist, out, ckpt, log).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (TrainError, DataError) as e:
        print(f"mambakit train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
