"""Load and save Mamba checkpoints in the layouts people publish them in, and convert between them.

Layouts, told apart by config.json:
  state-spaces   `mamba_ssm`'s own: config.json holds MambaConfig fields (d_model, n_layer, ssm_cfg...); keys
                 ``backbone.embedding.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``,
                 ``lm_head.weight`` (the official Hub repos ship pytorch_model.bin)
  transformers   ``MambaForCausalLM`` / ``Mamba2ForCausalLM``: config.json with model_type "mamba"/"mamba2",
                 hidden_size, state_size...; keys as above except ``backbone.embeddings.weight``
Weight files: model.safetensors, sharded model-0000i-of-0000n.safetensors + model.safetensors.index.json, and the
same for pytorch_model*.bin. Safetensors are preferred; .bin files are read only by
``torch.load(weights_only=True)``, so a file that would need arbitrary unpickling is refused, never executed.

Loading builds the model on the ``meta`` device (no memory, no init) and assigns each tensor, converted to the
target dtype/device one at a time, so a 2.8B model is never held twice. ``mambakit convert`` runs ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from .config import MambaConfig

CONFIG_FILE = "config.json"
SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LAYOUTS = ("state-spaces", "transformers")
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only")
# Files a save may write or leave stale: their presence is what makes a directory "a checkpoint".
_CHECKPOINT_FILE = re.compile(r"(config\.json|model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin"
                              r"|(model\.safetensors|pytorch_model\.bin)\.index\.json)")
_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.")

# Defaults of transformers' MambaConfig / Mamba2Config (transformers 4.44-5.x). transformers writes only the fields
# that differ from these (save_pretrained uses to_diff_dict), so a missing field means "the default".
_HF_DEFAULTS = {
    "mamba": dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
                  expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
                  residual_in_fp32=True, time_step_rank="auto", time_step_scale=1.0, time_step_min=0.001,
                  time_step_max=0.1, time_step_init_scheme="random", time_step_floor=1e-4,
                  tie_word_embeddings=True),
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                   use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
                   time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                   time_step_limit=(0.0, float("inf")), chunk_size=256, tie_word_embeddings=False),
}
_NORM_EPS = 1e-5  # mambakit's RMSNorms use mamba_ssm's eps; a checkpoint trained with another is refused


def default_model_path() -> Path:
    """The directory of the model shipped with mambakit (config.json, model.safetensors, tokenizer.json)."""
    return Path(__file__).resolve().parent / "assets" / "default"


# ---- finding the checkpoint directory ------------------------------------------------------------------------
def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(name: str | os.PathLike | None = None, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """The local directory of a checkpoint: ``name`` itself, the shipped default (None / "default"), or the
    Hugging Face cache snapshot of a Hub id (downloaded unless offline)."""
    if name is None or name == "default":
        path = default_model_path()
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the default mambakit model is not installed ({path / CONFIG_FILE} is missing): pass a checkpoint "
                "directory or a Hub id such as 'state-spaces/mamba-130m', or train one with `mambakit train`")
        return path
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{text} is a file; pass the directory that holds config.json and the weights")
    if not isinstance(name, str) or not _is_hub_id(text):
        raise FileNotFoundError(f"checkpoint directory {text} does not exist")
    return _hub_snapshot(text, revision, cache_dir, local_files_only)


def _hub_snapshot(repo_id: str, revision, cache_dir, local_files_only: bool) -> Path:
    """Download (or find in the cache) config.json and the weights of a Hub repo; safetensors when it has them."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ImportError(f"'{repo_id}' is not a local directory, and loading from the Hugging Face Hub needs "
                          "huggingface_hub: pip install huggingface_hub (or pass the path of a checkpoint "
                          "directory)") from None
    offline = bool(local_files_only) or _env_true("HF_HUB_OFFLINE")
    kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=offline)
    json_files = [CONFIG_FILE, SAFE_INDEX, BIN_INDEX, *TOKENIZER_FILES]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*json_files, "model*.safetensors"], **kw))
        if not _has_weights(folder):  # the official state-spaces repos ship only pytorch_model.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=[*json_files, "pytorch_model*.bin"], **kw))
    except LocalEntryNotFoundError as e:
        why = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else "the Hub could not be reached")
        raise FileNotFoundError(
            f"cannot load '{repo_id}': it is not a local directory, it is not in the Hugging Face cache "
            f"({cache_dir or 'the default cache, $HF_HOME/hub'}), and {why}. Download it where there is network "
            f"access with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) "
            "and copy the cache here, or pass the path of a directory holding config.json and model.safetensors "
            "(or pytorch_model.bin)") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"'{repo_id}' has no revision {revision!r} on the Hub") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"'{repo_id}' is neither a local directory nor a Hub repository you can access "
                                "(check the spelling, or log in with `hf auth login` for a private repo)") from e
    if not _has_weights(folder):
        where = "the cached copy" if offline else "the Hub repository"
        raise FileNotFoundError(f"{where} of '{repo_id}' ({folder}) has no {SAFE_FILE}, {SAFE_INDEX}, {BIN_FILE} or "
                                f"{BIN_INDEX}" + (f"; download them with `hf download {repo_id}`" if offline else ""))
    return folder


