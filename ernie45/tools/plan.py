"""The hardware planner: memory one GPU needs to run (or train) an ERNIE 4.5 model, and which GPUs fit it.

Per GPU: weights (formats.py / weights.py) + KV cache (``ModelConfig.kv_bytes_per_token``, the same
function the engine sizes its cache with) + activations and workspace at the largest step + gradients and
optimizer state when training + framework overhead. The figures are checked against memory measured on
this machine in ``tests/tools``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ernie45.config import ModelConfig
from ernie45.tools.formats import (
    CANONICAL_FLOAT,
    FLOAT_BYTES,
    WeightFormat,
    kv_dtype_bytes,
    parse_weight_format,
    quant_format,
)
from ernie45.tools.hardware import DEFAULT_UTILIZATION, Device, MiB, catalogue
from ernie45.tools.weights import Parallel, tensor_inventory, weight_bytes

Mode = Literal["inference", "full", "lora"]

# Framework overhead per process. GPU: the CUDA context with torch's kernels loaded and cuBLAS workspaces
# (~0.5-0.7 GiB on Hopper), plus NCCL's buffers when there is more than one rank. CPU: the Python
# interpreter with torch and ernie45 imported (219 MiB RSS measured here) plus the one-time cost of the
# first load_model call (lazy imports: 42 MiB measured; the meta build runs no initialiser, which would import
# torch._dynamo and triton for another ~110 MiB), rounded up.
GPU_CONTEXT_BYTES = 768 * MiB
NCCL_BYTES = 512 * MiB
CPU_PROCESS_BYTES = 272 * MiB
# AdamW keeps two fp32 moments per trainable parameter; mixed precision also keeps an fp32 master copy.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "none": 0}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""ernie45.train.lora's default targets besides the routed experts (which are adapted too)."""


def checkpoint_quant_config(model: str | os.PathLike | ModelConfig):  # noqa: ANN201 - QuantConfig | None
    """The ernie45.quant scheme stored in a quantized checkpoint folder's metadata, else None."""
    if isinstance(model, ModelConfig) or not os.path.isdir(os.fspath(model)):
        return None
    from ernie45.model.checkpoint import CheckpointError, index_checkpoint
    from ernie45.quant.scheme import METADATA_KEY, QuantConfig

    try:
        _, meta = index_checkpoint(os.fspath(model))
    except CheckpointError:  # a folder with only config.json: nothing to read
        return None
    return QuantConfig.from_json(meta[METADATA_KEY], os.fspath(model)) if METADATA_KEY in meta else None


