"""Pipeline parallelism: the decoder cut into stages by layer, run with ``torch.distributed.pipelining``.

Applied from outside like tp/ep/FSDP: a stage is a pruned copy of the one model definition that keeps
only its layers (embeddings on the first stage, final norm + head on the last), under the *same*
parameter names (``model.layers.7.mlp.experts.gate_up_proj``), so DCP checkpoints, HF loading and
``is_expert_param`` work unchanged and a checkpoint resumes on any other layout.

Mesh: world = pp x dp x ep x tp (pp outermost: consecutive stages are different hosts' worth of ranks,
the data/expert groups of one stage are neighbours). Inside a stage the (dp, ep, tp) submesh is an
ordinary ``ParallelMesh``: ``parallelize`` and ``apply_fsdp`` shard the stage as they shard a model.

Schedules (torch's, not ours): ``gpipe``, ``1f1b`` (one stage per rank), ``interleaved-1f1b`` and
``zb`` (ScheduleInterleavedZeroBubble; ``virtual`` stages per rank, looped), ``zbv`` (ScheduleZBVZeroBubble:
two stages per rank in a V). The loss is the summed token cross-entropy scaled by data ranks / global
tokens of the step (``scale_grads=False``), so a pipeline step equals a single-process step on the
global batch, as ``ernie45.parallel.fsdp`` does for data parallelism.

MoE balancing per stage: each stage counts the expert load of its own MoE layers (aux-free bias update
needs only its layer's load) and injects its layers' auxiliary loss into the backward through
``AuxLossInjector`` (the loss term has no path to the last stage's output).

Shape suffixes: B micro-batch rows, T tokens, H hidden, V vocab, L MoE layers of the stage, E experts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ernie45.config import ModelConfig
from ernie45.model.model import ErnieForCausalLM
from ernie45.model.moe import MoE
from ernie45.parallel import parallelize
from ernie45.parallel.expert_parallel import is_expert_param
from ernie45.parallel.fsdp import expert_params
from ernie45.parallel.mesh import MeshError, ParallelConfig, ParallelMesh

log = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb", "zbv")
AuxLossFn = Callable[[list, int], torch.Tensor]
"""(router records [(probs_TE, idx_TK)] of some MoE layers, E) -> their mean auxiliary loss (the trainer's)."""
MULTI_STAGE = ("interleaved-1f1b", "zb", "zbv")


# ------------------------------------------------------------------------------------- layer split
def layer_costs(config: ModelConfig) -> list[int]:
    """Parameters of each decoder layer (all experts counted: they are all held and updated)."""
    c = config
    h, d = c.hidden_size, c.head_dim
    attn = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * h
    out = []
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            mlp = c.moe_num_experts * 3 * h * c.moe_intermediate_size + c.moe_num_experts * h
            mlp += 3 * h * c.shared_intermediate_size if c.moe_num_shared_experts else 0
        else:
            mlp = 3 * h * c.intermediate_size
        out.append(attn + mlp)
    return out


def split_layers(config: ModelConfig, num_stages: int, costs: Sequence[float] | None = None) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage cost.

    costs: per-layer cost (default: parameter count; pass measured seconds to balance by time). The
    embedding is charged to the first stage and the final norm + LM head to the last. Every stage gets
    at least one layer.
    """
    n = config.num_hidden_layers
    if num_stages < 1 or num_stages > n:
        raise MeshError(f"{num_stages} pipeline stages for num_hidden_layers={n}: each stage needs at least "
                        f"one decoder layer; use pp x virtual <= {n}")
    params = layer_costs(config)
    costs = list(params if costs is None else costs)
    if len(costs) != n:
        raise ValueError(f"costs has {len(costs)} entries for num_hidden_layers={n}")
    # The embedding lookup and the head matmul in the units of ``costs`` (parameter share).
    ends = config.vocab_size * config.hidden_size * sum(costs) / max(1, sum(params))
    pre = [0.0]
    for x in costs:
        pre.append(pre[-1] + x)

    def cost(s: int, a: int, b: int) -> float:  # stage s holds layers [a, b)
        return pre[b] - pre[a] + ends * ((s == 0) + (s == num_stages - 1))

    # best[s][i]: minimal max cost of stages 0..s-1 covering layers [0, i)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], cost(s - 1, j, i))
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        bounds.append(range(j, i))
        i = j
    return bounds[::-1]


# ------------------------------------------------------------------------------------------ stages
class StageLayers(nn.ModuleDict):
    """The stage's decoder layers keyed by their index in the full model (so parameter names do not
    change); iterates over the layers like the full model's ModuleList."""

    def __iter__(self):  # noqa: ANN204
        return iter(self.values())