def _has_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in (SAFE_FILE, SAFE_INDEX, BIN_FILE, BIN_INDEX))


# ---- config.json -----------------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> tuple[dict, str]:
    """config.json of a checkpoint -> (MambaConfig fields, layout: 'state-spaces' or 'transformers')."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; a checkpoint directory holds config.json and "
                                "model.safetensors (or pytorch_model.bin)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if "model_type" in data:
        return config_from_transformers(data, source=str(path)), "transformers"
    if "d_model" in data:
        return data, "state-spaces"
    raise ValueError(f"{path} is neither a state-spaces config (d_model, n_layer, ssm_cfg...) nor a transformers "
                     "Mamba config (model_type 'mamba' or 'mamba2')")


def config_from_transformers(data: dict, source: str = "config.json") -> dict:
    """A transformers MambaConfig/Mamba2Config dict -> MambaConfig fields; refuses features mambakit lacks."""
    model_type = data.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"{source}: unknown model_type {model_type!r}; mambakit loads transformers checkpoints of "
                         f"model_type {sorted(_HF_DEFAULTS)} (and state-spaces checkpoints)")
    hf = {**_HF_DEFAULTS[model_type], **data}
    d_model, expand = hf["hidden_size"], hf["expand"]
    d_inner = expand * d_model
    problems = []
    if hf["hidden_act"] != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (the Mamba mixers use 'silu')")
    if not math.isclose(hf["layer_norm_epsilon"], _NORM_EPS, rel_tol=1e-9):
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (mambakit's norms use {_NORM_EPS})")
    if model_type == "mamba" and "intermediate_size" in data and data["intermediate_size"] != int(d_inner):
        problems.append(f"intermediate_size={data['intermediate_size']} != expand x hidden_size = {d_inner}")
    if model_type == "mamba2" and hf["num_heads"] * hf["head_dim"] != d_inner:
        problems.append(f"num_heads x head_dim = {hf['num_heads'] * hf['head_dim']} != expand x hidden_size "
                        f"= {d_inner}")
    if problems:
        raise ValueError(f"{source}: this {model_type} checkpoint uses features mambakit does not implement, so it "
                         f"would not load correctly: {'; '.join(problems)}")
    ssm = dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=expand, bias=hf["use_bias"],
               conv_bias=hf["use_conv_bias"], dt_min=hf["time_step_min"], dt_max=hf["time_step_max"],
               dt_init_floor=hf["time_step_floor"])
    if model_type == "mamba":
        ssm.update(dt_rank=hf["time_step_rank"], dt_init=hf["time_step_init_scheme"],
                   dt_scale=hf["time_step_scale"])
    else:
        # transformers' Mamba2: D per head, gated RMSNorm per group applied after the gate (norm_before_gate=False)
        ssm.update(layer="Mamba2", headdim=hf["head_dim"], ngroups=hf["n_groups"], chunk_size=hf["chunk_size"],
                   dt_limit=tuple(_json_float(v) for v in hf["time_step_limit"]))
    vocab = hf["vocab_size"]
    # transformers' embedding has exactly vocab_size rows: pick the padding that keeps that row count.
    return dict(d_model=d_model, n_layer=hf["num_hidden_layers"], vocab_size=vocab, ssm_cfg=ssm, rms_norm=True,
                residual_in_fp32=hf["residual_in_fp32"], fused_add_norm=True,
                pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1, tie_embeddings=hf["tie_word_embeddings"])


def _json_float(value) -> float:
    """A float from config.json: a number, 'Infinity', or transformers 5's {"__float__": "Infinity"} tag."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)  # float() parses 'Infinity', '-Infinity' and 'NaN'


