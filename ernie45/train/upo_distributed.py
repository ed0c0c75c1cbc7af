"""``ernie45 train upo --config R --ep E --fsdp F`` under torchrun: UPO on the multi-rank trainer.

``DistributedUPOTrainer`` is ``DistributedTrainer`` (expert-parallel / FSDP2 model, optimizer, gradient
reduction, global clipping, DCP checkpoints, export) with ``UPOTrainer``'s step; the step itself is written
once, in ``ernie45.train.upo``, and reaches the ranks through the seams it leaves (``prompt_positions``,
``rollout_module``, ``sync_rollout``, ``_sum``, ``_gather``, ``_max``), which this class fills in.

Rollouts, in the layout verl (its FSDP ``ShardingManager``) and OpenRLHF use between a sharded trainer and an
inference engine: every rank holds a *plain, unsharded replica* of the policy and its own ``RolloutEngine``
over it. Before the first rollout after an optimizer update (and at the start and after a resume) the replica
is synced in place from the sharded trainer (``ernie45.parallel.gather.copy_full_weights``: FSDP2 shards
``full_tensor()``, expert shards all-gathered over the ep group), tensor by tensor with ``copy_``: no file,
and the engine keeps its KV cache. ``engine_logp_diff`` (engine vs trainer log-probs of the sampled tokens,
the maximum over ranks) checks the sync every step.

Prompts: the global batch is the same on every rank (one sampler seed). Rank r takes, in each of the
``updates_per_step`` minibatches, its contiguous 1/world of that minibatch's prompts (with one update per step:
its contiguous share of the batch), so minibatch m over all ranks is the single process's minibatch m. Seeds are
``rollout_seed(run seed, step, place in the global batch)``: what is sampled does not depend on the layout.
A prompt's G samples stay on one rank, so group advantages and DPO pairs are local; the loss is normalised by
the *global* loss tokens and pairs of the minibatch and multiplied by the data ranks (the gradient reduction
averages, ``ernie45.parallel.fsdp``), so a step is one process's step on the global batch. Metrics are summed
or gathered over the ranks before logging; the expert load is all-reduced before the aux-free bias update.

The reference model is a plain frozen copy on every rank, gathered from the sharded model at the start; its
forward needs no communication. It and the rollout replica each cost one full model per rank (the simple way;
shard the reference like the policy when memory matters).

Not supported (clear errors): LoRA (as ``DistributedTrainer``), ``precision: fp8`` (the replica runs the plain
modules, so the engine would not sample from the trainer's numerics), pipeline stages.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ernie45.model.checkpoint import build_empty
from ernie45.parallel.gather import copy_full_weights
from ernie45.train.distributed import DistributedTrainer
from ernie45.train.recipe import TrainConfig
from ernie45.train.upo import UPOConfig, UPOTrainer


def check_upo_split(cfg: TrainConfig, world: int) -> None:
    """Every rank needs the same number of whole prompts in each micro-batch of each minibatch."""
    u = UPOConfig.from_dict(cfg.upo)
    parts = u.updates_per_step * world * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ValueError(f"batch_size={cfg.batch_size} prompts must split evenly into upo.updates_per_step="
                         f"{u.updates_per_step} x {world} data ranks x grad_accum={cfg.grad_accum} = {parts} parts; "
                         f"use a multiple of {parts}")
    if cfg.precision == "fp8":
        raise ValueError("train upo with --ep/--fsdp does not support precision: fp8 (the rollout replica runs the "
                         "plain modules); use bf16 or fp32, or run on one process")


class DistributedUPOTrainer(DistributedTrainer, UPOTrainer):
    """UPO on dp x ep ranks (see the module docstring). Every rank constructs it."""

    def __init__(self, cfg: TrainConfig, ep: int = 1, fsdp: int = 1, tokenizer: Any = None) -> None:
        check_upo_split(cfg, fsdp if fsdp > 1 else ep)
        self._replica: nn.Module | None = None
        self._replica_fresh = False
        self.sync_s = 0.0
        super().__init__(cfg, ep=ep, fsdp=fsdp, tokenizer=tokenizer)

    # ---------------------------------------------------------------------------------- plain copies
    def _plain_copy(self) -> nn.Module:
        plain = build_empty(self.model.config, torch.float32, self.device)
        copy_full_weights(plain, self.model, self.mesh)
        return plain.train(self.model.training)

    def build_reference(self) -> nn.Module:
        """A plain frozen copy of the starting policy on every rank (gathered before any update)."""
        ref = self._plain_copy().eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def rollout_module(self) -> nn.Module:
        self._replica = self._plain_copy()
        for p in self._replica.parameters():
            p.requires_grad_(False)
        self._replica_fresh = True
        return self._replica

    def sync_rollout(self) -> None:
        if self._replica_fresh:
            self.sync_s = 0.0
            return
        t0 = time.perf_counter()
        copy_full_weights(self._replica, self.model, self.mesh)
        self._replica_fresh = True
        self.sync_s = time.perf_counter() - t0

    def optimizer_step(self) -> float:
        norm = super().optimizer_step()
        self._replica_fresh = False
        return norm

    def resume(self) -> None:
        super().resume()
        self._replica_fresh = False

    # ---------------------------------------------------------------------------------- the rank seams
    def prompt_positions(self, n: int) -> list[int]:
        per_mb = n // self.upo.updates_per_step
        q = per_mb // self.world
        return [m * per_mb + self.rank * q + j for m in range(self.upo.updates_per_step) for j in range(q)]

    def _sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _max(self, v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def train_step(self) -> dict[str, Any]:
        row = super().train_step()
        row["weight_sync_s"] = self._max(self.sync_s)
        return row
