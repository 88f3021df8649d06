"""Tensor parallelism for Mamba-2 language models (and the attention layers of hybrids) on torch.distributed.

Each rank keeps whole Mamba-2 heads and B/C groups (Megatron-style split, Shoeybi et al. 2019; the Mamba-2
paper, Sec. 8, explains why the SSD layer needs only one all-reduce per layer):

- in_proj rows [z0, x0, z, x, B, C, dt]: column-parallel, z/x/dt by heads, B/C by groups, z0/x0 (the optional
  MLP part) evenly; conv1d channels [x, B, C] the same way; dt_bias, A_log, D and the gated RMSNorm weight by
  heads (the norm is per group, so with whole groups per rank it needs no communication);
- ngroups < world (the released checkpoints have ngroups = 1): heads still split, B/C (in_proj rows and conv
  channels) are replicated on the ranks sharing a group, their gradients summed over those ranks, and the
  gated RMSNorm all-reduces its sum of squares over them;
- out_proj: row-parallel, one all-reduce of the (batch, seqlen, d_model) output;
- attention layers: q by heads, k/v by KV heads (conv1d likewise), out_proj row-parallel; gated MLPs: fc1
  column-parallel, fc2 row-parallel;
- embedding and lm_head: split over the (padded) vocabulary; the logits are all-gathered so every rank
  returns the full logits.

Usage, under ``torchrun --nproc-per-node N``::

    env = setup_from_env()                                   # process group from torchrun's variables
    model = MambaLMHeadModel.from_pretrained(name, dtype=torch.bfloat16)   # full model on every rank
    parallelize(model, env.group).to(env.device)             # in place: each rank keeps 1/N
    logits = model(input_ids.to(env.device)).logits          # same full logits on every rank
    full = gather_state_dict(model)                          # official state dict (collective call)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..modules.attention import MHA
from ..modules.block import GatedMLP
from ..modules.mamba2 import Mamba2
from ..ops import RMSNormGated
from .layers import (ColumnParallelLinear, GroupSpanningRMSNormGated, ParallelLMHead, RowParallelLinear, ShardSpec,
                     VocabParallelEmbedding, group_rank_world, set_sharded_param)

__all__ = ["TPMamba2", "TPMHA", "parallelize", "check_parallelizable", "gather_state_dict", "gather_grads",
           "load_full_state_dict", "setup_from_env", "DistEnv"]


# ---- sharded mixers --------------------------------------------------------------------------------------
def _shell(cls, full: nn.Module, group, replaced: tuple[str, ...]):
    """A ``cls`` instance with ``full``'s plain attributes and untouched submodules, without running
    ``cls.__init__`` (which would allocate full-size weights)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(full).items():
        if not key.startswith("_"):
            new.__dict__[key] = value
    for name, child in full.named_children():
        if name not in replaced:
            setattr(new, name, child)
    new.process_group = group
    return new


def _shard_conv(conv: nn.Conv1d, spec: ShardSpec, group) -> nn.Conv1d:
    """Depthwise conv keeping this rank's channels."""
    channels = sum(spec.local_sizes(dist.get_world_size(group)))
    new = nn.Conv1d(channels, channels, kernel_size=conv.kernel_size, groups=channels, padding=conv.padding,
                    bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)  # tiny
    set_sharded_param(new, "weight", conv.weight, spec, group)
    if conv.bias is not None:
        set_sharded_param(new, "bias", conv.bias, spec, group)
    return new


class TPMamba2(Mamba2):
    """Mamba2 holding this rank's heads and groups; forward/step/cache come from Mamba2 unchanged (its sizes
    are the local ones), and the row-parallel out_proj sums the ranks' outputs. Build with ``from_full``.

    ngroups < world (the released checkpoints: ngroups = 1): a rank's heads lie in one group, so it holds that
    group's B/C rows of in_proj and conv channels (replicated on the world // ngroups ranks of the group, their
    gradients summed over those ranks by a hook, see layers._sum_replicated_grads) and its gated RMSNorm
    all-reduces the group's sum of squares (GroupSpanningRMSNormGated)."""

    @classmethod
    def from_full(cls, full: Mamba2, group) -> "TPMamba2":
        rank, world = group_rank_world(group)
        d_mlp, gn = full.d_inner - full.d_ssm, full.ngroups * full.d_state
        split_groups = full.ngroups % world == 0
        bc = None if split_groups else full.ngroups  # B/C: one piece per group, replicated when ngroups < world
        new = _shell(cls, full, group, replaced=("in_proj", "conv1d", "norm", "out_proj"))
        new.nheads, new.ngroups = full.nheads // world, full.ngroups // world if split_groups else 1
        new.d_ssm, new.d_inner = full.d_ssm // world, full.d_inner // world
        new.conv_dim = new.d_ssm + 2 * new.ngroups * full.d_state
        new.in_proj = ColumnParallelLinear.from_linear(
            full.in_proj, ShardSpec(0, (d_mlp, d_mlp, full.d_ssm, full.d_ssm, gn, gn, full.nheads),
                                    (None, None, None, None, bc, bc, None)), group)
        new.conv1d = _shard_conv(full.conv1d, ShardSpec(0, (full.d_ssm, gn, gn), (None, bc, bc)), group)
        for name in ("dt_bias", "A_log", "D"):  # per head (D per channel when D_has_hdim: heads are contiguous)
            p = getattr(full, name)
            set_sharded_param(new, name, p, ShardSpec(0, (p.shape[0],)), group)
        if full.rmsnorm:
            new.norm = _shard_gated_norm(full.norm, full.ngroups, rank, world, group)
        new.out_proj = RowParallelLinear.from_linear(full.out_proj, ShardSpec(1, (d_mlp, full.d_ssm)), group)
        return new