def load_config(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A preset name, a checkpoint folder / config.json, or a ModelConfig."""
    if isinstance(model, ModelConfig):
        return model
    from ernie45.resolve import model_config

    return model_config(model)


@dataclass
class PlanRequest:
    """What to plan for. Sizes are tokens and sequences; parallel sizes are GPU counts."""

    weights: str | None = None
    """Weight format: fp32, bf16, fp16, fp8, int8, int4, int2, wint8, wint4, wint2, int<b>-g<N>[-asym];
    None = a checkpoint folder's own format (its ernie45.quant scheme, or its torch_dtype), else bf16."""
    dtype: str | None = None
    """Compute dtype: activations, and the tensors a quantized format keeps in full precision; None = the
    weights' own float type (fp32 for fp32 weights), else bf16."""
    kv_dtype: str | None = None
    """KV-cache element type (bf16, fp16, fp32, fp8, int8); None = the compute dtype."""
    context: int = 4096
    """Tokens per sequence (prompt + generated)."""
    batch: int = 1
    """Concurrent sequences (inference) or sequences per micro-batch (training)."""
    tp: int = 1
    ep: int = 1
    pp: int = 1
    mode: Mode = "inference"
    """inference | full (full fine-tuning) | lora."""
    optimizer: str = "adamw"
    """Training optimizer: adamw (8 B/param of state), sgd (momentum, 4 B/param) or none."""
    master_weights: bool = True
    """Mixed precision keeps an fp32 copy of the trainable weights when dtype is 16-bit."""
    lora_rank: int = 16
    gradient_checkpointing: bool = True
    """Training keeps only each layer's input and recomputes the rest in backward."""
    prefill_chunk: int = 2048
    """Tokens per forward step at most (chunked prefill): LLMEngine's max_num_batched_tokens default."""
    block_size: int = 16
    """KV-cache page size in tokens (LLMEngine's default); each sequence rounds up to whole pages."""
    quantize_head: bool | None = None
    """None: the format's rule for the LM head (full precision except ernie45.quant's int8/int4/int2,
    which quantize it int8); True / False force it quantized / full precision."""
    mtp: bool = False
    """Count the MTP draft block (weights and its KV cache slot)."""
    device: Literal["gpu", "cpu"] = "gpu"
    """Which overhead to add: a CUDA process or a CPU process."""

    def resolved(self) -> PlanRequest:
        """A copy with dtype and kv_dtype filled in."""
        dtype = self.dtype
        if dtype is None:
            fmt = parse_weight_format(self.weights or "bf16")
            dtype = "bf16" if fmt.quantized else fmt.full.name
        dtype = CANONICAL_FLOAT.get(dtype.lower(), dtype.lower())
        return replace(self, dtype=dtype, kv_dtype=(self.kv_dtype or dtype).lower())

    def validate(self, config: ModelConfig) -> None:
        for name in ("context", "batch", "prefill_chunk", "block_size", "lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.context > config.max_position_embeddings:
            raise ValueError(f"context={self.context} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        if self.mode not in ("inference", "full", "lora"):
            raise ValueError(f"mode={self.mode!r}: choose inference, full or lora")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {sorted(OPTIMIZER_STATE_BYTES)}")
        if self.dtype is None or self.dtype.lower() not in FLOAT_BYTES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {sorted(FLOAT_BYTES)}")
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"device={self.device!r}: choose gpu or cpu")
        Parallel(self.tp, self.ep, self.pp).validate(config)


@dataclass
class DeviceFit:
    """Whether one catalogue device holds the plan, and the fewest of it that would."""

    device: str
    name: str
    memory_bytes: int
    usable_bytes: int
    fits_as_configured: bool
    """The per-GPU total of the requested layout fits one of these."""
    min_gpus: int | None
    """Fewest devices (a power of two: tensor parallel within 8, pipeline beyond) that hold it."""
    layout: dict[str, int] | None = None
    per_gpu_total_bytes: int | None = None


@dataclass
class MemoryPlan:
    """Per-GPU memory of one request, and where it fits. All *_bytes figures are per GPU unless named
    *_total_bytes."""

    model: str
    mode: str
    weights_format: str
    kv_dtype: str
    context: int
    batch: int
    parallel: dict[str, int]
    params: int
    active_params: int
    kv_bytes_per_token: int
    """Whole model, all layers: ModelConfig.kv_bytes_per_token(kv dtype bytes)."""
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    overhead_bytes: int
    total_bytes: int
    weights_total_bytes: int
    """One full copy of the weights (all GPUs together)."""
    weights_by_kind: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    fits: list[DeviceFit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- pieces
def kv_cache_bytes(config: ModelConfig, req: PlanRequest, par: Parallel) -> int:
    """KV cache on the busiest GPU: its pipeline stage's layers, its share of KV heads, its sequences."""
    kvb = kv_dtype_bytes(req.kv_dtype)
    layers = max(len(r) for r in par.stages(config.num_hidden_layers))
    if req.mtp and config.num_nextn_predict_layers and len(par.stages(config.num_hidden_layers)[-1]) == layers:
        layers += 1  # the MTP block keeps its own cache slot on the last stage (model.py)
    heads = math.ceil(config.num_key_value_heads / par.tp)
    # One code path with the engine: everything derives from ModelConfig.kv_bytes_per_token.
    per_layer_head = config.kv_bytes_per_token(kvb) // (config.num_hidden_layers * config.num_key_value_heads)
    tokens = math.ceil(req.context / req.block_size) * req.block_size
    return per_layer_head * layers * heads * tokens * req.batch


def _layer_live_elems(config: ModelConfig, t: int, par: Parallel, moe: bool) -> tuple[int, int]:
    """(model-dtype elements, fp32 elements) alive at the peak of one layer's forward over t tokens."""
    c = config
    tp = par.tp
    h, d = c.hidden_size, c.head_dim
    nq, nkv = c.num_attention_heads // tp, math.ceil(c.num_key_value_heads / tp)
    residual = 2 * t * h  # the stream and its normed copy
    attn = t * (2 * nq + 2 * nkv) * d  # q, k, v and the attention output (flash-style: no T x T scores)
    if not moe:
        return residual + max(attn, 3 * t * c.intermediate_size // tp), 0
    s = t * c.moe_k  # token-expert pairs
    w = math.ceil(c.moe_intermediate_size / tp)
    routed = 2 * s * h + 3 * s * w  # gathered inputs and outputs, gate|up and the activation
    shared = 3 * t * c.shared_intermediate_size // tp + t * h
    return residual + max(attn, routed + shared), 2 * t * c.moe_num_experts  # router logits and probs


def activation_bytes(config: ModelConfig, req: PlanRequest, par: Parallel) -> int:
    """Peak activations and workspace of the largest step on one GPU.

    Inference: one prefill chunk of min(prefill_chunk, batch x context) tokens through the widest layer,
    or the logits of one row per sequence (model dtype + an fp32 copy for sampling), whichever is larger.
    Training: the whole micro-batch; with gradient checkpointing each
    layer keeps its input and one layer at a time is recomputed; the logits and their gradient are fp32.
    """
    ab = FLOAT_BYTES[req.dtype.lower()]
    kinds = {config.is_moe_layer(i) for i in range(config.num_hidden_layers)}
    layers = max(len(r) for r in par.stages(config.num_hidden_layers))
    v = config.vocab_size
    if req.mode == "inference":
        t = min(req.prefill_chunk, req.batch * req.context)
        peak = max(e * ab + f * 4 for e, f in (_layer_live_elems(config, t, par, m) for m in kinds))
        return max(peak, t * config.hidden_size * ab + req.batch * v * (ab + 4))
    t = req.batch * req.context
    one = max(e * ab + f * 4 for e, f in (_layer_live_elems(config, t, par, m) for m in kinds))
    if req.gradient_checkpointing:
        stored = layers * t * config.hidden_size * ab + 2 * one  # inputs + one layer's forward and backward
    else:
        stored = layers * one + one
    # Logits, their fp32 log-softmax and fp32 gradient; vocab-parallel cross entropy splits them over tp.
    return stored + t * math.ceil(v / par.tp) * (ab + 4 + 4)


def trainable_params(config: ModelConfig, req: PlanRequest, par: Parallel) -> tuple[int, int]:
    """(trainable parameters in all, on the busiest GPU).

    LoRA adapts what ``ernie45.train.lora`` adapts by default: q/k/v/o and the gate/up/down projections
    (dense and shared MLPs), rank x (in + out) per matrix, and every routed expert with its own pair for
    gate_up [2I, H] and down [H, I].
    """
    if req.mode == "inference":
        return 0, 0
    if req.mode == "full":
        f32 = parse_weight_format("fp32")
        wb = weight_bytes(config, f32, par, mtp=req.mtp)
        return wb.total_bytes // 4, wb.per_gpu_bytes // 4
    r = req.lora_rank
    stages = par.stages(config.num_hidden_layers)
    total, per_stage = 0, [0] * par.pp
    for spec in tensor_inventory(config, mtp=req.mtp):
        if spec.kind == "experts":
            e, rows, cols = spec.shape
            n = e * r * (rows + cols)
            # The pair of each of its E/ep experts; the factor on the width axis is cut by tp.
            width, other = (rows, cols) if spec.name.endswith("gate_up_proj") else (cols, rows)
            shard = e // par.ep * r * (other + math.ceil(width / par.tp))
        elif spec.kind == "linear" and spec.name.rsplit(".", 2)[-2] in LORA_TARGETS:
            rows, cols = spec.shape
            n = r * (rows + cols)
            # A and B: the factor along the base matrix's split axis is cut, the other one replicated.
            cut = rows if spec.split in ("rows", "kv_rows") else cols if spec.split == "cols" else 0
            shard = n - r * (cut - math.ceil(cut / par.tp))
        else:
            continue
        total += n
        layer = spec.layer if spec.layer is not None and spec.layer < config.num_hidden_layers else None
        stage = par.pp - 1 if layer is None else next(s for s, rg in enumerate(stages) if layer in rg)
        per_stage[stage] += shard
    return total, max(per_stage)


def overhead_bytes(req: PlanRequest, par: Parallel) -> int:
    if req.device == "cpu":
        return CPU_PROCESS_BYTES
    return GPU_CONTEXT_BYTES + (NCCL_BYTES if par.gpus > 1 else 0)


# ------------------------------------------------------------------------------------------ the plan
def _per_gpu(config: ModelConfig, req: PlanRequest, fmt: WeightFormat, par: Parallel) -> dict[str, int]:
    wb = weight_bytes(config, fmt, par, quantize_head=req.quantize_head, mtp=req.mtp)
    _, train_gpu = trainable_params(config, req, par)
    half = FLOAT_BYTES[req.dtype.lower()] < 4
    if req.mode == "full":
        grads = wb.per_gpu_bytes
        state = train_gpu * (OPTIMIZER_STATE_BYTES[req.optimizer] + (4 if half and req.master_weights else 0))
    elif req.mode == "lora":  # adapters train in fp32 whatever the base's format
        grads = train_gpu * 4
        state = train_gpu * (4 + OPTIMIZER_STATE_BYTES[req.optimizer])
    else:
        grads = state = 0
    out = {
        "weights_bytes": wb.per_gpu_bytes,
        "kv_cache_bytes": kv_cache_bytes(config, req, par) if req.mode == "inference" else 0,
        "activation_bytes": activation_bytes(config, req, par),
        "gradient_bytes": grads,
        "optimizer_bytes": state,
        "overhead_bytes": overhead_bytes(req, par),
        "weights_total_bytes": wb.total_bytes,
    }
    out["total_bytes"] = sum(v for k, v in out.items() if k != "weights_total_bytes")
    out["_by_kind"] = wb.by_kind  # type: ignore[assignment]
    return out


def candidate_layouts(config: ModelConfig, max_gpus: int = 512, node: int = 8) -> list[Parallel]:
    """One layout per power-of-two GPU count: tensor parallel up to ``node`` GPUs (the largest power of
    two ernie45.parallel accepts for the model), pipeline stages beyond that."""

    def valid(par: Parallel) -> bool:
        try:
            par.validate(config)
        except ValueError:
            return False
        return True

    out = []
    n = 1
    while n <= max_gpus:
        tp = 1
        while tp * 2 <= min(n, node) and valid(Parallel(tp=tp * 2)):
            tp *= 2
        pp = n // tp
        if pp <= config.num_hidden_layers:
            out.append(Parallel(tp=tp, pp=pp))
        n *= 2
    return out


def fit_device(config: ModelConfig, req: PlanRequest, fmt: WeightFormat, device: Device,
               utilization: float = DEFAULT_UTILIZATION) -> DeviceFit:
    """Does the requested layout fit ``device``; what is the fewest of it that holds the model. Each
    device is planned with its own overhead (a CUDA process on a GPU, a plain process in host RAM)."""
    usable = int(device.memory_bytes * utilization)
    req = replace(req, device=device.kind)
    requested = Parallel(req.tp, req.ep, req.pp)
    if device.kind == "cpu":  # one host: the plan as a single CPU process
        total = _per_gpu(config, req, fmt, Parallel())["total_bytes"]
        ok = total <= usable
        return DeviceFit(device.key, device.name, device.memory_bytes, usable, ok and requested.gpus == 1,
                         1 if ok else None, asdict(Parallel()) if ok else None, total)
    as_configured = _per_gpu(config, req, fmt, requested)["total_bytes"]
    fit = DeviceFit(device.key, device.name, device.memory_bytes, usable, as_configured <= usable, None)
    for par in candidate_layouts(config, device.max_count):
        total = _per_gpu(config, req, fmt, par)["total_bytes"]
        if total <= usable:
            fit.min_gpus, fit.layout, fit.per_gpu_total_bytes = par.gpus, asdict(par), total
            break
    return fit


def plan_memory(model: str | os.PathLike | ModelConfig, request: PlanRequest | None = None,
                devices: list[Device] | None = None, utilization: float = DEFAULT_UTILIZATION,
                **overrides: Any) -> MemoryPlan:
    """Plan memory for ``model`` (preset name, checkpoint folder or ModelConfig).

    request: a PlanRequest; keyword overrides set its fields (``plan_memory("ernie-4.5-21b-a3b",
    weights="int4", context=32768)``). devices: the catalogue to fit against (default: the built-in GPUs
    and this machine's RAM). utilization: the fraction of each device the model may use.
    """
    config = load_config(model)
    known = set(PlanRequest.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"plan_memory got unknown option(s) {unknown}; known: {sorted(known)}")
    req = PlanRequest(**{**(asdict(request) if request else {}), **overrides})
    qc = checkpoint_quant_config(model) if req.weights is None else None
    if req.weights is None:  # the checkpoint's own format
        folder = not isinstance(model, ModelConfig) and os.path.isdir(os.fspath(model))
        stored = CANONICAL_FLOAT.get(config.torch_dtype, config.torch_dtype) if folder else "bf16"
        req = replace(req, weights=qc.name if qc else stored if stored in FLOAT_BYTES else "bf16",
                      dtype=req.dtype or (stored if qc and stored in FLOAT_BYTES else None))
    req = req.resolved()
    req.validate(config)
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization={utilization} must be in (0, 1]")
    fmt = quant_format(qc, req.dtype) if qc else parse_weight_format(req.weights, req.dtype)
    if req.mode == "full" and fmt.quantized:
        raise ValueError(f"full fine-tuning needs float weights, not {req.weights!r}; use --mode lora to train "
                         f"adapters on a quantized base")
    par = Parallel(req.tp, req.ep, req.pp)
    g = _per_gpu(config, req, fmt, par)
    kvb = kv_dtype_bytes(req.kv_dtype)
    name = model if isinstance(model, str) else os.fspath(model) if not isinstance(model, ModelConfig) else "config"
    head = {None: "", True: "+head", False: "-head"}[req.quantize_head]
    plan = MemoryPlan(
        model=name, mode=req.mode, weights_format=fmt.name + head,
        kv_dtype=req.kv_dtype, context=req.context, batch=req.batch,
        parallel={**asdict(par), "gpus": par.gpus}, params=config.num_params(include_mtp=req.mtp),
        active_params=config.num_active_params(), kv_bytes_per_token=config.kv_bytes_per_token(kvb),
        weights_bytes=g["weights_bytes"], kv_cache_bytes=g["kv_cache_bytes"],
        activation_bytes=g["activation_bytes"], gradient_bytes=g["gradient_bytes"],
        optimizer_bytes=g["optimizer_bytes"], overhead_bytes=g["overhead_bytes"], total_bytes=g["total_bytes"],
        weights_total_bytes=g["weights_total_bytes"], weights_by_kind=g["_by_kind"],
        trainable_params=trainable_params(config, req, par)[0],
    )
    for device in devices if devices is not None else catalogue():
        plan.fits.append(fit_device(config, req, fmt, device, utilization))
    return plan