class AuxLossInjector(torch.autograd.Function):
    """Identity on the hidden states whose backward also sends d(aux)=1 into the aux-loss graph: the
    stage's load-balancing loss gets its gradient without travelling to the last stage."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.aux_shape = aux.shape
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, torch.ones(ctx.aux_shape, dtype=torch.float32, device=grad.device)


class StageModel(nn.Module):
    """One pipeline stage of ErnieForCausalLM: ``forward(input_ids [B,T] or h [B,T,H])`` returns h, or
    fp32 logits [B, T, V] on the last stage. Holds ``model`` and ``lm_head`` like the full model."""

    def __init__(self, full: ErnieForCausalLM, layers: range, first: bool, last: bool,
                 aux_loss_coef: float = 0.0, aux_divisor: float = 1.0, aux_loss_fn: AuxLossFn | None = None) -> None:
        super().__init__()
        self.config = full.config
        self.layer_range, self.is_first, self.is_last = layers, first, last
        m = full.model
        self.model = nn.Module()
        self.model.layers = StageLayers({str(i): m.layers[i] for i in layers})
        self.model.rotary = m.rotary
        tied = self.config.tie_word_embeddings
        if first or (last and tied):  # a tied head keeps its own copy of the embedding on the last stage
            self.model.embed_tokens = m.embed_tokens
        if last:
            self.model.norm = m.norm
            self.lm_head = full.lm_head
        if aux_loss_coef and aux_loss_fn is None:
            raise ValueError("aux_loss_coef > 0 needs aux_loss_fn (e.g. ernie45.train.losses.load_balancing_loss)")
        self.aux_loss_coef, self.aux_loss_fn = aux_loss_coef, aux_loss_fn
        self.aux_divisor = aux_divisor  # MoE layers of the whole model x micro-batches per step
        self.moe = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        e = self.config.moe_num_experts
        self.num_experts = max(e, 1)
        self.records: list[tuple[torch.Tensor, float]] = []  # per forward: (load_LE, aux value)
        # Router outputs are collected by hooks, not by the list DecoderLayer takes: FSDP2's pre-forward
        # copies a layer's list arguments, so appends to it would be lost.
        self._router: list | None = None  # a list only while this stage's forward runs (not its recomputation)
        for moe in self.moe:
            moe.gate.register_forward_hook(self._record_router)

    def _record_router(self, module: nn.Module, args: tuple, out: tuple) -> None:
        if self._router is not None:
            probs_TE, _, idx_TK = out
            self._router.append((probs_TE, idx_TK))

    @property
    def has_mtp(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.embed_tokens(x) if self.is_first else x  # [B, T, H]
        positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        cos, sin = m.rotary(positions)
        self._router = []
        for layer in m.layers:
            h = layer(h, cos, sin, None, None, None)
        router, self._router = self._router, None
        if router:
            with torch.no_grad():
                load_LE = torch.stack([torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts).float()
                                       for _, idx_TK in router])
            aux_value = 0.0
            if self.aux_loss_coef and torch.is_grad_enabled():
                # load_balancing_loss averages over its records: x (stage layers / all layers) = this
                # stage's share of the model-wide mean, divided over the step's micro-batches.
                aux = self.aux_loss_fn(router, self.config.moe_num_experts) * len(router)
                aux_value = float(aux.detach()) / self.aux_divisor
                h = AuxLossInjector.apply(h, aux * (self.aux_loss_coef / self.aux_divisor))
            self.records.append((load_LE, aux_value))
        if not self.is_last:
            return h
        return self.lm_head(m.norm(h)).float()


def build_stage(model: ErnieForCausalLM, stage: int, bounds: list[range], aux_loss_coef: float = 0.0,
                microbatches: int = 1, aux_loss_fn: AuxLossFn | None = None) -> StageModel:
    """The stage ``stage`` of ``bounds`` (from ``split_layers``) sharing ``model``'s modules; deep-copy
    the model first when several stages are built from one."""
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    return StageModel(model, bounds[stage], stage == 0, stage == len(bounds) - 1, aux_loss_coef,
                      max(1, n_moe) * microbatches, aux_loss_fn)


# -------------------------------------------------------------------------------------------- mesh
@dataclass(frozen=True)
class PipelineConfig:
    """How the pipeline runs (the mesh sizes of each stage are a ParallelConfig)."""

    pp: int = 2
    """Pipeline ranks (outermost mesh dim)."""
    microbatches: int = 4
    """Micro-batches per step; 1F1B keeps up to pp of them in flight on the first stage."""
    schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved-1f1b | zb | zbv."""
    virtual: int = 1
    """Stages per rank for interleaved-1f1b / zb (zbv is always 2)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise MeshError(f"schedule={self.schedule!r}: choose one of {list(SCHEDULES)}")
        for name in ("pp", "microbatches", "virtual"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MeshError(f"{name}={v!r} must be a positive integer")
        if self.schedule == "zbv" and self.virtual not in (1, 2):
            raise MeshError("schedule=zbv places exactly 2 stages per rank (a V); leave virtual at 1 or 2")
        if self.schedule in ("interleaved-1f1b", "zb") and self.virtual < 2:
            raise MeshError(f"schedule={self.schedule} needs virtual >= 2 stages per rank; use 1f1b for one")
        if self.schedule in ("gpipe", "1f1b") and self.virtual != 1:
            raise MeshError(f"schedule={self.schedule} runs one stage per rank; set virtual=1 or pick "
                            "interleaved-1f1b / zb")
        if self.schedule != "gpipe" and self.microbatches < self.pp:
            raise MeshError(f"microbatches={self.microbatches} < pp={self.pp}: {self.schedule} needs at least "
                            "one micro-batch per stage to fill the pipeline")

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule == "zbv" else self.virtual

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def stage_ids(self, pp_rank: int) -> list[int]:
        """Global stage indices this pp rank runs: looped for interleaved, a V for zbv."""
        if self.schedule == "zbv":
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + v * self.pp for v in range(self.stages_per_rank)]

    def bubble_theory(self) -> float:
        """Idle fraction of the schedule's ideal timeline (equal stage times, free communication):
        (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v·m+p-1) interleaved (Narayanan et al. 2021)."""
        p, m, v = self.pp, self.microbatches, self.stages_per_rank
        return (p - 1) / (v * m + p - 1)


class PipelineMesh:
    """The pp x (dp, ep, tp) mesh: this rank's pipeline coordinate and the ParallelMesh of its stage."""

    def __init__(self, pp: int, sizes: ParallelConfig, config: ModelConfig | None = None,
                 device_type: str = "cpu") -> None:
        world = dist.get_world_size()
        if pp * sizes.world_size != world:
            raise MeshError(f"world size {world} != pp({pp}) x dp({sizes.dp}) x ep({sizes.ep}) x tp({sizes.tp}) = "
                            f"{pp * sizes.world_size}; launch that many processes or change the sizes")
        if sizes.tp > 1:
            raise MeshError("pipeline training with tp > 1 is not supported; use pp, ep and fsdp (dp)")
        sizes.validate(config)
        self.pp = pp
        self.device_mesh = init_device_mesh(device_type, (pp, sizes.dp, sizes.ep, sizes.tp),
                                            mesh_dim_names=("pp", "dp", "ep", "tp"))
        self.pp_rank = self.device_mesh.get_local_rank("pp")
        self.pp_group = self.device_mesh.get_group("pp")
        self.stage_mesh = ParallelMesh(self.device_mesh["dp", "ep", "tp"], sizes)
        # The first and last stage of each data coordinate share the tied embedding's gradient.
        grid = self.device_mesh.mesh.reshape(pp, -1)
        self.ends_group = None
        for col in range(grid.shape[1]):
            ranks = sorted({int(grid[0, col]), int(grid[pp - 1, col])})
            g = dist.new_group(ranks) if len(ranks) > 1 else None  # every rank creates every group
            if dist.get_rank() in ranks:
                self.ends_group = g

    @property
    def data_ranks(self) -> int:
        return self.stage_mesh.dp * self.stage_mesh.ep

    def data_group(self) -> dist.ProcessGroup | None:
        return self.stage_mesh.data_mesh().get_group() if self.data_ranks > 1 else None


