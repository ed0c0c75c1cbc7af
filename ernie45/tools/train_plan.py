"""Per-rank training memory for a pp x ep x fsdp layout (``ernie45.parallel.pipeline`` + FSDP2 + EP),
with a recomputation choice (``ernie45.train.recompute``), and the smallest layout of each GPU kind.

Layout rules (those of the trainers): the data ranks of a stage are ``max(ep, fsdp)`` (ep divides
them); GPUs = pp x data ranks. Dense weights, their gradients and AdamW moments are FSDP-sharded over
the data ranks; routed experts are split over ep. Masters, gradients and moments are fp32 (FSDP's
mixed precision casts a gathered layer to bf16 for compute, so one or two layers' bf16 copies are
transient). 1F1B keeps ``pp - s`` micro-batches in flight on stage s (the first stage the most).

Activations count what autograd saves (derived op by op from ``ernie45.model``; the gloo and CPU
tests compare them with ``SavedTensorMeter`` measurements):

- RMSNorm: its input, the fp32 copy of a 16-bit input, the normalised product, its output;
- attention: q and k before RoPE in fp32, after RoPE, v, the SDPA output and its logsumexp, o_proj's
  contiguous input;
- routed experts: the gathered rows, gate|up, SiLU, the product, the outputs (x K pairs per token);
- a SwiGLU (dense MLP or shared experts): gate, up, SiLU, product; the router's fp32 probabilities;
- the head: the final norm and the fp32 log-softmax of the logits.

A recomputed module keeps only its inputs; in backward one module at a time is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ernie45.config import ModelConfig
from ernie45.tools.hardware import DEFAULT_UTILIZATION, Device, MiB, catalogue

GPU_OVERHEAD = 768 * MiB + 512 * MiB  # CUDA context + NCCL buffers (ernie45.tools.plan)
CPU_OVERHEAD = 320 * MiB


RECOMPUTE = ("none", "attention", "experts", "mlp", "full")
"""ernie45.train.recompute.CHOICES (tools/ does not import train/; a test keeps the two equal)."""


def _parse(recompute: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    names = [] if recompute is None else [recompute] if isinstance(recompute, str) else list(recompute)
    bad = [n for n in names if n not in RECOMPUTE]
    if bad:
        raise ValueError(f"recompute={recompute!r}: unknown choice(s) {bad}; choose from {list(RECOMPUTE)}")
    return tuple(sorted(set(names) - {"none"}))


def layer_activation_bytes(config: ModelConfig, layer: int, tokens: int, dtype_bytes: int,
                           recompute: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes one layer keeps for backward over ``tokens`` tokens, bytes its recomputation adds
    transiently in backward)."""
    c, t, ab = config, tokens, dtype_bytes
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    f32 = 4 if ab < 4 else 0  # the fp32 copy a 16-bit input gets (RMSNorm, RoPE, router)

    def norm() -> int:  # input, its fp32 copy, the normalised product, the output
        return t * h * (3 * ab + f32)

    attn = t * (q + kv) * 4 + t * (q + kv) * ab + t * kv * ab + 2 * t * q * ab + t * c.num_attention_heads * 4
    if c.is_moe_layer(layer):
        s, w = t * c.moe_k, c.moe_intermediate_size
        experts = s * (2 * h + 4 * w) * ab + s * 16  # + the sort/gather indices
        mlp = 4 * t * c.shared_intermediate_size * ab if c.moe_num_shared_experts else 0
        router = t * c.moe_num_experts * 4 + t * h * f32
        experts_kept = t * c.moe_k * (ab + 8)  # routing weights and indices: the experts' inputs
    else:
        experts, router, experts_kept = 0, 0, 0
        mlp = 4 * t * c.intermediate_size * ab
    if "full" in recompute:  # the layer's input only; its whole forward again in backward
        return t * h * ab, 2 * norm() + attn + experts + mlp + router
    kept = 2 * norm() + router
    kept += attn if "attention" not in recompute else 0
    kept += experts if "experts" not in recompute else experts_kept
    kept += mlp if "mlp" not in recompute else 0
    transient = max(attn if "attention" in recompute else 0, experts if "experts" in recompute else 0,
                    mlp if "mlp" in recompute else 0)
    return kept, transient


