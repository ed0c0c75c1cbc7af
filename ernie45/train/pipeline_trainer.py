"""``ernie45 train pretrain --config R --pp 2 --ep 2 --fsdp 2`` under torchrun: the Trainer on a
pp x (dp x ep) mesh, each rank running its pipeline stage(s) with a torch.distributed.pipelining schedule.

Layout: data ranks per stage = fsdp (or ep when fsdp is 1), ep divides them; world = pp x data ranks.
A step is one pass of the schedule over the rank's slice of the global batch split into
``microbatches`` (they replace grad_accum). The loss, gradient norm, expert load and aux-free bias
update are global (as one process on the global batch); checkpoints are the DCP folders of
``DistributedTrainer`` (the same keys), so they resume on any other layout, pipelined or not.
Pretraining only: the pipeline needs every step's batch in the same shape (packed windows).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from ernie45.parallel.mesh import MeshError, ParallelConfig, init_distributed
from ernie45.parallel.pipeline import Pipeline, PipelineConfig, PipelineMesh, load_stage_model
from ernie45.train import balance, losses
from ernie45.train.data import pad_batch
from ernie45.train.distributed import DistributedTrainer
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer, lr_at

log = logging.getLogger(__name__)


def pipeline_world(pp: int, ep: int, fsdp: int) -> int:
    if min(pp, ep, fsdp) < 1:
        raise MeshError(f"--pp {pp} --ep {ep} --fsdp {fsdp}: all must be >= 1")
    data = fsdp if fsdp > 1 else ep
    if data % ep:
        raise MeshError(f"--ep {ep} does not divide --fsdp {fsdp}: expert-parallel groups must tile the data ranks")
    return pp * data


class PipelineTrainer(DistributedTrainer):
    """The Trainer on pp x dp x ep ranks (see the module docstring). Every rank constructs it."""

    def __init__(self, cfg: TrainConfig, pp: int, ep: int = 1, fsdp: int = 1, schedule: str = "1f1b",
                 microbatches: int | None = None, virtual: int = 1, tokenizer: Any = None) -> None:
        if cfg.task != "pretrain":
            raise ValueError(f"--pp trains task pretrain only (every step's batch has one shape); {cfg.task} runs "
                             "with --ep/--fsdp alone")
        if cfg.lora:
            raise ValueError("--pp with LoRA is not supported; drop --pp or the lora block")
        if cfg.grad_accum != 1:
            raise ValueError(f"grad_accum={cfg.grad_accum} with --pp: the pipeline's micro-batches are the "
                             "accumulation; set grad_accum: 1 and --microbatches instead")
        if cfg.gradient_checkpointing:
            raise ValueError("gradient_checkpointing with --pp: use recompute: full (per stage) instead")
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        want = pipeline_world(pp, ep, fsdp)
        if want != self.world:
            raise MeshError(f"--pp {pp} --ep {ep} --fsdp {fsdp} needs {want} processes, {self.world} were launched")
        data = want // pp
        self.sizes = ParallelConfig(dp=data // ep, ep=ep)
        self.use_fsdp = fsdp > 1
        self.pcfg = PipelineConfig(pp=pp, microbatches=microbatches or pp, schedule=schedule, virtual=virtual)
        if cfg.batch_size % (data * self.pcfg.microbatches):
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by data ranks ({data}) x microbatches "
                             f"({self.pcfg.microbatches})")
        self.mesh = None
        Trainer.__init__(self, cfg, tokenizer)

    def build_model(self) -> Pipeline:  # type: ignore[override]
        cfg = self.cfg
        from ernie45.config import ModelConfig

        if cfg.init_from:
            from ernie45.model.checkpoint import resolve_model_path

            mcfg = ModelConfig.from_json(resolve_model_path(cfg.init_from))
        else:
            fields = dict(cfg.model)
            preset = fields.pop("preset", None)
            mcfg = ModelConfig.from_name(preset).replace(**fields) if preset else ModelConfig(**fields)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and vocab > mcfg.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {mcfg.vocab_size}; "
                             f"set model.vocab_size >= {vocab}")
        self.pmesh = PipelineMesh(self.pcfg.pp, self.sizes, mcfg, self.device.type)
        self.mesh = self.pmesh.stage_mesh
        if cfg.init_from:  # each stage reads only its layers (and its experts) from the HF files
            stages = load_stage_model(cfg.init_from, self.pmesh, self.pcfg, torch.float32, cfg.aux_loss_coef,
                                      aux_loss_fn=losses.load_balancing_loss)
            pipe = Pipeline(stages, self.pmesh, self.pcfg, fsdp=self.use_fsdp)
        else:
            pipe = Pipeline(Trainer.build_model(self), self.pmesh, self.pcfg, fsdp=self.use_fsdp,
                            aux_loss_coef=cfg.aux_loss_coef, aux_loss_fn=losses.load_balancing_loss)
        log.info("rank %d: pipeline stages %s of %d (%s)", self.rank, pipe.stage_ids, self.pcfg.num_stages,
                 self.pcfg.schedule)
        return pipe.train()

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        items = Trainer.next_batch(self)  # the same global batch on every rank (same sampler seed)
        m = self.mesh
        data, rank = self.pmesh.data_ranks, m.local_rank("dp") * m.ep + m.local_rank("ep")
        per = len(items) // data
        return items[rank * per:(rank + 1) * per]

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = pad_batch(self.next_batch(), self.pad_id)
        pipe: Pipeline = self.model
        loss = pipe.forward_backward(batch["input_ids"].to(self.device), batch["labels"].to(self.device))
        norm = pipe.clip_grad_norm_(self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        lr = lr_at(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = int((batch["labels"] != -100).sum()) * self.pmesh.data_ranks
        row: dict[str, Any] = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm}
        if self.num_experts:
            loads = [x for x in pipe.expert_load() if x.numel()]
            local = torch.cat(loads) if loads else torch.zeros(0, self.num_experts)
            # every rank's stages' layers: gather the per-layer imbalance over the pipeline ranks
            stats = torch.tensor([balance.imbalance(local) * len(local) if len(local) else 0.0, float(len(local))],
                                 dtype=torch.float64)
            dist.all_reduce(stats, group=self.pmesh.pp_group)
            row["expert_imbalance"] = float(stats[0] / stats[1]) if stats[1] else 0.0
            if self.cfg.aux_loss_coef:
                aux = torch.tensor([pipe.aux_loss()], dtype=torch.float64)
                dist.all_reduce(aux, group=self.pmesh.pp_group)
                if self.pmesh.data_group() is not None:
                    dist.all_reduce(aux, group=self.pmesh.data_group())
                row["aux_loss"] = float(aux) / self.pmesh.data_ranks
            if self.cfg.aux_free_rate and not self.cfg.freeze_correction_bias:
                pipe.update_correction_bias(self.cfg.aux_free_rate)
        dt = time.perf_counter() - t0
        row.update(tokens=tokens, tokens_per_s=tokens / dt if dt > 0 else 0.0, step_s=dt)
        return row


def check_pipeline_layout(cfg: TrainConfig, pp: int, ep: int, fsdp: int) -> int:
    """Validate --pp/--ep/--fsdp before any process starts; returns the number of processes."""
    from ernie45.config import ModelConfig
    from ernie45.model.checkpoint import resolve_model_path
    from ernie45.parallel.pipeline import split_layers

    world = pipeline_world(pp, ep, fsdp)
    if cfg.init_from:
        model = ModelConfig.from_json(resolve_model_path(cfg.init_from))
    else:
        fields = dict(cfg.model)
        preset = fields.pop("preset", None)
        model = ModelConfig.from_name(preset).replace(**fields) if preset else ModelConfig(**fields)
    ParallelConfig(dp=(world // pp) // ep, ep=ep).validate(model)
    split_layers(model, pp)
    return world

