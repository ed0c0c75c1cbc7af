"""Collectives with autograd, over torch.distributed process groups.

Every call goes through ``torch.distributed.<collective>`` looked up at call time, so a benchmark can
count bytes by wrapping those functions (``benchmarks/bench_parallel.py``). A group of one rank is a
no-op, so the same modules run unsplit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _AllReduce(torch.autograd.Function):
    """Sum over the group; the gradient of a replicated sum is the incoming gradient, unchanged
    (every rank's downstream computation is identical; Megatron's ``g`` operator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (tensor-parallel partial sums)."""
    return x if _size(group) == 1 else _AllReduce.apply(x, group)


def _inference_only(x: torch.Tensor, what: str) -> None:
    if x.requires_grad:
        raise RuntimeError(f"{what} has no backward: tensor-parallel layers and tokens='replicated' expert "
                           "parallelism are for inference; train with parallelize(..., tokens='sharded') and tp=1")


def all_gather_last(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate each rank's ``x`` along the last dim (vocab-parallel logits; inference only)."""
    n = _size(group)
    if n == 1:
        return x
    _inference_only(x, "the vocab-parallel logits gather")
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def all_gather_rows(x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate each rank's rows (rank r contributes counts[r] rows); inference only."""
    if _size(group) == 1:
        return x
    _inference_only(x, "the expert-parallel token gather")
    width = x.shape[1:]
    parts = [x.new_empty((c, *width)) for c in counts]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _AllToAll(torch.autograd.Function):
    """Rows split by destination rank; the backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup):  # noqa: ANN001, ANN205
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank r; returns the rows received, by source rank."""
    return _AllToAll.apply(x, send, recv, group)


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """counts [ranks, ...] (what this rank sends to each) -> [ranks, ...] (what each rank sends here)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