def stage_activation_bytes(config: ModelConfig, layers: range, tokens: int, dtype_bytes: int,
                           recompute: tuple[str, ...] = (), last: bool = True, in_flight: int = 1,
                           first: bool = True, microbatches: int = 1) -> int:
    """Peak activation bytes of a stage holding ``layers`` with ``in_flight`` micro-batches of ``tokens``
    tokens alive (1F1B: pp - stage; one process: 1). ``last`` adds the head: the final norm, the fp32
    logits, their log-softmax and its gradient. A pipeline stage that is not the first also holds a
    receive buffer per micro-batch (torch.distributed.pipelining allocates one per chunk), and every
    stage of a pipeline a gradient buffer per micro-batch in flight."""
    per = [layer_activation_bytes(config, i, tokens, dtype_bytes, recompute) for i in layers]
    kept = sum(k for k, _ in per)
    ab, th = dtype_bytes, tokens * config.hidden_size
    head = th * (3 * ab + (4 if ab < 4 else 0)) + 3 * tokens * config.vocab_size * 4 if last else 0
    transient = max((tr for _, tr in per), default=0)
    buffers = (0 if first else microbatches * th * ab) + (0 if first and last else in_flight * th * ab)
    return in_flight * kept + max(head, transient) + buffers


@dataclass(frozen=True)
class TrainLayout:
    pp: int = 1
    ep: int = 1
    fsdp: int = 1

    @property
    def data_ranks(self) -> int:
        return max(self.ep, self.fsdp)

    @property
    def gpus(self) -> int:
        return self.pp * self.data_ranks

    def validate(self, config: ModelConfig) -> None:
        for name in ("pp", "ep", "fsdp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.pp > config.num_hidden_layers:
            raise ValueError(f"pp={self.pp} exceeds num_hidden_layers={config.num_hidden_layers}")
        if self.fsdp > 1 and self.fsdp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide fsdp={self.fsdp}: expert groups must tile the data ranks")
        if self.ep > 1 and (not config.is_moe or config.moe_num_experts % self.ep):
            raise ValueError(f"ep={self.ep} must divide moe_num_experts={config.moe_num_experts}")


@dataclass
class TrainMemory:
    """Bytes on the busiest rank of a layout (the stage with the largest total)."""

    layout: dict[str, int]
    gpus: int
    stage: int
    layers: list[int]
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    transient_weight_bytes: int
    overhead_bytes: int
    total_bytes: int
    recompute: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_params(config: ModelConfig, layers: range, first: bool, last: bool) -> tuple[int, int, int]:
    """(dense params, expert params, largest layer's dense params) of a stage."""
    from ernie45.parallel.pipeline import layer_costs

    c = config
    experts_per_layer = c.moe_num_experts * 3 * c.hidden_size * c.moe_intermediate_size if c.is_moe else 0
    costs = layer_costs(c)
    dense, expert, largest = 0, 0, 0
    for i in layers:
        e = experts_per_layer if c.is_moe_layer(i) else 0
        dense += costs[i] - e
        expert += e
        largest = max(largest, costs[i] - e)
    embed = c.vocab_size * c.hidden_size
    if first:
        dense += embed
    if last:
        dense += c.hidden_size + (embed if c.tie_word_embeddings and not first else 0) + \
            (0 if c.tie_word_embeddings else embed)
    return dense, expert, largest


def train_memory(config: ModelConfig, layout: TrainLayout, micro_batch: int, seq: int,
                 recompute: str | list[str] | tuple[str, ...] | None = None, dtype_bytes: int = 2,
                 microbatches: int | None = None, device: str = "gpu", mixed_precision: bool | None = None
                 ) -> TrainMemory:
    """Per-rank memory of one training layout: fp32 masters, grads and AdamW moments sharded by the
    layout; activations of ``micro_batch`` x ``seq`` tokens per micro-batch with 1F1B's in-flight count;
    a bf16 gathered copy of two layers under FSDP mixed precision; process overhead."""
    from ernie45.parallel.pipeline import split_layers

    layout.validate(config)
    kinds = _parse(recompute)
    m = microbatches or layout.pp
    bounds = split_layers(config, layout.pp)
    tokens = micro_batch * seq
    mixed = dtype_bytes < 4 if mixed_precision is None else mixed_precision
    best: TrainMemory | None = None
    for s, layers in enumerate(bounds):
        first, last = s == 0, s == layout.pp - 1
        dense, expert, largest = _stage_params(config, layers, first, last)
        local = math.ceil(dense / layout.data_ranks) + expert // layout.ep
        weights, grads, optim = 4 * local, 4 * local, 8 * local
        gathered = 2 * largest * dtype_bytes if layout.data_ranks > 1 and layout.fsdp > 1 else 0
        if mixed and layout.fsdp <= 1:
            gathered += dense * dtype_bytes  # autocast keeps 16-bit copies of the weights it casts
        in_flight = min(layout.pp - s, m)
        act = stage_activation_bytes(config, layers, tokens, dtype_bytes, kinds, last, in_flight, first, m)
        overhead = GPU_OVERHEAD if device == "gpu" else CPU_OVERHEAD
        total = weights + grads + optim + act + gathered + overhead
        mem = TrainMemory(asdict(layout), layout.gpus, s, [layers.start, layers.stop], weights, grads, optim, act,
                          gathered, overhead, total, list(kinds))
        if best is None or mem.total_bytes > best.total_bytes:
            best = mem
    assert best is not None
    return best


def candidate_train_layouts(config: ModelConfig, max_gpus: int = 512) -> list[TrainLayout]:
    """Power-of-two layouts by GPU count: ep up to the expert count (and 64), fsdp = data ranks."""
    out = []
    pp = 1
    while pp <= min(config.num_hidden_layers, max_gpus):
        ep = 1
        while ep <= (min(config.moe_num_experts, 64) if config.is_moe else 1):
            data = ep
            while pp * data <= max_gpus:
                lay = TrainLayout(pp=pp, ep=ep, fsdp=data)
                try:
                    lay.validate(config)
                    out.append(lay)
                except ValueError:
                    pass
                data *= 2
            ep *= 2
        pp *= 2
    return sorted(out, key=lambda lay: (lay.gpus, lay.pp, -lay.ep))


@dataclass
class LayoutFit:
    device: str
    name: str
    usable_bytes: int
    layout: dict[str, int] | None
    gpus: int | None
    per_gpu_total_bytes: int | None


def smallest_layouts(config: ModelConfig, micro_batch: int, seq: int,
                     recompute: str | list[str] | tuple[str, ...] | None = "full", dtype_bytes: int = 2,
                     devices: list[Device] | None = None, utilization: float = DEFAULT_UTILIZATION,
                     ) -> list[LayoutFit]:
    """For each GPU kind: the fewest GPUs (then the least memory per GPU) of a pp x ep x fsdp layout
    whose busiest rank fits."""
    out = []
    layouts = candidate_train_layouts(config)
    for dev in devices if devices is not None else [d for d in catalogue() if d.kind == "gpu"]:
        usable = int(dev.memory_bytes * utilization)
        found = None
        for lay in layouts:
            if lay.gpus > dev.max_count or (found is not None and lay.gpus > found.gpus):
                break
            mem = train_memory(config, lay, micro_batch, seq, recompute, dtype_bytes)
            if mem.total_bytes <= usable and (found is None or mem.total_bytes < found.total_bytes):
                found = mem
        out.append(LayoutFit(dev.key, dev.name, usable, found.layout if found else None,
                             found.gpus if found else None, found.total_bytes if found else None))
    return out


def format_train_plan(mem: TrainMemory, fits: list[LayoutFit]) -> str:
    gib = 1024**3
    lay = mem.layout
    lines = [f"training layout pp={lay['pp']} ep={lay['ep']} fsdp={lay['fsdp']} ({mem.gpus} GPUs), recompute "
             f"{'+'.join(mem.recompute) or 'none'}; busiest rank: stage {mem.stage} (layers {mem.layers[0]}.."
             f"{mem.layers[1] - 1})",
             "per rank                GiB"]
    for k in ("weights_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes", "transient_weight_bytes",
              "overhead_bytes", "total_bytes"):
        lines.append(f"  {k.removesuffix('_bytes').replace('_', ' '):<20}{getattr(mem, k) / gib:>8.2f}")
    lines += ["", "smallest training layout per GPU kind (same micro-batch and recompute)"]
    for f in fits:
        where = "does not fit in 512" if f.layout is None else \
            f"{f.gpus} GPUs: pp={f.layout['pp']} ep={f.layout['ep']} fsdp={f.layout['fsdp']} " \
            f"({f.per_gpu_total_bytes / gib:.1f} GiB/GPU)"
        lines.append(f"  {f.name:<28} {where}")
    return "\n".join(lines)
