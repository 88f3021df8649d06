"""Differentiable collectives for tensor parallelism (Megatron-LM's f / g operators, Shoeybi et al. 2019).

- ``copy_to_group``: identity forward, all-reduce of the gradient backward (in front of a column-parallel layer,
  whose input is replicated but whose gradient is a sum of per-rank parts).
- ``reduce_from_group``: all-reduce forward, identity backward (after a row-parallel layer).
- ``gather_last_dim``: all-gather along the last dim forward, this rank's slice backward (vocab-parallel logits).

Each works on any backend (NCCL on GPU, Gloo on CPU) and does nothing when the group has one rank. None of them
syncs with the host, so a decode step built from them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)  # in place on a fresh activation; nothing saved it for backward
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.chunk(_world(ctx.group), dim=-1)[rank].contiguous(), None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity; the backward pass all-reduces the gradient over ``group``."""
    return x if _world(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (gradient passes through unchanged)."""
    return x if _world(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """x (..., n) on each rank -> (..., world * n), rank r's part at [r * n, (r + 1) * n)."""
    return x if _world(group) == 1 else _GatherLastDim.apply(x, group)