def _mixer_args(config: MambaConfig) -> dict:
    """Every constructor argument of the config's mixer: its defaults overridden by ssm_cfg."""
    from .modules.mamba1 import Mamba
    from .modules.mamba2 import Mamba2

    cls = Mamba2 if config.layer == "Mamba2" else Mamba
    params = inspect.signature(cls.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **config.mixer_kwargs()}


def config_to_transformers(config: MambaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """MambaConfig -> the config.json that transformers' MambaConfig / Mamba2Config would write for it.

    Special-token ids are those of the GPT-NeoX-20B tokenizer the official models use (<|endoftext|> = 0).
    """
    args = _mixer_args(config)
    problems = []
    if config.d_intermediate > 0:
        problems.append(f"d_intermediate={config.d_intermediate} (an MLP after each mixer)")
    if config.attn_layer_idx:
        problems.append(f"attention layers at {config.attn_layer_idx}")
    if not config.rms_norm:
        problems.append("rms_norm=False (LayerNorm)")
    if float(args["expand"]) != int(args["expand"]):
        problems.append(f"expand={args['expand']} (transformers needs an integer)")
    if config.layer == "Mamba2":
        if args["d_ssm"] not in (None, config.d_inner):
            problems.append(f"d_ssm={args['d_ssm']} != d_inner={config.d_inner}")
        for key, supported in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
            if bool(args[key]) != supported:
                problems.append(f"{key}={args[key]}")
    if problems:
        raise ValueError(f"transformers' {'Mamba2' if config.layer == 'Mamba2' else 'Mamba'} model cannot "
                         f"express this model: {'; '.join(problems)}; keep it in the state-spaces layout")
    out = dict(vocab_size=config.padded_vocab_size, hidden_size=config.d_model, state_size=args["d_state"],
               num_hidden_layers=config.n_layer, layer_norm_epsilon=_NORM_EPS, expand=int(args["expand"]),
               conv_kernel=args["d_conv"], use_bias=args["bias"], use_conv_bias=args["conv_bias"],
               hidden_act="silu", residual_in_fp32=config.residual_in_fp32,
               time_step_rank=math.ceil(config.d_model / 16), time_step_min=args["dt_min"],
               time_step_max=args["dt_max"], time_step_floor=args["dt_init_floor"],
               tie_word_embeddings=config.tie_embeddings, rescale_prenorm_residual=False, use_cache=True,
               pad_token_id=0, bos_token_id=0, eos_token_id=0, dtype=str(dtype).removeprefix("torch."))
    if config.layer == "Mamba2":
        nheads = config.d_inner // args["headdim"]
        out.update(architectures=["Mamba2ForCausalLM"], model_type="mamba2", num_heads=nheads,
                   head_dim=args["headdim"], n_groups=args["ngroups"], chunk_size=args["chunk_size"],
                   time_step_limit=[float(v) for v in args["dt_limit"]])
    else:
        rank = args["dt_rank"]
        out.update(architectures=["MambaForCausalLM"], model_type="mamba", intermediate_size=config.d_inner,
                   time_step_rank=math.ceil(config.d_model / 16) if rank == "auto" else int(rank),
                   time_step_scale=args["dt_scale"], time_step_init_scheme=args["dt_init"], use_mambapy=False)
    return dict(sorted(out.items()))


# ---- reading weights -------------------------------------------------------------------------------------------
class CheckpointWeights:
    """The tensors of a checkpoint by mambakit name, read one at a time (``shapes`` needs no tensor data)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}
        self._loaders: dict[str, Callable[[], torch.Tensor]] = {}
        self.files: list[Path] = []

    def add(self, name: str, shape, dtype: torch.dtype | None, loader: Callable[[], torch.Tensor],
            source: Path) -> None:
        if name in self.shapes:
            raise ValueError(f"tensor {name} appears twice in the checkpoint (again in {source.name})")
        self.shapes[name] = tuple(shape)
        self.dtypes[name] = dtype
        self._loaders[name] = loader

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def load(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def rename(self, fn: Callable[[str], str]) -> None:
        self.shapes = {fn(k): v for k, v in self.shapes.items()}
        self.dtypes = {fn(k): v for k, v in self.dtypes.items()}
        self._loaders = {fn(k): v for k, v in self._loaders.items()}


def _shard_files(directory: Path, index_name: str) -> list[Path]:
    index = directory / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid shard index (needs a 'weight_map' object): {e}") from None
    files = [directory / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
    return files


def open_weights(directory: str | os.PathLike) -> CheckpointWeights:
    """Index the weight files of a checkpoint directory (safetensors first, then .bin) without reading tensors."""
    directory = Path(directory)
    weights = CheckpointWeights()
    if (directory / SAFE_INDEX).is_file() or (directory / SAFE_FILE).is_file():
        files = _shard_files(directory, SAFE_INDEX) if (directory / SAFE_INDEX).is_file() else [directory / SAFE_FILE]
        for f in files:
            _add_safetensors(weights, f)
    elif (directory / BIN_INDEX).is_file() or (directory / BIN_FILE).is_file():
        files = _shard_files(directory, BIN_INDEX) if (directory / BIN_INDEX).is_file() else [directory / BIN_FILE]
        for f in files:
            for name, t in safe_torch_load(f).items():
                weights.add(name, t.shape, t.dtype, lambda t=t: t, f)
    else:
        raise FileNotFoundError(f"no weights in {directory}: expected {SAFE_FILE}, {SAFE_INDEX} with its shards, "
                                f"{BIN_FILE} or {BIN_INDEX}")
    weights.files = files
    return weights


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _add_safetensors(weights: CheckpointWeights, path: Path) -> None:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")  # memory-maps the file; reads on request
        for name in handle.keys():
            piece = handle.get_slice(name)
            weights.add(name, piece.get_shape(), _SAFETENSORS_DTYPES.get(piece.get_dtype()),
                        lambda h=handle, n=name: h.get_tensor(n), path)
    except Exception as e:  # safetensors raises its own SafetensorError for damaged headers
        if isinstance(e, ValueError) and "appears twice" in str(e):
            raise
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def safe_torch_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .bin state dict with ``torch.load(weights_only=True)`` (memory-mapped when the format allows).

    Files that would need arbitrary unpickling (code execution) are refused with an explanation.
    """
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format: no mmap
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {path}: it holds Python objects other than tensors, and unpickling them can run "
            f"arbitrary code (torch.load(weights_only=True) stopped: {reason}). If you trust the file, load it once "
            "yourself with torch.load(path, weights_only=False) and save the state dict with "
            "safetensors.torch.save_file, or ask its author for a safetensors checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a flat state dict of name -> tensor (found {keys}); save "
                         "model.state_dict() itself")
    return obj


