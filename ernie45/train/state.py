"""Training checkpoints: everything a run needs to continue on the same loss curve, never pickled.

A checkpoint is a folder ``step-NNNNNN/`` holding
- ``model.safetensors``      the module's state_dict (tied weights stored once),
- ``optimizer.safetensors``  the optimizer's per-parameter state tensors (``state.<i>.<key>``),
- ``rng.safetensors``        torch CPU (and CUDA) generator states,
- ``trainer_state.json``     step, scheduler, data position, Python RNG state, optimizer hyperparameters.
The folder is written under a temporary name and renamed into place, and ``latest`` (a text file
with the folder name) is replaced atomically afterwards: a run killed at any moment leaves either the
previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ernie45.utils import atomic_write_text

LATEST = "latest"


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with shared storage (a tied head) kept once; load_state_dict(strict=False) retied."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{idx}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_st(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file(tensors, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 2) -> str:
    """Write ``folder/step-NNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    os.makedirs(folder, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        _save_st(_unique_state(model), os.path.join(tmp, "model.safetensors"))
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        _save_st(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        _save_st(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "rng": rng_meta, **trainer_state}
        atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1) + "\n")
        final = os.path.join(folder, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(folder, LATEST), name + "\n")
    old = sorted(d for d in os.listdir(folder) if d.startswith("step-") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
    return final


def latest_checkpoint(folder: str) -> str | None:
    """The folder ``latest`` points at, or None when no checkpoint was completed."""
    path = os.path.join(folder, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        ckpt = os.path.join(folder, f.read().strip())
    return ckpt if os.path.isfile(os.path.join(ckpt, "trainer_state.json")) else None


def load_checkpoint(ckpt: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNGs from ``ckpt``; return trainer_state.json for the rest."""
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); resume with the same recipe")
    load_optimizer(optimizer, load_file(os.path.join(ckpt, "optimizer.safetensors")), state["optimizer"])
    set_rng_state(load_file(os.path.join(ckpt, "rng.safetensors")), state["rng"])
    return state
