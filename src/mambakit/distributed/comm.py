"""Differentiable collectives for tensor parallelism (Megatron-LM's f / g operators, Shoeybi et al. 2019).

- ``copy_to_group``: identity forward, all-reduce of the gradient backward (in front of a column-parallel layer,
  whose input is replicated but whose gradient is a sum of per-rank parts).
- ``reduce_from_group``: all-reduce forward, identity backward (after a row-parallel layer).
- ``gather_last_dim``: all-gather along the last dim forward, this rank's slice backward (vocab-parallel logits).
- ``sum_over_sharers`` / ``sum_over_sharers_autograd``: sum over the ranks that share a slot (e.g. the ranks
  holding the heads of one B/C group), through one all-reduce of the whole group; the autograd version sums the
  gradient the same way (each rank's output feeds different downstream channels, unlike reduce_from_group).

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


def sum_over_sharers(x: torch.Tensor, slot: int, nslots: int, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` with the same ``slot`` (ranks are split into ``nslots`` slots).

    One all-reduce of the whole group on a (nslots, *x.shape) buffer that holds x at row ``slot`` and zeros
    elsewhere: no sub-groups, whose creation would be a collective over the default group (and break when
    several tensor-parallel groups exist). With nslots == 1 it is a plain all-reduce. Returns a new tensor.
    """
    if _world(group) == 1:
        return x.clone()
    if nslots == 1:
        out = x.detach().contiguous().clone()
        dist.all_reduce(out, group=group)
        return out
    buf = x.new_zeros((nslots, *x.shape))
    buf[slot] = x.detach()
    dist.all_reduce(buf, group=group)
    return buf[slot]


class _SumOverSharers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot, nslots, group):
        ctx.args = (slot, nslots, group)
        return sum_over_sharers(x, slot, nslots, group)

    @staticmethod
    def backward(ctx, grad):
        # y_r = sum of x_s over sharers s, and every sharer's y feeds its own channels: dx_r = sum of dy_s.
        return sum_over_sharers(grad, *ctx.args), None, None, None


def sum_over_sharers_autograd(x: torch.Tensor, slot: int, nslots: int, group) -> torch.Tensor:
    """``sum_over_sharers`` that also sums the gradient over the same ranks in backward."""
    return x if _world(group) == 1 else _SumOverSharers.apply(x, slot, nslots, group)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity; the backward pass all-reduces the gradient over ``group``."""
    return x if _world(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (gradient passes through unchanged)."""
    return x if _world(group) == 1 else _ReduceFromGroup.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """x (..., n) on each rank -> (..., world * n), rank r's part at [r * n, (r + 1) * n)."""
    return x if _world(group) == 1 else _GatherLastDim.apply(x, group)
