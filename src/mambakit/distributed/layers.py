"""Tensor-parallel building blocks: how a parameter is split (ShardSpec) and the parallel linear/embedding layers.

A fused projection such as Mamba-2's in_proj stacks several segments ([z, x, B, C, dt]); splitting the whole
matrix in ``world`` contiguous pieces would hand rank 0 all of z and none of dt. So each parameter carries a
ShardSpec: the dim it is split along and the full sizes of its segments; rank r keeps the r-th 1/world of
*every* segment, concatenated in the same order. The same spec reassembles the full tensor (``unshard``), so
a sharded model saves back to the official layout.

Specs live on the module that owns the parameter, in ``module._tp_specs[param_name]``; parameters without a
spec are replicated (norm weights, output biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..ops import RMSNormGated
from ..ops._dtypes import compute_dtype
from .comm import copy_to_group, gather_last_dim, reduce_from_group, sum_over_sharers, sum_over_sharers_autograd


@dataclass(frozen=True)
class ShardSpec:
    """Split along ``dim``; ``sizes`` are the full sizes of the consecutive segments along that dim.

    ``pieces`` (one entry per segment, None = the world size): segment i is cut into pieces[i] equal pieces
    and rank r holds piece ``r // (world // pieces[i])``. With fewer pieces than ranks a piece is *replicated*
    on world // pieces[i] consecutive ranks (Mamba-2's B/C when ngroups < world: the ranks holding the heads
    of one group all hold that group's B/C).
    """

    dim: int
    sizes: tuple[int, ...]
    pieces: tuple[int | None, ...] | None = None

    def pieces_for(self, world: int) -> list[int]:
        return [world if p is None else p for p in (self.pieces or (None,) * len(self.sizes))]

    def check(self, world: int, what: str) -> None:
        bad = [(s, p) for s, p in zip(self.sizes, self.pieces_for(world)) if s % p or world % p]
        if bad:
            raise ValueError(f"{what}: segment sizes {list(self.sizes)} must all be divisible by the tensor-parallel "
                             f"world size {world} (not: {[s for s, _ in bad]})")

    def local_sizes(self, world: int) -> list[int]:
        """Sizes of this rank's part of each segment (the same on every rank)."""
        return [s // p for s, p in zip(self.sizes, self.pieces_for(world))]

    def replicated_ranges(self, rank: int, world: int) -> list[tuple[int, int, int, int]]:
        """(start, length, slot, nslots) along ``dim`` of the local tensor for each run of replicated segments
        (pieces < world); slot = the piece this rank holds, nslots = the number of pieces. Adjacent segments
        with the same pieces merge into one run (B and C: one all-reduce)."""
        runs, start = [], 0
        for n, p in zip(self.local_sizes(world), self.pieces_for(world)):
            if p < world and n:
                slot = rank // (world // p)
                if runs and runs[-1][0] + runs[-1][1] == start and runs[-1][2:] == (slot, p):
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, slot, p)
                else:
                    runs.append((start, n, slot, p))
            start += n
        return runs

    def shard(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s part of ``full``: its piece of every segment, concatenated."""
        segments = full.split(list(self.sizes), dim=self.dim)
        return torch.cat([s.narrow(self.dim, (rank // (world // p)) * n, n)
                          for s, n, p in zip(segments, self.local_sizes(world), self.pieces_for(world))],
                         dim=self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``shard``: shards[r] is rank r's part (a replicated piece is taken from its first rank)."""
        world = len(shards)
        local = self.local_sizes(world)
        per_rank = [t.split(local, dim=self.dim) for t in shards]
        return torch.cat([per_rank[j * (world // p)][i] for i, p in enumerate(self.pieces_for(world))
                          for j in range(p)], dim=self.dim)


def group_rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def set_sharded_param(module: nn.Module, name: str, full: torch.Tensor, spec: ShardSpec | None, group) -> None:
    """Give ``module.<name>`` this rank's shard of ``full`` (a copy, so the full tensor can be freed) and record
    the spec; ``spec=None`` keeps the full tensor (replicated). Flags such as ``_no_weight_decay`` carry over."""
    rank, world = group_rank_world(group)
    data = full.detach().clone() if spec is None else spec.shard(full.detach(), rank, world)  # shard: a new tensor
    param = nn.Parameter(data, requires_grad=full.requires_grad)
    for flag in ("_no_weight_decay", "_no_reinit"):
        if hasattr(full, flag):
            setattr(param, flag, getattr(full, flag))
    setattr(module, name, param)
    if spec is not None:
        if not hasattr(module, "_tp_specs"):
            module._tp_specs = {}
        module._tp_specs[name] = spec
        _sum_replicated_grads(param, spec, rank, world, group)


def _sum_replicated_grads(param: nn.Parameter, spec: ShardSpec, rank: int, world: int, group) -> None:
    """Replicated slices (e.g. B/C rows of in_proj with ngroups < world) get only the gradient of this rank's
    heads: sum it over the ranks sharing the slice, so they end up with the full, identical gradient.

    The activations need no all-reduce: the partial gradients of the hidden states already add up through the
    column-parallel input's all-reduce (summing full B/C gradients there would count them world // ngroups
    times). A tensor hook, so it also covers the uses of a parameter outside its module's forward (Mamba2
    reads conv1d.weight directly)."""
    runs = spec.replicated_ranges(rank, world)
    if not runs or not param.requires_grad:
        return

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        for start, length, slot, nslots in runs:
            part = grad.narrow(spec.dim, start, length)
            part.copy_(sum_over_sharers(part, slot, nslots, group))
        return grad

    param.register_hook(hook)


def _empty_linear(cls, in_features: int, out_features: int, group):
    """A ``cls`` (an nn.Linear subclass) without parameters yet: running nn.Linear.__init__ would draw a random
    init only to overwrite it (and on the meta device it drags in torch._dynamo, seconds of import)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features, layer.process_group = in_features, out_features, group
    layer.register_parameter("bias", None)
    return layer


class ColumnParallelLinear(nn.Linear):
    """y_local = x @ W_local^T + b_local: this rank's output features (rows of W). x is replicated.

    forward: x (..., in_features) -> (..., local out_features)."""

    process_group = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: ShardSpec, group) -> "ColumnParallelLinear":
        spec.check(dist.get_world_size(group), "ColumnParallelLinear output features")
        layer = _empty_linear(cls, linear.in_features, sum(spec.local_sizes(dist.get_world_size(group))), group)
        set_sharded_param(layer, "weight", linear.weight, spec, group)
        if linear.bias is not None:
            set_sharded_param(layer, "bias", linear.bias, spec, group)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.process_group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: this rank holds the input features (columns of W) matching
    its local activations; the bias is replicated and added once, after the sum.

    forward: x (..., local in_features) -> (..., out_features)."""

    process_group = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: ShardSpec, group) -> "RowParallelLinear":
        world = dist.get_world_size(group)
        layer = _empty_linear(cls, linear.in_features // world, linear.out_features, group)
        set_sharded_param(layer, "weight", linear.weight, spec, group)
        if linear.bias is not None:
            set_sharded_param(layer, "bias", linear.bias, None, group)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.process_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_end) of the embedding; other ids give zeros here and the all-reduce fills them in.

    forward: input_ids (batch, seqlen) -> (batch, seqlen, embedding_dim), replicated."""

    process_group = None
    vocab_start = vocab_end = 0

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group) -> "VocabParallelEmbedding":
        rank, world = group_rank_world(group)
        n = emb.num_embeddings
        spec = ShardSpec(0, (n,))
        spec.check(world, "embedding rows (padded vocabulary)")
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
            raise ValueError("VocabParallelEmbedding: padding_idx, max_norm and sparse embeddings are not supported")
        layer = cls.__new__(cls)  # no nn.Embedding.__init__: it would draw a random init only to overwrite it
        nn.Module.__init__(layer)
        layer.num_embeddings, layer.embedding_dim = n // world, emb.embedding_dim
        layer.padding_idx, layer.max_norm, layer.norm_type = None, None, emb.norm_type
        layer.scale_grad_by_freq, layer.sparse = emb.scale_grad_by_freq, False
        layer.process_group = group
        layer.vocab_start, layer.vocab_end = rank * (n // world), (rank + 1) * (n // world)
        set_sharded_param(layer, "weight", emb.weight, spec, group)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.process_group)


class ParallelLMHead(nn.Linear):
    """Logits of this rank's vocabulary slice, all-gathered so every rank returns the full (..., vocab) logits
    (identical on all ranks, so sampling with the same seed picks the same tokens everywhere).

    forward: hidden (..., d_model) -> logits (..., vocab)."""

    process_group = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, tied_weight: nn.Parameter | None = None) -> "ParallelLMHead":
        if linear.bias is not None:
            raise ValueError("ParallelLMHead: an lm_head with a bias is not supported")
        world = dist.get_world_size(group)
        spec = ShardSpec(0, (linear.out_features,))
        spec.check(world, "lm_head rows (padded vocabulary)")
        layer = _empty_linear(cls, linear.in_features, linear.out_features // world, group)
        if tied_weight is not None:
            layer.weight = tied_weight  # shares the embedding's shard (same rows, same spec)
            layer._tp_specs = {"weight": spec}
        else:
            set_sharded_param(layer, "weight", linear.weight, spec, group)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(copy_to_group(x, self.process_group), self.weight)  # (..., vocab / world)
        return gather_last_dim(logits, self.process_group)


class GroupSpanningRMSNormGated(RMSNormGated):
    """Mamba-2's gated RMSNorm when one group's channels lie on several ranks (ngroups < world): each rank
    holds ``group_size / (world // ngroups)`` channels of group ``slot``; the group's sum of squares is
    all-reduced over the ranks sharing it (a (..., 1) tensor per token, small next to out_proj's all-reduce).

    forward: x, z (..., local hidden) -> (..., local hidden) in x's dtype. Plain PyTorch ops (autograd gives
    the gradients; the all-reduce is summed back in backward)."""

    def __init__(self, full: RMSNormGated, weight_spec: ShardSpec, slot: int, nslots: int, group):
        super().__init__(sum(weight_spec.local_sizes(dist.get_world_size(group))), eps=full.eps,
                         group_size=full.group_size, norm_before_gate=full.norm_before_gate,
                         device=full.weight.device, dtype=full.weight.dtype)
        self.slot, self.nslots, self.process_group = slot, nslots, group
        set_sharded_param(self, "weight", full.weight, weight_spec, group)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cdt = compute_dtype(x)
        v = x.to(cdt)
        gate = F.silu(z.to(cdt)) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            v = v * gate
        sumsq = sum_over_sharers_autograd(v.square().sum(-1, keepdim=True), self.slot, self.nslots,
                                          self.process_group)  # (..., 1): the whole group's sum of squares
        y = v * torch.rsqrt(sumsq / self.group_size + self.eps) * self.weight.to(cdt)
        if gate is not None and self.norm_before_gate:
            y = y * gate
        return y.to(x.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", group slot {self.slot} of {self.nslots} (spans ranks)"
