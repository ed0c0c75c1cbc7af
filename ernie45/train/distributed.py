"""``ernie45 train ... --ep N --fsdp M`` under torchrun: the project's Trainer on dp x ep ranks.

``DistributedTrainer`` subclasses ``ernie45.train.trainer.Trainer`` and changes only what multi-rank
training changes:

- the model is expert-parallel (tokens "sharded") and, with ``fsdp > 1``, FSDP2-sharded over every rank;
- each rank takes its contiguous slice of the (identical on every rank) global batch;
- the loss scale uses the global token count so the summed gradients are the global mean
  (``ernie45.parallel.fsdp``), metrics and expert loads are all-reduced (the aux-free correction bias is
  updated from the global load, so it stays identical on every rank);
- clipping uses the global gradient norm; checkpoints are DCP folders that resume on another rank
  count; rank 0 writes metrics and exports the HF model from the last checkpoint.

Layout: world = data ranks = fsdp (or ep when fsdp is 1); ep divides it; dp = world / ep.
Online UPO on these ranks: ``ernie45.train.upo_distributed`` (this trainer with UPO's step).
Not supported (clear errors): DPO, LoRA, tp.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any

import torch
import torch.distributed as dist

from ernie45.parallel import parallelize
from ernie45.parallel.dist_checkpoint import META, load_full_model, load_train_checkpoint, save_train_checkpoint
from ernie45.parallel.fsdp import apply_fsdp, clip_grad_norm_, sync_grads
from ernie45.parallel.mesh import MeshError, ParallelConfig, init_distributed, init_mesh
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer, lr_at

log = logging.getLogger(__name__)

CKPT_DIR = "dcp_checkpoints"
LORA_REFUSED = "multi-rank training with LoRA is not supported; drop --ep/--fsdp or the lora block"


def train_layout(ep: int, fsdp: int, world: int) -> ParallelConfig:
    """Mesh sizes for ``--ep ep --fsdp fsdp`` on ``world`` processes, or a MeshError saying why not."""
    if ep < 1 or fsdp < 1:
        raise MeshError(f"--ep {ep} --fsdp {fsdp}: both must be >= 1")
    data = fsdp if fsdp > 1 else ep
    if world != data:
        raise MeshError(f"--ep {ep} --fsdp {fsdp} needs {data} processes (every rank is a data rank; fsdp shards "
                        f"over all of them), but {world} were launched")
    if data % ep:
        raise MeshError(f"--ep {ep} does not divide --fsdp {fsdp}: expert-parallel groups must tile the data ranks")
    return ParallelConfig(dp=data // ep, ep=ep)


def check_layout(cfg: TrainConfig, ep: int, fsdp: int) -> int:
    """Validate ``--ep/--fsdp`` against the recipe's model before any process starts; returns the
    number of processes to launch."""
    from ernie45.config import ModelConfig
    from ernie45.model.checkpoint import resolve_model_path

    world = fsdp if fsdp > 1 else ep
    if cfg.init_from:
        model = ModelConfig.from_json(resolve_model_path(cfg.init_from))
    else:
        fields = dict(cfg.model)
        preset = fields.pop("preset", None)
        model = ModelConfig.from_name(preset).replace(**fields) if preset else ModelConfig(**fields)
    train_layout(ep, fsdp, world).validate(model, world)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} data ranks")
    if cfg.lora:
        raise ValueError(LORA_REFUSED)
    if cfg.task == "upo":
        from ernie45.train.upo_distributed import check_upo_split

        check_upo_split(cfg, world)
    return world


class DistributedTrainer(Trainer):
    """The Trainer on dp x ep ranks (see the module docstring). Every rank constructs it."""

    def __init__(self, cfg: TrainConfig, ep: int = 1, fsdp: int = 1, tokenizer: Any = None) -> None:
        if cfg.task == "dpo":
            raise ValueError("multi-rank training supports pretrain and sft; run DPO on one process")
        if cfg.lora:
            raise ValueError(LORA_REFUSED)
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sizes = train_layout(ep, fsdp, self.world)
        self.use_fsdp = fsdp > 1
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {self.world} data ranks")
        self.mesh = None
        super().__init__(cfg, tokenizer)

    # ---------------------------------------------------------------------------------- building
    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        self.mesh = init_mesh(self.sizes, model.config, self.device.type)
        parallelize(model, self.mesh, tokens="sharded")
        if self.use_fsdp:
            apply_fsdp(model, self.mesh)
        return model

    @property
    def metrics_path(self) -> str:
        if self.rank == 0:
            return super().metrics_path
        return os.path.join(self.cfg.output_dir, "ranks", f"rank{self.rank}-metrics.jsonl")

    # ---------------------------------------------------------------------------------- stepping
    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        items = super().next_batch()  # the same global batch on every rank (same sampler seed)
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def _sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def micro_step(self, items: list[dict[str, torch.Tensor]], token_scale: float) -> dict[str, Any]:
        # The base passes 1 / (this rank's tokens of the step); the gradient must be the global mean and
        # the data-parallel reduction averages over the ranks: scale by ranks / global tokens.
        local = round(1.0 / token_scale) if token_scale else 0
        (total,) = self._sum(local)
        rec = super().micro_step(items, self.world / max(1.0, total) if total else 0.0)
        rec["loss_sum"], rec["tokens"] = self._sum(rec["loss_sum"], rec["tokens"])
        rec["tokens"] = int(rec["tokens"])
        if "load" in rec:
            dist.all_reduce(rec["load"])
        if "aux" in rec:
            rec["aux"] = self._sum(rec["aux"])[0] / self.world
        return rec

    def optimizer_step(self) -> float:
        sync_grads(self.model, self.mesh)
        norm = clip_grad_norm_(self.model, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"), self.mesh)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ---------------------------------------------------------------------------------- state
    def _ckpt_root(self) -> str:
        return os.path.join(self.cfg.output_dir, CKPT_DIR)

    def latest(self) -> str | None:
        root = self._ckpt_root()
        done = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, META))) \
            if os.path.isdir(root) else []
        return os.path.join(root, done[-1]) if done else None

    def save(self) -> str:
        folder = os.path.join(self._ckpt_root(), f"step-{self.step:08d}")
        save_train_checkpoint(folder, self.model, self.optimizer, self.mesh, self.step,
                              extra={"sampler": self.sampler.state_dict()})
        if self.rank == 0:
            done = sorted(os.listdir(self._ckpt_root()))
            for old in done[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(os.path.join(self._ckpt_root(), old), ignore_errors=True)
            if self.cfg.plot:
                self.plot()
        dist.barrier()
        return folder

    def resume(self) -> None:
        ckpt = self.latest()
        if ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {self._ckpt_root()}; start without --resume")
        self.step = load_train_checkpoint(ckpt, self.model, self.optimizer, self.mesh)
        with open(os.path.join(ckpt, META)) as f:
            self.sampler.load_state_dict(json.load(f)["extra"]["sampler"])
        rows = []
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        self.history = [r for r in rows if r["step"] <= self.step]
        with open(self.metrics_path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.history))
        log.info("rank %d resumed from %s at step %d", self.rank, ckpt, self.step)

    def train(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        os.makedirs(os.path.dirname(self.metrics_path), exist_ok=True)
        return super().train(resume=resume, stop_after=stop_after)

    def export(self) -> str:
        """Rank 0 gathers the full weights from the last DCP checkpoint and writes output_dir/final."""
        out = os.path.join(self.cfg.output_dir, "final")
        if self.rank == 0:
            sharded, self.model = self.model, load_full_model(self.latest())
            try:
                out = super().export()
            finally:
                self.model = sharded
        dist.barrier()
        return out


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m ernie45.train.distributed pretrain --config R --ep E --fsdp F``:
    the ``ernie45 train`` verb, for launchers that call a module directly."""
    import argparse

    from ernie45.train.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="python -m ernie45.train.distributed")
    add_train_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