# ---------------------------------------------------------------------------------------- pipeline
class Pipeline:
    """This rank's stages (parallelized, optionally FSDP-sharded) and the torch schedule that runs them.

    ``Pipeline(model, pmesh, cfg)`` takes a full model (every rank builds the same one, e.g. seeded, or
    ``load_stage_model`` per stage) and keeps only this rank's stages.
    """

    def __init__(self, model: ErnieForCausalLM | list[StageModel], pmesh: PipelineMesh, cfg: PipelineConfig,
                 fsdp: bool = False, aux_loss_coef: float = 0.0, costs: Sequence[float] | None = None,
                 param_dtype: torch.dtype | None = None, aux_loss_fn: AuxLossFn | None = None) -> None:

        if cfg.pp != pmesh.pp:
            raise MeshError(f"PipelineConfig.pp={cfg.pp} but the mesh has pp={pmesh.pp}")
        self.cfg, self.pmesh = cfg, pmesh
        mesh = pmesh.stage_mesh
        self.stage_ids = cfg.stage_ids(pmesh.pp_rank)
        if isinstance(model, list):  # stages from load_stage_model: already expert-parallel
            self.modules = model
            if fsdp:
                for mod in self.modules:
                    shard_stage_fsdp(mod, mesh, param_dtype)
        else:
            self.bounds = split_layers(model.config, cfg.num_stages, costs)
            self.modules = [build_stage(copy.deepcopy(model) if len(self.stage_ids) > 1 else model, s,
                                        self.bounds, aux_loss_coef, cfg.microbatches, aux_loss_fn)
                            for s in self.stage_ids]
            for mod in self.modules:
                parallelize_stage(mod, mesh, fsdp, param_dtype)
        self.config = self.modules[0].config
        self.param_dtype = param_dtype or next(self.modules[0].parameters()).dtype
        self.scale = 1.0  # data ranks / global tokens of the current step, read by the loss
        self.device = torch.device(mesh.device_type if mesh.device_type != "cuda"
                                   else f"cuda:{torch.cuda.current_device()}")
        self.schedule = None
        self._shape: tuple[int, int] | None = None

    def _build_schedule(self, rows: int, seq: int) -> None:
        """The stages (shapes inferred from the first micro-batch by one extra forward: StageModel keeps
        per-forward records so that pass is left out of the step's load), then the torch schedule."""
        from torch.distributed import pipelining as pl

        cfg = self.cfg
        self.stages = []
        for mod, s in zip(self.modules, self.stage_ids):
            self.stages.append(pl.PipelineStage(mod, s, cfg.num_stages, self.device, group=self.pmesh.pp_group))
        kind = {"gpipe": pl.ScheduleGPipe, "1f1b": pl.Schedule1F1B,
                "interleaved-1f1b": pl.ScheduleInterleaved1F1B, "zb": pl.ScheduleInterleavedZeroBubble,
                "zbv": pl.ScheduleZBVZeroBubble}[cfg.schedule]
        stages = self.stages[0] if cfg.schedule in ("gpipe", "1f1b") else self.stages
        self.schedule = kind(stages, n_microbatches=cfg.microbatches, loss_fn=self._loss, scale_grads=False)
        self._shape = (rows, seq)

    def _loss(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        # summed token cross-entropy in fp32 (-100 ignored), as the trainers' masked_cross_entropy
        summed = torch.nn.functional.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]),
                                                   labels_BT.reshape(-1), ignore_index=-100, reduction="sum")
        return summed * self.scale

    @property
    def has_last(self) -> bool:
        return any(m.is_last for m in self.modules)

    @property
    def has_first(self) -> bool:
        return any(m.is_first for m in self.modules)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters()]

    def named_parameters(self):  # noqa: ANN201
        for m in self.modules:
            yield from m.named_parameters()

    def named_buffers(self):  # noqa: ANN201 - with named_parameters and config: what dist_checkpoint reads
        for m in self.modules:
            yield from m.named_buffers()

    def submodules(self):  # noqa: ANN201 - what the recompute and fp8 passes walk
        for m in self.modules:
            yield from m.modules()

    def train(self, mode: bool = True) -> Pipeline:
        for m in self.modules:
            m.train(mode)
        return self

    # -------------------------------------------------------------------------------- one step
    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
        """Run the schedule over this data rank's batch [B_local, T] (split into micro-batches); leaves
        the gradients of a single-process step on the global batch. Returns the global mean token loss
        (on every rank)."""
        if input_ids.shape[0] % self.cfg.microbatches:
            raise ValueError(f"{input_ids.shape[0]} rows per data rank do not split into "
                             f"microbatches={self.cfg.microbatches}; make batch_size / data ranks a multiple of it")
        n = (labels != ignore_index).sum().to(torch.float64).reshape(1)
        dg = self.pmesh.data_group()
        if dg is not None:
            dist.all_reduce(n, group=dg)
        total = float(n.item())
        if total == 0:
            raise ValueError("the global batch has no label that is not ignore_index; nothing to train on")
        self.scale = self.pmesh.data_ranks / total
        if self._shape != tuple(input_ids.shape):
            if self._shape is not None:
                raise ValueError(f"the pipeline was built for batches of {list(self._shape)}; got "
                                 f"{list(input_ids.shape)} (pack or pad every step to the same shape)")
            self._build_schedule(*input_ids.shape)
        for m in self.modules:
            m.records.clear()
        args = (input_ids,) if self.has_first else ()
        kwargs = {"target": labels} if self.has_last else {}
        mb_losses: list[torch.Tensor] = []  # scaled, one per micro-batch, on the last stage
        self.schedule.step(*args, **kwargs, losses=mb_losses if self.has_last else None, return_outputs=False)
        self._sync_tied_embedding()
        self._sync_grads()
        summed = torch.zeros(1, dtype=torch.float64)
        if mb_losses:
            summed += torch.stack([x.detach() for x in mb_losses]).double().sum() / self.scale
        if dg is not None:
            dist.all_reduce(summed, group=dg)
        dist.all_reduce(summed, group=self.pmesh.pp_group)  # only the last stage holds a nonzero sum
        return float(summed.item()) / total

    def _sync_tied_embedding(self) -> None:
        """The tied embedding lives on the first and the last stage: both copies get the summed gradient."""
        if not self.config.tie_word_embeddings or self.cfg.num_stages == 1:
            return
        copies = [m.model.embed_tokens.weight for m in self.modules if hasattr(m.model, "embed_tokens")]
        if not copies:
            return
        grads = [w.grad.to_local() if isinstance(w.grad, DTensor) else w.grad for w in copies]
        if len(grads) == 2:  # zbv: the first and the last stage on this rank
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif self.pmesh.ends_group is not None:
            dist.all_reduce(grads[0], group=self.pmesh.ends_group)

    def _sync_grads(self) -> None:
        """The data-parallel mean of what FSDP does not reduce (see ernie45.parallel.fsdp)."""
        n = self.pmesh.data_ranks
        if n == 1:
            return
        mesh = self.pmesh.stage_mesh
        dp_group = mesh.group("dp") if mesh.dp > 1 else None
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            if is_expert_param(name):
                if dp_group is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(n)
            elif not isinstance(p, DTensor):
                dist.all_reduce(p.grad, group=self.pmesh.data_group())
                p.grad.div_(n)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm over every stage and shard (the tied embedding counted once); scales the
        gradients down to ``max_norm`` when above it. Returns the norm before clipping."""
        zero = torch.zeros((), dtype=torch.float64)
        dense, experts, replicated = zero.clone(), zero.clone(), zero.clone()
        grads = []
        for m in self.modules:
            for name, p in m.named_parameters():
                if p.grad is None:
                    continue
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                grads.append(local)
                if m.is_last and not m.is_first and name == "model.embed_tokens.weight":
                    continue  # the first stage's copy is counted
                sq = local.detach().double().pow(2).sum().cpu()
                if isinstance(p.grad, DTensor):
                    dense += sq
                elif is_expert_param(name):
                    experts += sq
                else:
                    replicated += sq
        dg = self.pmesh.data_group()
        if dg is not None:
            dist.all_reduce(dense, group=dg)
        if self.pmesh.stage_mesh.ep > 1:
            dist.all_reduce(experts, group=self.pmesh.stage_mesh.group("ep"))
        total = (dense + experts + replicated).reshape(1)
        dist.all_reduce(total, group=self.pmesh.pp_group)
        norm = float(total.sqrt())
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for g in grads:
                g.mul_(scale)
        return norm

    def expert_load(self) -> list[torch.Tensor]:
        """Per stage module: load_LE of the last step, summed over its micro-batches and every data rank."""
        out = []
        dg = self.pmesh.data_group()
        for m in self.modules:
            recs = m.records[-self.cfg.microbatches:]  # the first step also holds the shape-inference pass
            load = torch.stack([r[0] for r in recs]).sum(0) if recs else torch.zeros(0)
            if dg is not None and load.numel():
                dist.all_reduce(load, group=dg)
            out.append(load)
        return out

    def aux_loss(self) -> float:
        """This rank's stages' share of the last step's auxiliary loss (mean over layers and micro-batches)."""
        return sum(r[1] for m in self.modules for r in m.records[-self.cfg.microbatches:])

    def update_correction_bias(self, rate: float) -> None:
        """Aux-free balancing on this rank's MoE layers from their global load (identical on every
        data rank, so the biases stay replicated)."""
        for m, load_LE in zip(self.modules, self.expert_load()):
            with torch.no_grad():
                for moe, load_E in zip(m.moe, load_LE):
                    bias = moe.gate.e_score_correction_bias
                    bias += rate * torch.sign(load_E.mean() - load_E).to(bias.device, bias.dtype)


