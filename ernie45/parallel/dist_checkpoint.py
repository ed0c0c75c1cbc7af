"""Training checkpoints with torch.distributed.checkpoint (DCP): saved by N ranks, resumed by M ranks of
another layout, exported to an HF folder by one process.

DCP reshards DTensors by their global shape, so every rank-dependent tensor is presented as one:
FSDP2 parameters already are (Shard(0) over the data ranks); expert-parallel weights are wrapped as
DTensors over the (dp, ep) mesh with placements (Replicate, Shard(0)), i.e. the global [E, ...] stack.
AdamW's moments follow their parameter's layout. Keys: ``model.<name>`` and ``optim.<name>.<state>``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import build_empty, save_checkpoint
from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel.expert_parallel import is_expert_param
from ernie45.parallel.mesh import ParallelMesh
from ernie45.utils import atomic_write_text

log = logging.getLogger(__name__)

META = "ernie45_train.json"


def _as_global(name: str, t: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    if isinstance(t, DTensor) or not is_expert_param(name) or mesh.ep == 1:
        return t
    return DTensor.from_local(t, mesh.device_mesh["dp", "ep"], [Replicate(), Shard(0)], run_check=False)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (step 0, zero moments) so a resume has tensors to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def train_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, mesh: ParallelMesh
                     ) -> dict[str, torch.Tensor]:
    """The flat DCP state: every tensor shares storage with the live model / optimizer (load is in place)."""
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state[f"model.{name}"] = _as_global(name, p.detach(), mesh)
        if optimizer is not None:
            for key, v in optimizer.state[p].items():
                if torch.is_tensor(v):
                    state[f"optim.{name}.{key}"] = _as_global(name, v, mesh) if v.dim() else v
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            state[f"model.{name}"] = b
    return state


def save_train_checkpoint(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          mesh: ParallelMesh, step: int, extra: dict | None = None) -> None:
    """Every rank calls this; each writes its own shards (DCP), rank 0 the config, the step and
    ``extra`` (JSON: e.g. the data sampler's position). META is written last: its presence marks a
    complete checkpoint."""
    dcp.save(train_state_dict(model, optimizer, mesh), checkpoint_id=folder)
    dist.barrier()
    if dist.get_rank() == 0:
        cfg = model.config
        atomic_write_text(os.path.join(folder, META), json.dumps({"step": step, "config": cfg.to_hf_dict(),
                                                                   "saved_by": vars(mesh.sizes),
                                                                   "extra": extra or {}}, indent=2))
    dist.barrier()


def load_train_checkpoint(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          mesh: ParallelMesh) -> int:
    """Load into a model parallelized for *this* mesh (any dp/ep, FSDP or not); returns the step."""
    if not os.path.isfile(os.path.join(folder, META)):
        raise FileNotFoundError(f"{folder}: no {META}; not a checkpoint written by save_train_checkpoint")
    init_optimizer_state(optimizer)
    state = train_state_dict(model, optimizer, mesh)
    dcp.load(state, checkpoint_id=folder)
    with torch.no_grad():  # DTensor.from_local may have copied: write the loaded values back
        for name, p in model.named_parameters():
            loaded = state[f"model.{name}"]
            if isinstance(loaded, DTensor) and not isinstance(p, DTensor):
                p.copy_(loaded.to_local())
            for key, v in optimizer.state[p].items():
                src = state.get(f"optim.{name}.{key}")
                if isinstance(src, DTensor) and not isinstance(v, DTensor):
                    v.copy_(src.to_local())
    with open(os.path.join(folder, META)) as f:
        return int(json.load(f)["step"])


def load_full_model(folder: str) -> ErnieForCausalLM:
    """The full fp32 model of a DCP checkpoint, in one process (no process group needed)."""
    with open(os.path.join(folder, META)) as f:
        cfg = ModelConfig.from_hf_dict(json.load(f)["config"], source=os.path.join(folder, META))
    model = build_empty(cfg, torch.float32)
    state = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    state |= {f"model.{n}": b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.tie_weights()
    return model.eval()


def export_hf(folder: str, out: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Gather the full weights of a DCP checkpoint and write an HF folder (``load_model`` and
    transformers read it)."""
    save_checkpoint(load_full_model(folder).to(dtype), out)
    log.info("exported %s to %s (%s)", folder, out, dtype)
