"""The full weights of a model parallelized for training, copied into a plain (unsharded) model in place.

An inference engine beside an FSDP trainer (the rollouts of online RL) runs its own copy of the model and is
synced after each optimizer update by gathering the shards, not through a file; verl (its FSDP
``ShardingManager``) and OpenRLHF (weight broadcast to its vLLM engines) do the same. Here each rank gathers
every tensor and copies it into its own plain replica, one tensor at a time (peak: one full tensor).

Layouts gathered (``ernie45.parallel.fsdp``, ``ernie45.parallel.expert_parallel``):
- FSDP2 parameters are DTensors (Shard(0) over the data ranks): ``full_tensor()``;
- routed experts under ep are plain tensors holding this rank's E / ep experts: all-gathered over the ep
  group in ep-rank order (rank r owns experts [r E/ep, (r+1) E/ep)), the same stack on every dp replica;
- everything else (and the routers' correction bias, updated identically on every rank) is replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ernie45.parallel.expert_parallel import is_expert_param
from ernie45.parallel.mesh import ParallelMesh


def full_tensor(name: str, t: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """The global value of parameter ``name`` whose local part on this rank is ``t``. Collective: every rank
    calls it for the same names in the same order."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    if mesh.ep > 1 and is_expert_param(name):
        parts = [torch.empty_like(t) for _ in range(mesh.ep)]
        dist.all_gather(parts, t.contiguous(), group=mesh.group("ep"))
        return torch.cat(parts)
    return t


@torch.no_grad()
def copy_full_weights(dst: nn.Module, src: nn.Module, mesh: ParallelMesh) -> None:
    """``dst`` (a plain model of the same config) := the global weights of ``src`` (parallelized with
    ``parallelize(..., tokens="sharded")`` and maybe ``apply_fsdp``), in place: ``dst``'s tensors keep their
    storage, so an engine built over ``dst`` keeps its KV cache and sees the new weights. Collective."""
    params = dict(dst.named_parameters())
    names = [n for n, _ in src.named_parameters()]
    if sorted(names) != sorted(params):
        extra, missing = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise ValueError(f"copy_full_weights: the two models' parameters differ (only in the parallel model: "
                         f"{extra[:4]}; only in the plain one: {missing[:4]}); give a plain model built from the "
                         f"same config")
    for name, p in src.named_parameters():
        full = full_tensor(name, p.detach(), mesh)
        if full.shape != params[name].shape:
            raise ValueError(f"copy_full_weights: {name} gathers to {tuple(full.shape)}, the plain model's is "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(full)
    buffers = dict(dst.named_buffers())
    for name, b in src.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffers[name].copy_(b)