def _normalise_names(weights: CheckpointWeights, layout: str) -> None:
    """Map checkpoint key names onto mambakit's (= the state-spaces names)."""
    names = list(weights.shapes)
    for prefix in ("module.", "_orig_mod."):  # saved from a DDP- or torch.compile-wrapped model
        if names and all(n.startswith(prefix) for n in names):
            weights.rename(lambda n, p=prefix: n[len(p):])
            names = list(weights.shapes)
    if layout == "transformers":
        if names and not any(n.startswith("backbone.") for n in names):  # a bare MambaModel was saved
            weights.rename(lambda n: n if n.startswith("lm_head.") else "backbone." + n)
        weights.rename(from_transformers_key)


def from_transformers_key(name: str) -> str:
    return "backbone.embedding." + name[len("backbone.embeddings."):] if name.startswith("backbone.embeddings.") \
        else name


def to_transformers_key(name: str) -> str:
    return "backbone.embeddings." + name[len("backbone.embedding."):] if name.startswith("backbone.embedding.") \
        else name


# ---- checking and loading ------------------------------------------------------------------------------------
def _check_weights(model: torch.nn.Module, weights: CheckpointWeights, config: MambaConfig, where: str) -> None:
    """Raise one ValueError that lists every disagreement between the checkpoint and the config's model."""
    layers = {int(m.group(1)) for k in weights.shapes if (m := _LAYER_KEY.match(k))}
    if layers and len(layers) != config.n_layer:
        raise ValueError(f"checkpoint has {len(layers)} layers, config says {config.n_layer} ({where})")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)  # the tied head is the embedding; a stored copy is checked later
    found = {k: v for k, v in weights.shapes.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    wrong = [k for k in sorted(set(expected) & set(found), key=_natural) if expected[k] != found[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"checkpoint does not match the model that its config describes ({where}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_some(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    for k in wrong[:20]:
        lines.append(f"  size mismatch for {k}: checkpoint {found[k]}, model {expected[k]}")
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more size mismatches")
    emb = "backbone.embedding.weight"
    if emb in wrong and found[emb][0] != expected[emb][0]:
        lines.append(f"  (the embedding has {found[emb][0]} rows; the config's vocab_size={config.vocab_size} "
                     f"padded to a multiple of pad_vocab_size_multiple={config.pad_vocab_size_multiple} gives "
                     f"{config.padded_vocab_size})")
    if "lm_head.weight" in missing and not config.tie_embeddings:
        lines.append("  (no lm_head.weight and tie_embeddings=False: was the model saved with tied embeddings?)")
    raise ValueError("\n".join(lines))


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _some(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _build_empty(cls, config: MambaConfig, device, dtype) -> torch.nn.Module:
    """The model with parameters on the meta device (no memory, no init), built with the official dtype rules."""
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        # Non-persistent buffers (e.g. rotary tables) are computed at construction and not in checkpoints.
        model = cls(config, device=device, dtype=dtype)
    return model


def _read_tensors(model, weights: CheckpointWeights, config: MambaConfig, device, dtype,
                  check_finite: bool) -> dict[str, torch.Tensor]:
    """Each checkpoint tensor converted as mamba_ssm does (cast to ``dtype``, then into the parameter's dtype,
    which the module's constructor chose) and moved to ``device``, one tensor at a time."""
    target = model.state_dict()
    out, bad = {}, []
    device = torch.device(device) if device is not None else torch.device("cpu")
    for name, ref in target.items():
        if name not in weights or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        src = weights.load(name)
        t = src.to(dtype) if dtype is not None and src.is_floating_point() else src
        t = t.to(device=device, dtype=ref.dtype)
        if t.device.type == "cpu" and src.device.type == "cpu" and t.untyped_storage().data_ptr() == \
                src.untyped_storage().data_ptr():
            t = t.clone()  # own the memory: never keep the checkpoint file mapped into the model
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
        out[name] = t
    if bad:
        cast = f" (or they overflow {dtype})" if dtype is not None else ""
        raise ValueError(f"checkpoint weights contain NaN or Inf{cast}: {_some(sorted(bad, key=_natural))}; the file "
                         "is damaged or training diverged. Pass check_finite=False to load it anyway")
    if config.tie_embeddings and "lm_head.weight" in target:
        emb = "backbone.embedding.weight"
        if "lm_head.weight" in weights and not torch.equal(weights.load("lm_head.weight"), weights.load(emb)):
            raise ValueError("config says tie_embeddings=True but the checkpoint's lm_head.weight differs from "
                             f"{emb}; load with tie_embeddings=False to keep them separate")
        out["lm_head.weight"] = out[emb]
    return out


def load_pretrained(cls, name: str | os.PathLike | None = None, device=None, dtype=None, **kwargs):
    """Load ``cls`` (MambaLMHeadModel or a subclass) from a checkpoint directory, a Hub id, or None/"default".

    kwargs: config fields to override (e.g. ``n_layer=12``), ``revision``/``cache_dir``/``local_files_only`` for
    Hub ids, ``check_finite=True`` (refuse NaN/Inf weights). ``dtype`` follows mamba_ssm: tensors are cast to it
    and the model is built with it (Mamba-1 keeps A_log and D as fp32 parameters, as the official module does).
    """
    hub_kw = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    check_finite = kwargs.pop("check_finite", True)
    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"from_pretrained got unknown arguments {unknown}: it takes device, dtype, "
                        f"{', '.join(_HUB_KWARGS)}, check_finite and MambaConfig fields to override: {sorted(fields)}")
    directory = resolve_checkpoint(name, **hub_kw)
    return _load_directory(cls, directory, kwargs, device, dtype, check_finite)


def _load_directory(cls, directory: Path, overrides: dict, device, dtype, check_finite: bool,
                    keep_file_dtype: bool = False):
    """The model of a local checkpoint directory. keep_file_dtype (for conversions, with dtype=None): build the
    model in the dtype of the stored embedding and cast each tensor straight to its parameter's dtype, so that
    nothing is rounded on the way."""
    data, layout = read_config(directory)
    data.update(overrides)
    where = f"{directory / CONFIG_FILE}" + (f" with overrides {sorted(overrides)}" if overrides else "")
    try:
        config = MambaConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    weights = open_weights(directory)
    _normalise_names(weights, layout)
    build_dtype = weights.dtypes.get("backbone.embedding.weight") if keep_file_dtype and dtype is None else dtype
    model = _build_empty(cls, config, device, build_dtype)
    _check_weights(model, weights, config, where)
    tensors = _read_tensors(model, weights, config, device, dtype, check_finite)
    # load_state_dict(assign=True) swaps in new Parameter objects: keep the markers set on the originals
    # (_no_weight_decay, _no_reinit, ...), which optimizers and inits read.
    markers = {n: dict(p.__dict__) for n, p in model.named_parameters(remove_duplicate=False) if p.__dict__}
    model.load_state_dict(tensors, strict=True, assign=True)
    for n, extra in markers.items():
        model.get_parameter(n).__dict__.update(extra)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def load_config(name: str | os.PathLike | None = None, **hub_kw) -> MambaConfig:
    """The MambaConfig of a checkpoint (either layout), without reading weights."""
    data, _ = read_config(resolve_checkpoint(name, **hub_kw))
    return MambaConfig.from_dict(data)


# ---- saving ----------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (also KB/MB, KiB/MiB/GiB, plain bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size={size!r} is not a size such as '5GB', '500MB' or 1000000")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def check_destination(directory: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """The checkpoint files already in ``directory``; raises FileExistsError if there are any and not overwrite.

    Only checkpoint files count (config.json, weights, indices): other files (notes, a tokenizer) are kept.
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    existing = sorted(p.name for p in directory.iterdir() if _CHECKPOINT_FILE.fullmatch(p.name)) \
        if directory.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint ({_some(existing, 5)}); saving would "
                              "overwrite it. Pass overwrite=True (mambakit convert: --overwrite) to replace it, or "
                              "choose another directory")
    return existing


def _prepare_directory(directory: Path, overwrite: bool) -> None:
    """Create the directory; with overwrite, drop the old checkpoint's weight files first (a left-over shard
    would otherwise be mixed into the new checkpoint)."""
    existing = check_destination(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (directory / name).unlink()


def _shard_plan(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current] if current else shards


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _full_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """(the full state dict, whether lm_head shares the embedding's weight). A tensor-parallel model
    (mambakit.distributed.parallelize) has its shards gathered: a collective, every rank of its group calls it."""
    if getattr(model, "tensor_parallel_group", None) is not None:
        from .distributed import gather_state_dict

        shared = getattr(model, "lm_head").weight is model.get_submodule("backbone.embedding").weight
        return gather_state_dict(model, device="cpu"), shared
    state = dict(model.state_dict())
    head, emb = state.get("lm_head.weight"), state.get("backbone.embedding.weight")
    return state, head is not None and emb is not None and head.data_ptr() == emb.data_ptr()


def _state_for_saving(model: torch.nn.Module, layout: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict in the layout's key names without a tied lm_head, whether the head was tied)."""
    state, shared = _full_state(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False) and shared)
    if tied:
        del state["lm_head.weight"]  # tied: the embedding is the head (official and transformers loaders re-tie)
    if layout == "transformers":
        state = {to_transformers_key(k): v for k, v in state.items()}
    return state, tied


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True,
                    max_shard_size: int | str = "5GB", overwrite: bool = False,
                    layout: str = "state-spaces") -> Path:
    """Write config.json and the weights (safetensors, or pytorch_model.bin when safe_serialization=False).

    layout: 'state-spaces' (mamba_ssm's config.json and key names; mamba_ssm's own from_pretrained reads only an
    unsharded pytorch_model.bin, so save with safe_serialization=False for it) or 'transformers' (loads with
    transformers.AutoModelForCausalLM). Weights above max_shard_size are split into shards with an
    index file. A tied lm_head is not stored twice. An existing checkpoint in the directory is only replaced
    with overwrite=True. Returns the directory.

    A tensor-parallel model (``mambakit.distributed.parallelize``) saves the full official checkpoint: every
    rank of its group must call this (the shards are gathered); rank 0 writes, and every rank returns once
    the files are complete.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = getattr(model, "config", None)
    if not isinstance(config, MambaConfig):
        raise TypeError(f"save_pretrained needs a model with a MambaConfig .config, got {type(model).__name__}")
    directory = Path(save_directory).expanduser()
    tp_group = getattr(model, "tensor_parallel_group", None)
    if tp_group is None:
        return _write_checkpoint(model, config, directory, safe_serialization, max_shard_size, overwrite, layout)
    import torch.distributed as dist

    check_destination(directory, overwrite)  # on every rank before the collective, so an error raises everywhere
    parse_size(max_shard_size)
    state = _state_for_saving(model, layout)  # gathered on every rank (a collective)
    try:
        if dist.get_rank(tp_group) == 0:
            _write_checkpoint(model, config, directory, safe_serialization, max_shard_size, overwrite, layout,
                              state=state)
    finally:
        dist.barrier(group=tp_group)  # nobody reads the checkpoint before rank 0 has finished it
    return directory


def _write_checkpoint(model, config: MambaConfig, directory: Path, safe_serialization: bool, max_shard_size,
                      overwrite: bool, layout: str, state=None) -> Path:
    """save_pretrained's writing part; ``state``: _state_for_saving's result when already computed."""
    state, tied = state if state is not None else _state_for_saving(model, layout)
    first = next(iter(state.values()))
    config_dict = config.to_dict() if layout == "state-spaces" else config_to_transformers(config, first.dtype)
    max_bytes = parse_size(max_shard_size)
    _prepare_directory(directory, overwrite)

    plan = _shard_plan(state, max_bytes)
    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if len(plan) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}" for i in range(len(plan))]
    weight_map = {}
    for keys, fname in zip(plan, names):
        # One shard at a time on the CPU, so a GPU model is never copied to host memory in full.
        shard = {k: state[k].detach().to("cpu").contiguous() for k in keys}
        if tied and not safe_serialization and len(plan) == 1:
            # mamba_ssm's loader is strict and wants the tied head's key; torch.save stores the shared tensor once
            shard["lm_head.weight"] = shard[to_transformers_key("backbone.embedding.weight")
                                            if layout == "transformers" else "backbone.embedding.weight"]
        if safe_serialization:
            from safetensors.torch import save_file

            _write_atomic(directory / fname, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        else:
            _write_atomic(directory / fname, lambda p, s=shard: torch.save(s, p))
        weight_map.update(dict.fromkeys(keys, fname))
    if len(plan) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / (SAFE_INDEX if safe_serialization else BIN_INDEX), index)
    _write_json(directory / CONFIG_FILE, config_dict)  # last: a config.json marks a complete checkpoint
    return directory


def _write_json(path: Path, data: dict) -> None:
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _write_atomic(path, write)


# ---- mambakit convert ------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(src: str, dst: str, to: str, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
            overwrite: bool = False, **hub_kw) -> Path:
    """Re-write checkpoint ``src`` (either layout, directory or Hub id) at ``dst`` in layout ``to``; tokenizer
    files found next to the source are copied along."""
    from .models.lm import MambaLMHeadModel

    check_destination(dst, overwrite)  # before the (possibly long) load
    source = resolve_checkpoint(src, **hub_kw)
    model = _load_directory(MambaLMHeadModel, source, {}, "cpu", dtype, check_finite=True, keep_file_dtype=True)
    out = save_pretrained(model, dst, max_shard_size=max_shard_size, overwrite=overwrite, layout=to)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (overwrite or not (out / name).exists()):
            shutil.copyfile(source / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mambakit convert",
        description="Convert a Mamba checkpoint between the state-spaces layout (mamba_ssm, mambakit) and the "
                    "transformers layout (MambaForCausalLM / Mamba2ForCausalLM). Weights are written as "
                    "safetensors; .bin sources are read with torch.load(weights_only=True).")
    parser.add_argument("src", help="source checkpoint: a directory (either layout) or a Hugging Face Hub id")
    parser.add_argument("dst", help="directory to write; must not already hold a checkpoint unless --overwrite")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="layout to write")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="cast the weights to this dtype (default: keep the dtype the source stores)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split the weights into shards no larger than this (e.g. 2GB, 500MB; default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in dst")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of src")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory for Hub ids")
    parser.add_argument("--local-files-only", action="store_true",
                        help="never download; use only the local Hugging Face cache (also: HF_HUB_OFFLINE=1)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, dtype=_DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, revision=args.revision, cache_dir=args.cache_dir,
                      local_files_only=args.local_files_only)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"mambakit convert: error: {e}", file=sys.stderr)
        return 1
    hint = ("transformers.AutoModelForCausalLM.from_pretrained" if args.to == "transformers"
            else "mambakit.MambaLMHeadModel.from_pretrained")
    print(f"wrote {out} ({args.to} layout); load it with {hint}({str(out)!r})")
    return 0
