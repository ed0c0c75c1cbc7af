"""Weight memory from the model's tensor list: every tensor of ``ErnieForCausalLM`` with its shape, the
storage a weight format gives it, and the share one GPU holds under tensor / expert / pipeline parallel.

The tensor list is built from ``ModelConfig`` arithmetic (no model is instantiated) and is tested to be
exactly the native model's state dict; its element count is ``ModelConfig.num_params``.

Parallel layout: the one ``ernie45.parallel`` runs (``mesh.py``: world = dp x ep x tp, tp innermost).
- ``tp`` splits attention heads, dense and shared MLP widths, the vocabulary (embeddings, LM head) and the
  width of every routed expert; KV heads are replicated when tp exceeds them (each rank keeps
  ceil(kv_heads / tp)).
- ``ep`` gives each rank moe_num_experts / ep whole experts; the attention and its KV cache are repeated
  on the ep ranks, which all see the same tokens in inference. A GPU holds 1 / (tp x ep) of the experts.
- ``pp`` cuts the decoder layers into contiguous stages (earlier stages take the remainder); the
  embeddings live on the first stage, the final norm, LM head and MTP block on the last. (ernie45.parallel
  has no pipeline parallelism yet; the planner answers for engines that do.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ernie45.config import ModelConfig
from ernie45.tools.formats import Storage, WeightFormat, float_storage

ROUTER = float_storage("fp32")  # router weight and correction bias stay fp32 (spec §3.1)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the native model."""

    name: str
    shape: tuple[int, ...]
    kind: str
    """embed | head | norm | bias | router | linear | experts"""
    layer: int | None
    """Decoder layer index; num_hidden_layers for the MTP block; None for embeddings/final norm/head."""
    split: str | None
    """How tensor parallel cuts it: rows | kv_rows | cols | experts | None (replicated)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Parallel:
    """Tensor, expert and pipeline parallel sizes."""

    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def stage_gpus(self) -> int:
        return self.tp * self.ep

    @property
    def gpus(self) -> int:
        return self.pp * self.stage_gpus

    def validate(self, config: ModelConfig) -> None:
        """Raise ValueError naming the size that does not fit the model: ernie45.parallel's own rules
        (``ParallelConfig.validate``), plus pp <= layers."""
        from ernie45.parallel.mesh import ParallelConfig

        if not isinstance(self.pp, int) or isinstance(self.pp, bool) or self.pp < 1:
            raise ValueError(f"pp={self.pp!r} must be a positive integer")
        ParallelConfig(ep=self.ep, tp=self.tp).validate(config)
        if self.pp > config.num_hidden_layers:
            raise ValueError(f"pp={self.pp} exceeds num_hidden_layers={config.num_hidden_layers}")

    def stages(self, num_layers: int) -> list[range]:
        """Contiguous layer ranges, one per pipeline stage."""
        base, extra = divmod(num_layers, self.pp)
        out, start = [], 0
        for s in range(self.pp):
            n = base + (1 if s < extra else 0)
            out.append(range(start, start + n))
            start += n
        return out


def tensor_inventory(config: ModelConfig, mtp: bool = False) -> list[TensorSpec]:
    """Every parameter and persistent buffer of ``ErnieForCausalLM(config)`` (a tied head once).

    mtp: include the MTP draft block when the config has one (checkpoints may or may not ship it).
    """
    c = config
    h, d, v = c.hidden_size, c.head_dim, c.vocab_size
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    out = [TensorSpec("model.embed_tokens.weight", (v, h), "embed", None, "rows")]

    def mlp(prefix: str, width: int, layer: int) -> None:
        out.append(TensorSpec(f"{prefix}.gate_proj.weight", (width, h), "linear", layer, "rows"))
        out.append(TensorSpec(f"{prefix}.up_proj.weight", (width, h), "linear", layer, "rows"))
        out.append(TensorSpec(f"{prefix}.down_proj.weight", (h, width), "linear", layer, "cols"))
        if c.use_bias:
            out.append(TensorSpec(f"{prefix}.gate_proj.bias", (width,), "bias", layer, "rows"))
            out.append(TensorSpec(f"{prefix}.up_proj.bias", (width,), "bias", layer, "rows"))
            out.append(TensorSpec(f"{prefix}.down_proj.bias", (h,), "bias", layer, None))

    def layer(prefix: str, i: int, moe: bool) -> None:
        a = f"{prefix}.self_attn"
        out.append(TensorSpec(f"{a}.q_proj.weight", (q, h), "linear", i, "rows"))
        out.append(TensorSpec(f"{a}.k_proj.weight", (kv, h), "linear", i, "kv_rows"))
        out.append(TensorSpec(f"{a}.v_proj.weight", (kv, h), "linear", i, "kv_rows"))
        out.append(TensorSpec(f"{a}.o_proj.weight", (h, q), "linear", i, "cols"))
        if c.use_bias:
            out.append(TensorSpec(f"{a}.q_proj.bias", (q,), "bias", i, "rows"))
            out.append(TensorSpec(f"{a}.k_proj.bias", (kv,), "bias", i, "kv_rows"))
            out.append(TensorSpec(f"{a}.v_proj.bias", (kv,), "bias", i, "kv_rows"))
            out.append(TensorSpec(f"{a}.o_proj.bias", (h,), "bias", i, None))
        if moe:
            e, w = c.moe_num_experts, c.moe_intermediate_size
            out.append(TensorSpec(f"{prefix}.mlp.gate.weight", (e, h), "router", i, None))
            out.append(TensorSpec(f"{prefix}.mlp.gate.e_score_correction_bias", (e,), "router", i, None))
            out.append(TensorSpec(f"{prefix}.mlp.experts.gate_up_proj", (e, 2 * w, h), "experts", i, "experts"))
            out.append(TensorSpec(f"{prefix}.mlp.experts.down_proj", (e, h, w), "experts", i, "experts"))
            if c.moe_num_shared_experts:
                mlp(f"{prefix}.mlp.shared_experts", c.shared_intermediate_size, i)
        else:
            mlp(f"{prefix}.mlp", c.intermediate_size, i)
        out.append(TensorSpec(f"{prefix}.input_layernorm.weight", (h,), "norm", i, None))
        out.append(TensorSpec(f"{prefix}.post_attention_layernorm.weight", (h,), "norm", i, None))

    for i in range(c.num_hidden_layers):
        layer(f"model.layers.{i}", i, c.is_moe_layer(i))
    out.append(TensorSpec("model.norm.weight", (h,), "norm", None, None))
    if mtp and c.num_nextn_predict_layers:
        m = c.num_hidden_layers  # the MTP block is dense (index 0 < moe start, spec §3.4)
        out.append(TensorSpec("model.mtp_emb_norm.0.weight", (h,), "norm", m, None))
        out.append(TensorSpec("model.mtp_hidden_norm.0.weight", (h,), "norm", m, None))
        out.append(TensorSpec("model.mtp_linear_proj.0.weight", (h, 2 * h), "linear", m, None))
        layer("model.mtp_block.0", m, False)
    if not c.tie_word_embeddings:
        out.append(TensorSpec("lm_head.weight", (v, h), "head", None, "rows"))
    if c.use_bias and c.is_moe:  # transformers' MoE class gives the head a bias (model.py)
        out.append(TensorSpec("lm_head.bias", (v,), "bias", None, "rows"))
    return out


def storage_for(spec: TensorSpec, fmt: WeightFormat, quantize_head: bool | None = None) -> Storage:
    """The storage ``fmt`` gives one tensor (the shared rule of the planner and ``ernie45.quant``).

    quantize_head: None = the format's own rule; True / False force the LM head quantized / full precision.
    """
    if spec.kind == "router":
        return ROUTER
    if fmt.quant is not None and spec.kind in ("linear", "experts", "head"):
        # ernie45.quant's own rule: the module's scheme by name and layer (QuantConfig.scheme_for)
        kind = {"linear": "dense", "experts": "experts", "head": "head"}[spec.kind]
        scheme = fmt.quant.scheme_for(spec.name.removesuffix(".weight"), kind)
        if spec.kind == "head" and quantize_head is not None:
            if not quantize_head:
                return fmt.full
            scheme = scheme or fmt.quant.scheme_for("lm_head", "dense") or fmt.quant.dense
        return fmt.scheme_storage(scheme)
    if spec.kind == "linear":
        return fmt.dense
    if spec.kind == "experts":
        return fmt.expert_storage(spec.layer if spec.layer is not None else 0)
    if spec.kind == "head":
        if quantize_head is None:
            return fmt.head or fmt.full
        return (fmt.head or fmt.dense) if quantize_head else fmt.full
    return fmt.full


def shard_bytes(spec: TensorSpec, storage: Storage, par: Parallel, config: ModelConfig) -> int:
    """Bytes of this tensor on one GPU of the layout."""
    shape = list(spec.shape)
    count = 1
    if spec.split == "rows":
        shape[0] = math.ceil(shape[0] / par.tp)
    elif spec.split == "kv_rows":  # whole KV heads; replicated once tp exceeds them
        shape[0] = math.ceil(config.num_key_value_heads / par.tp) * config.head_dim
    elif spec.split == "cols":
        shape[-1] = math.ceil(shape[-1] / par.tp)
    elif spec.split == "experts":
        count, rows, cols = shape
        count //= par.ep  # whole experts per ep rank, each cut by tp on its width
        if spec.name.endswith("gate_up_proj"):
            rows = math.ceil(rows / par.tp)
        else:
            cols = math.ceil(cols / par.tp)
        return storage.matrix_bytes(rows, cols, count)
    if len(shape) == 1:
        return storage.vector_bytes(shape[0])
    return storage.matrix_bytes(shape[0], shape[1])


@dataclass
class WeightBytes:
    """Weights of a model in a format: one copy in all, and the largest share one GPU holds."""

    total_bytes: int
    per_gpu_bytes: int
    by_kind: dict[str, int] = field(default_factory=dict)
    """One copy, split by tensor kind (embed, head, linear, experts, router, norm, bias)."""
    stage_bytes: list[int] = field(default_factory=list)
    """Per-GPU bytes of each pipeline stage."""


def weight_bytes(config: ModelConfig, fmt: WeightFormat, par: Parallel | None = None,
                 quantize_head: bool | None = None, mtp: bool = False) -> WeightBytes:
    """Bytes of every weight of ``config`` stored as ``fmt``, in all and on the busiest GPU of ``par``.

    A tied head that gets quantized becomes a tensor of its own (the embedding stays full precision),
    as ``ernie45.quant.quantize_model`` does.
    """
    par = par or Parallel()
    stages = par.stages(config.num_hidden_layers)
    per_stage = [0] * par.pp
    by_kind: dict[str, int] = {}
    total = 0
    specs = tensor_inventory(config, mtp=mtp)
    if config.tie_word_embeddings:
        head = TensorSpec("lm_head.weight", (config.vocab_size, config.hidden_size), "head", None, "rows")
        if storage_for(head, fmt, quantize_head).quantized:
            specs.append(head)
    for spec in specs:
        storage = storage_for(spec, fmt, quantize_head)
        full = shard_bytes(spec, storage, Parallel(), config)
        total += full
        by_kind[spec.kind] = by_kind.get(spec.kind, 0) + full
        if spec.kind == "embed":
            stage = 0
        elif spec.layer is None or spec.layer >= config.num_hidden_layers:
            stage = par.pp - 1
        else:
            stage = next(s for s, r in enumerate(stages) if spec.layer in r)
        per_stage[stage] += shard_bytes(spec, storage, par, config)
    return WeightBytes(total, max(per_stage), by_kind, per_stage)