def _shard_gated_norm(norm: RMSNormGated, ngroups: int, rank: int, world: int, group) -> RMSNormGated:
    """The gated RMSNorm over this rank's channels (split by heads, like the scan's output)."""
    spec = ShardSpec(0, (norm.weight.shape[0],))
    if ngroups % world:  # a group spans world // ngroups ranks: rank r holds part of group r // (world // ngroups)
        return GroupSpanningRMSNormGated(norm, spec, slot=rank // (world // ngroups), nslots=ngroups, group=group)
    local = RMSNormGated(norm.weight.shape[0] // world, eps=norm.eps, group_size=norm.group_size,
                         norm_before_gate=norm.norm_before_gate, device=norm.weight.device, dtype=norm.weight.dtype)
    set_sharded_param(local, "weight", norm.weight, spec, group)  # whole groups here: no communication
    return local


class TPMHA(MHA):
    """Attention holding this rank's query heads and KV heads (and 1/world of the MLP branch)."""

    @classmethod
    def from_full(cls, full: MHA, group) -> "TPMHA":
        world = dist.get_world_size(group)
        dq, dkv, half_mlp = full.num_heads * full.head_dim, full.num_heads_kv * full.head_dim, full.mlp_dim // 2
        new = _shell(cls, full, group, replaced=("in_proj", "conv1d", "out_proj"))
        new.num_heads, new.num_heads_kv = full.num_heads // world, full.num_heads_kv // world
        new.qkv_dim, new.mlp_dim = full.qkv_dim // world, full.mlp_dim // world
        new.in_proj = ColumnParallelLinear.from_linear(
            full.in_proj, ShardSpec(0, (dq, dkv, dkv, half_mlp, half_mlp)), group)
        if full.d_conv > 0:
            new.conv1d = _shard_conv(full.conv1d, ShardSpec(0, (dq, dkv, dkv)), group)
        new.out_proj = RowParallelLinear.from_linear(full.out_proj, ShardSpec(1, (dq, half_mlp)), group)
        return new


def _parallelize_mlp(mlp: GatedMLP, group) -> None:
    hidden = mlp.fc2.in_features
    mlp.fc1 = ColumnParallelLinear.from_linear(mlp.fc1, ShardSpec(0, (hidden, hidden)), group)  # [y, gate]
    mlp.fc2 = RowParallelLinear.from_linear(mlp.fc2, ShardSpec(1, (hidden,)), group)


# ---- whole model ---------------------------------------------------------------------------------------
def _layer_problems(i: int, block: nn.Module, world: int) -> list[str]:
    mixer, out = block.mixer, []
    if isinstance(mixer, (TPMamba2, TPMHA)):
        return [f"layer {i} is already tensor-parallel"]
    if isinstance(mixer, Mamba2):
        if mixer.nheads % world:
            out.append(f"layer {i}: Mamba2 nheads={mixer.nheads} is not divisible by {world} "
                       f"(each rank needs whole heads)")
        if mixer.ngroups % world and world % mixer.ngroups:
            out.append(f"layer {i}: Mamba2 ngroups={mixer.ngroups} and the world size {world} must divide one "
                       f"another (a rank holds whole groups, or part of one group whose B/C it replicates)")
        if (mixer.d_inner - mixer.d_ssm) % world:
            out.append(f"layer {i}: Mamba2 MLP part d_inner - d_ssm = {mixer.d_inner - mixer.d_ssm} is not "
                       f"divisible by {world}")
    elif isinstance(mixer, MHA):
        for name in ("num_heads", "num_heads_kv"):
            if getattr(mixer, name) % world:
                out.append(f"layer {i}: attention {name}={getattr(mixer, name)} is not divisible by {world}")
        if (mixer.mlp_dim // 2) % world:
            out.append(f"layer {i}: attention mlp_dim/2={mixer.mlp_dim // 2} is not divisible by {world}")
    else:
        out.append(f"layer {i}: {type(mixer).__name__} layers have no tensor-parallel version "
                   f"(Mamba2 and attention layers do)")
    if isinstance(block.mlp, GatedMLP) and block.mlp.fc2.in_features % world:
        out.append(f"layer {i}: MLP hidden size {block.mlp.fc2.in_features} is not divisible by {world}")
    return out


def check_parallelizable(model: nn.Module, world_size: int) -> None:
    """Raise ValueError listing every reason ``model`` cannot be split over ``world_size`` ranks."""
    if not hasattr(model, "backbone") or not hasattr(model, "lm_head"):
        raise TypeError(f"parallelize takes a MambaLMHeadModel, got {type(model).__name__}")
    problems = [p for i, block in enumerate(model.backbone.layers) for p in _layer_problems(i, block, world_size)]
    vocab = model.backbone.embedding.num_embeddings
    if vocab % world_size:
        problems.append(f"padded vocabulary {vocab} is not divisible by {world_size}; set the config's "
                        f"pad_vocab_size_multiple to a multiple of {world_size}")
    if problems:
        raise ValueError(f"cannot split the model over {world_size} ranks:\n  " + "\n  ".join(problems))


def _resolve_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: launch with `torchrun --nproc-per-node N` and "
                           "call mambakit.distributed.setup_from_env() (or dist.init_process_group) first")
    return dist.group.WORLD if group is None else group


def parallelize(model: nn.Module, process_group=None) -> nn.Module:
    """Split a full MambaLMHeadModel over the ranks of ``process_group`` (default: all), in place.

    Every rank must hold the same full weights (load the same checkpoint, or seed identically before building).
    Returns the model; its state_dict() then holds this rank's shards under the official names.
    """
    group = _resolve_group(process_group)
    _, world = group_rank_world(group)
    check_parallelizable(model, world)
    backbone = model.backbone
    for block in backbone.layers:
        tp_cls = TPMamba2 if isinstance(block.mixer, Mamba2) else TPMHA
        block.mixer = tp_cls.from_full(block.mixer, group)
        if isinstance(block.mlp, GatedMLP):
            _parallelize_mlp(block.mlp, group)
    tied = model.lm_head.weight is backbone.embedding.weight
    backbone.embedding = VocabParallelEmbedding.from_embedding(backbone.embedding, group)
    model.lm_head = ParallelLMHead.from_linear(model.lm_head, group,
                                               tied_weight=backbone.embedding.weight if tied else None)
    model.tensor_parallel_group = group
    return model


# ---- state dicts -----------------------------------------------------------------------------------------
def _model_group(model: nn.Module):
    group = getattr(model, "tensor_parallel_group", None)
    if group is None:
        raise ValueError("this model is not tensor-parallel: call parallelize(model, group) first")
    return group


def _spec_of(model: nn.Module, key: str) -> ShardSpec | None:
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    return getattr(module, "_tp_specs", {}).get(name)


def _gather(t: torch.Tensor, spec: ShardSpec | None, group) -> torch.Tensor:
    if spec is None:
        return t.detach().clone()
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return spec.unshard(parts)


def gather_state_dict(model: nn.Module, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
    """The full (official-layout) state dict of a tensor-parallel model, on every rank.

    A collective: every rank of the group must call it. ``device=None`` keeps the tensors where they are.
    """
    group = _model_group(model)
    return {k: _gather(t, _spec_of(model, k), group).to(device or t.device) for k, t in model.state_dict().items()}


def gather_grads(model: nn.Module, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor]:
    """Full gradients {parameter name: grad} of a tensor-parallel model (parameters without a grad skipped)."""
    group = _model_group(model)
    return {k: _gather(p.grad, _spec_of(model, k), group).to(device or p.grad.device)
            for k, p in model.named_parameters() if p.grad is not None}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a full (official-layout) state dict into a tensor-parallel model: each rank copies its shards.

    Returns ``load_state_dict``'s (missing_keys, unexpected_keys)."""
    group = _model_group(model)
    rank, world = group_rank_world(group)
    own = model.state_dict()
    local = {}
    for key, full in state_dict.items():
        spec = _spec_of(model, key) if key in own else None
        if spec is not None:
            if full.dim() <= spec.dim or full.shape[spec.dim] != sum(spec.sizes):
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(full.shape)}; the model expects "
                                 f"{sum(spec.sizes)} along dim {spec.dim}")
            full = spec.shard(full, rank, world)
        local[key] = full
    return model.load_state_dict(local, strict=strict)


# ---- launching ------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    """What a torchrun worker needs: the group, its rank, the world size and its device."""

    group: object
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_from_env(backend: str | None = None) -> DistEnv:
    """Initialise torch.distributed from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL and cuda:LOCAL_RANK when CUDA is available, else Gloo on the CPU."""
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise RuntimeError(f"setup_from_env needs torchrun's environment variables, {missing} not set: launch with "
                           f"`torchrun --nproc-per-node N ...`")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                               f"visible; use --nproc-per-node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), local_rank, device)
