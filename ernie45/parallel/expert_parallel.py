"""Expert parallelism: each ep rank holds E / ep routed experts of every MoE layer; token-expert pairs
travel to the rank that owns their expert with ``all_to_all_single`` and come back the same way.

The router (and its correction bias) stays replicated, so every rank picks the same experts for a token.
Two token layouts:

- ``replicated`` (inference): every rank holds all T tokens (they come out of replicated or tensor-
  parallel attention). Rank r routes only its chunk T/ep of them, so each expert runs once per pair;
  the combined chunks are all-gathered back to all T rows.
- ``sharded`` (training): each rank holds its own micro-batch (ep ranks are data-parallel ranks for the
  dense weights). Dispatch and combine are differentiable: the backward sends gradients back along the
  same splits, so each expert's gradient sums the contributions of every rank's tokens.

With tp > 1 as well, each expert's width I is split over the tp ranks (gate/up rows, down columns) and
the partial outputs are summed by one all-reduce over tp.

Shape suffixes: T tokens, H hidden, K top-k, E experts, El local experts, S token-expert pairs sent,
R pairs received.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from ernie45.model.model import ErnieForCausalLM
from ernie45.model.moe import Experts
from ernie45.parallel import comm
from ernie45.parallel.shard import ShardSpec, shard_param

TokenLayout = Literal["replicated", "sharded"]


class ParallelExperts(Experts):
    """Experts [expert_start, expert_start + El) of E, each holding I / tp of its width."""

    ep_group: dist.ProcessGroup | None
    tp_group: dist.ProcessGroup | None
    ep: int
    ep_rank: int
    expert_start: int
    global_experts: int
    tokens: TokenLayout

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Same contract as ``Experts.forward`` (global expert ids in ``idx_TK``); returns [T, H]."""
        if self.ep == 1:
            y_TH = super().forward(x_TH, idx_TK, w_TK)
        elif self.tokens == "replicated":
            t = x_TH.shape[0]
            chunk = -(-t // self.ep)  # ceil: equal-size pieces for all_gather, the last may hold fewer rows
            lo, hi = min(t, self.ep_rank * chunk), min(t, (self.ep_rank + 1) * chunk)
            y_CH = self._dispatch_combine(x_TH[lo:hi], idx_TK[lo:hi], w_TK[lo:hi])
            pad = x_TH.new_zeros((chunk - (hi - lo), x_TH.shape[1]))
            y_TH = comm.all_gather_rows(torch.cat([y_CH, pad]), [chunk] * self.ep, self.ep_group)[:t]
        else:
            y_TH = self._dispatch_combine(x_TH, idx_TK, w_TK)
        return comm.all_reduce(y_TH, self.tp_group)  # tp partial sums of the expert widths

    def _dispatch_combine(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        k, el, ep = idx_TK.shape[1], self.num_experts, self.ep
        flat_S = idx_TK.reshape(-1)
        order_S = flat_S.argsort(stable=True)  # by global expert, hence by owning rank
        token_S = order_S // k
        counts_send = torch.bincount(flat_S, minlength=self.global_experts).view(ep, el)  # [ep, El]
        counts_recv = comm.exchange_counts(counts_send, self.ep_group)  # [ep, El]: from each source rank
        send, recv = counts_send.sum(1).tolist(), counts_recv.sum(1).tolist()
        x_RH = comm.all_to_all(x_TH[token_S], send, recv, self.ep_group)  # by (source rank, local expert)
        local_R = torch.repeat_interleave(torch.arange(el, device=x_TH.device).repeat(ep), counts_recv.reshape(-1))
        by_expert_R = local_R.argsort(stable=True)
        pieces, start = [], 0
        x_sorted = x_RH[by_expert_R]
        for e, n in enumerate(counts_recv.sum(0).tolist()):
            if n:
                pieces.append(self.expert_forward(e, x_sorted[start:start + n]))
                start += n
        y_sorted = torch.cat(pieces) if pieces else x_RH[:0]
        y_RH = y_sorted[by_expert_R.argsort()]  # back to arrival order
        y_SH = comm.all_to_all(y_RH, recv, send, self.ep_group)  # back in this rank's order_S
        y_SH = y_SH * w_TK.reshape(-1)[order_S, None]
        # Pairs are in ascending global expert order per token, as Experts.forward sums them.
        return torch.zeros_like(x_TH).index_add(0, token_S, y_SH)


def parallelize_experts(experts: Experts, ep_rank: int, ep: int, ep_group: dist.ProcessGroup | None,
                        tp_rank: int, tp: int, tp_group: dist.ProcessGroup | None, tokens: TokenLayout) -> None:
    """Keep this rank's experts (by ep) and width slice (by tp) of ``experts``, in place."""
    e = experts.num_experts
    gu = ShardSpec.split(tuple(experts.gate_up_proj.shape), 0, ep_rank, ep)
    down = ShardSpec.split(tuple(experts.down_proj.shape), 0, ep_rank, ep)
    if tp > 1:
        gu = gu.then(1, tp_rank, tp, halves=True)  # the same rows of gate and of up
        down = down.then(2, tp_rank, tp)
    shard_param(experts, "gate_up_proj", gu)
    shard_param(experts, "down_proj", down)
    experts.__class__ = ParallelExperts
    experts.num_experts = e // ep
    experts.width = experts.width // tp
    experts.global_experts = e
    experts.expert_start = ep_rank * (e // ep)
    experts.ep, experts.ep_rank, experts.ep_group = ep, ep_rank, ep_group if ep > 1 else None
    experts.tp_group = tp_group if tp > 1 else None
    experts.tokens = tokens


def apply_ep(model: ErnieForCausalLM, ep_rank: int, ep: int, ep_group: dist.ProcessGroup | None,
             tp_rank: int = 0, tp: int = 1, tp_group: dist.ProcessGroup | None = None,
             tokens: TokenLayout = "replicated") -> ErnieForCausalLM:
    """Shard the routed experts of every MoE layer over ep (and their widths over tp), in place."""
    if tokens not in ("replicated", "sharded"):
        raise ValueError(f"tokens={tokens!r}: use 'replicated' (inference) or 'sharded' (training)")
    if ep == 1 and tp == 1:
        return model
    for layer in model.model.layers:
        if layer.is_moe:
            parallelize_experts(layer.mlp.experts, ep_rank, ep, ep_group, tp_rank, tp, tp_group, tokens)
    return model


def is_expert_param(name: str) -> bool:
    """Parameters sharded by ep (their gradients are not averaged over the ep ranks)."""
    return name.startswith("mlp.experts.") or ".mlp.experts." in name