def parallelize_stage(stage: StageModel, mesh: ParallelMesh, fsdp: bool = False,
                      param_dtype: torch.dtype | None = None) -> StageModel:
    """ep (tokens sharded) then, with ``fsdp``, FSDP2 per layer and on the stage root over the data ranks."""
    parallelize(stage, mesh, tokens="sharded")  # type: ignore[arg-type] - a stage has the model's layout
    if fsdp:
        shard_stage_fsdp(stage, mesh, param_dtype)
    return stage


def shard_stage_fsdp(stage: StageModel, mesh: ParallelMesh, param_dtype: torch.dtype | None = None) -> StageModel:
    """FSDP2 over the stage's data ranks: each layer, then the root; expert weights stay ep-sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.dp * mesh.ep > 1:
        data = mesh.data_mesh()
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for layer in stage.model.layers:
            fully_shard(layer, mesh=data, mp_policy=mp, ignored_params=expert_params(layer) or None)
        fully_shard(stage, mesh=data, mp_policy=mp, ignored_params=expert_params(stage) or None)
    return stage


# ------------------------------------------------------------------------------------ HF loading
def load_stage_model(path: str | os.PathLike, pmesh: PipelineMesh, cfg: PipelineConfig,
                     dtype: str | torch.dtype = torch.float32, aux_loss_coef: float = 0.0,
                     costs: Sequence[float] | None = None, aux_loss_fn: AuxLossFn | None = None) -> list[StageModel]:
    """This rank's stages read straight from an HF checkpoint: only the tensors of the stage's layers
    (and of its experts under ep), byte ranges as ``sharded_load``. Returns parallelized stages for
    ``Pipeline(stages, pmesh, cfg)`` (apply FSDP afterwards with ``parallelize_stage``'s rule if wanted)."""
    from ernie45.model.checkpoint import (
        CheckpointError,
        index_checkpoint,
        plan_load,
        reset_nonpersistent_buffers,
        resolve_model_path,
    )
    from ernie45.parallel.shard import collect_specs
    from ernie45.parallel.sharded_load import fill_local
    from ernie45.utils import resolve_dtype

    folder = resolve_model_path(path)
    config = ModelConfig.from_json(folder)
    refs, meta = index_checkpoint(folder)
    if "ernie45.quant" in meta:
        raise CheckpointError(f"{folder}: pipeline training needs an unquantized checkpoint")
    config, plan = plan_load(config, refs, folder)
    config = config.replace(num_nextn_predict_layers=0)  # the MTP block is not trained in the pipeline
    bounds = split_layers(config, cfg.num_stages, costs)
    out = []
    for s in cfg.stage_ids(pmesh.pp_rank):
        with torch.device("meta"):
            full = ErnieForCausalLM(config)
        stage = build_stage(full.to(dtype=resolve_dtype(dtype)), s, bounds, aux_loss_coef, cfg.microbatches,
                            aux_loss_fn)
        parallelize(stage, pmesh.stage_mesh, tokens="sharded")  # type: ignore[arg-type]
        stage.to_empty(device="cpu")
        reset_nonpersistent_buffers(stage)
        if stage.is_last and config.tie_word_embeddings:
            stage.lm_head.weight = stage.model.embed_tokens.weight
        params = dict(stage.named_parameters()) | dict(stage.named_buffers())
        for n, b in params.items():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
        specs = collect_specs(stage)
        nread = 0
        with torch.no_grad():
            for name, entries in plan.items():
                if name not in params:
                    continue
                for ref, tgt in entries:
                    fd = os.open(ref.file, os.O_RDONLY)
                    try:
                        nread += fill_local(params[name], specs.get(name), ref, tgt, fd)
                    finally:
                        os.close(fd)
        stage.loaded_bytes = nread
        out.append(stage.train())
    return out


def stage_bytes(stage: nn.Module) -> int:
    seen = {id(t): t for t in stage.parameters()}
    return sum(math.prod(t.shape) * t.element_size() for t in seen.values())
