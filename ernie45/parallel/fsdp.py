"""Data-parallel training over the dp x ep ranks: FSDP2 (``fully_shard``) for the dense weights,
expert parallelism for the routed experts, and the gradient arithmetic that makes a step equal to a
single-process step on the global batch.

Each dp x ep rank runs its own micro-batch. The loss is scaled so that *summing* the per-rank
gradients gives the gradient of the global token mean (counts may differ per rank):

    local_loss = sum(token losses on this rank) / global_tokens * data_ranks

- Dense weights: FSDP2 reduce-scatters the mean over the data ranks (or, without FSDP,
  ``sync_grads`` all-reduces the mean) -> sum / global_tokens.
- Expert weights: the all-to-all backward already summed the contributions of every rank of the ep
  group into the owning rank; ``sync_grads`` adds the other dp replicas of the same experts and divides
  by data_ranks. FSDP leaves them alone (``ignored_params``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel.expert_parallel import is_expert_param
from ernie45.parallel.mesh import MeshError, ParallelMesh


def expert_params(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    return {p for n, p in model.named_parameters() if is_expert_param(n)}


def apply_fsdp(model: ErnieForCausalLM, mesh: ParallelMesh, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> ErnieForCausalLM:
    """``fully_shard`` each decoder layer, then the root (embedding, final norm, head), over the
    dp x ep ranks. Call after ``parallelize(model, mesh, tokens="sharded")``; expert weights stay
    ep-sharded plain tensors. ``param_dtype`` (e.g. bf16) casts gathered weights for compute while the
    sharded masters and the gradient reduction stay fp32."""
    if mesh.tp > 1:
        raise MeshError("FSDP training with tp > 1 is not supported; use dp and ep")
    data = mesh.data_mesh()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = list(model.model.layers) + (list(model.model.mtp_block) if model.has_mtp else [])
    for block in blocks:
        fully_shard(block, mesh=data, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=expert_params(block) or None)
    fully_shard(model, mesh=data, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=expert_params(model) or None)
    model.fsdp = True
    return model


def data_ranks(mesh: ParallelMesh) -> int:
    return mesh.dp * mesh.ep


def global_token_count(labels: torch.Tensor, mesh: ParallelMesh, ignore_index: int = -100) -> int:
    """Valid labels over every data rank (one all-reduce)."""
    n = (labels != ignore_index).sum().to(torch.float64).reshape(1)
    dist.all_reduce(n)  # tp == 1 in training: the world is the data ranks
    return int(n.item())


def local_loss(model: ErnieForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor, total_tokens: int,
               mesh: ParallelMesh, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward, summed token loss for reporting). ``labels`` are already shifted:
    labels[b, t] is the target after input_ids[b, t]."""
    logits = model(input_ids).logits.float()
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="sum")
    return summed / total_tokens * data_ranks(mesh), summed.detach()


def sync_grads(model: ErnieForCausalLM, mesh: ParallelMesh) -> None:
    """Finish the gradient reduction FSDP does not do (see the module docstring)."""
    n = data_ranks(mesh)
    dp_group = mesh.group("dp") if mesh.dp > 1 else None
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if is_expert_param(name):
            if dp_group is not None:
                dist.all_reduce(p.grad, group=dp_group)  # the same experts on the other dp replicas
            p.grad.div_(n)
        elif not isinstance(p, DTensor) and n > 1:
            dist.all_reduce(p.grad)  # no FSDP: plain data-parallel mean
            p.grad.div_(n)


def clip_grad_norm_(model: ErnieForCausalLM, max_norm: float, mesh: ParallelMesh) -> float:
    """Scale every gradient so the global L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_`` on one process); returns the norm before clipping.

    Squares are summed where each shard lives: FSDP shards over the data ranks, expert slices over the
    ep group (replicated over dp), replicated tensors once."""
    zero = torch.zeros((), dtype=torch.float64)
    dense, experts, replicated = zero.clone(), zero.clone(), zero.clone()
    grads = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if isinstance(g, DTensor) else g
        grads.append(local)
        sq = local.detach().double().pow(2).sum().cpu()
        if isinstance(g, DTensor):
            dense += sq
        elif is_expert_param(name):
            experts += sq
        else:
            replicated += sq
    if data_ranks(mesh) > 1:
        dist.all_reduce(dense)  # tp == 1: the world is the data ranks
    if mesh.ep > 1:
        dist.all_reduce(experts, group=mesh.group("ep"))
    norm = float((dense + experts + replicated).sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm


def train_step(model: ErnieForCausalLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               labels: torch.Tensor, mesh: ParallelMesh, ignore_index: int = -100,
               max_grad_norm: float | None = None) -> float:
    """One optimizer step on this rank's micro-batch; returns the global mean token loss.

    input_ids/labels: [B_local, T]. Equal to a single-process step on the concatenated global batch
    (with ``max_grad_norm``: clipped by the global gradient norm, as on one process).
    """
    total = global_token_count(labels, mesh, ignore_index)
    if total == 0:
        raise ValueError("the global batch has no label that is not ignore_index; nothing to train on")
    optimizer.zero_grad(set_to_none=True)
    loss, summed = local_loss(model, input_ids, labels, total, mesh, ignore_index)
    loss.backward()
    sync_grads(model, mesh)
    if max_grad_norm is not None:
        clip_grad_norm_(model, max_grad_norm, mesh)
    optimizer.step()
    dist.all_reduce(summed)
    return summed.item() / total
