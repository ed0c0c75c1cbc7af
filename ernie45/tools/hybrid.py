"""Hybrid placement planner: routed experts on the GPU, in host RAM, or the first N MoE layers' on the GPU.

For a model, a weight format and a context it predicts, per placement (``gpu_experts = N`` of the model's
MoE layers keep their routed experts on the GPU; N = all is the plain placement, N = 0 is ``experts_on=cpu``):

- GPU memory: the non-expert weights (attention, shared experts, router, norms, embeddings, head) + the
  GPU layers' routed experts + the KV cache + activations + the CUDA context (the same pieces as
  ``plan_memory``, from ``tools/weights.py`` and ``tools/plan.py``);
- host RAM: the host layers' routed experts + the pinned exchange buffers (``ernie45.offload``: x, ids,
  weights and the result of the largest step) + the process; and the peak while loading (``load_model``
  with a placement reads the whole model into host RAM before moving the rest to the GPU);
- decode tok/s at batch 1 from the two bandwidths (a roofline: bytes / bandwidth, nothing else): per token
  the GPU reads the non-expert weights (one embedding row), the top-k of E experts' bytes of its MoE layers
  and the KV cache at the full context; the host reads the top-k of E experts' bytes of its layers. The host
  part is on the critical path (the GPU overlaps only the shared experts with it), so the times add.

``recommend_placement`` picks all-on-GPU if it fits, else the largest N that fits, else ``experts_on=cpu``,
and refuses with the missing bytes when even that does not fit.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ernie45.config import ModelConfig
from ernie45.tools.formats import FLOAT_BYTES, kv_dtype_bytes, parse_weight_format
from ernie45.tools.hardware import DEFAULT_UTILIZATION, Device, find_device
from ernie45.tools.plan import (
    CPU_PROCESS_BYTES,
    GPU_CONTEXT_BYTES,
    PlanRequest,
    activation_bytes,
    kv_cache_bytes,
    load_config,
)
from ernie45.tools.weights import Parallel, shard_bytes, storage_for, tensor_inventory

GPU_BANDWIDTH: dict[str, float] = {
    "h200": 4.8e12, "h20-141": 4.8e12, "h20": 4.0e12, "h100": 3.35e12, "a100-80": 2.039e12,
    "l40s": 0.864e12, "a100-40": 1.555e12, "rtx4090": 1.008e12,
}
"""HBM bandwidth per catalogue GPU (vendor data sheets, bytes/s; H100 is the SXM part)."""

DEFAULT_HOST_BANDWIDTH = 60e9
"""Host RAM read bandwidth the CPU experts reach by default (a dual-channel DDR5 desktop ~60-80 GB/s; an 8-12
channel server 200-400 GB/s): ``--host-bandwidth`` sets the machine's own (e.g. from ``mbw`` or STREAM)."""


class PlacementPlanError(ValueError):
    """No placement fits, or a bad option."""


def parse_bandwidth(value: float | int | str) -> float:
    """``60GB/s``, ``4.8TB/s``, ``200e9`` -> bytes per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise PlacementPlanError(f"bandwidth {value!r} must be positive")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMGT]i?B)?(?:/s)?\s*", str(value), flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise PlacementPlanError(f"bandwidth {value!r}: use bytes per second or a rate such as '60GB/s'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
            "TIB": 2**40}[unit]
    return float(m.group(1)) * mult


def parse_ram(value: int | str) -> int:
    """``128GB``, ``64GiB`` or bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(parse_bandwidth(str(value).replace("/s", "")))
    except PlacementPlanError:
        raise PlacementPlanError(f"ram={value!r}: use bytes or a size such as '128GB'") from None


@dataclass
class PlacementEstimate:
    """One placement's memory and roofline decode speed."""

    gpu_experts: int
    """MoE layers whose routed experts are on the GPU (the first ones)."""
    moe_layers: int
    gpu_bytes: int
    gpu_weights_bytes: int
    gpu_expert_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    host_bytes: int
    host_expert_bytes: int
    pinned_bytes: int
    host_load_peak_bytes: int
    """Host RAM while loading: the whole model is read into RAM, then the GPU part moves."""
    gpu_read_bytes_per_token: int
    host_read_bytes_per_token: int
    tok_s_batch1: float
    fits_gpu: bool
    fits_host: bool

    @property
    def name(self) -> str:
        if self.gpu_experts == self.moe_layers:
            return "all on GPU"
        return "experts_on=cpu" if self.gpu_experts == 0 else f"gpu_experts={self.gpu_experts}"

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


@dataclass
class PlacementPlan:
    model: str
    weights_format: str
    context: int
    batch: int
    gpu: str
    gpu_usable_bytes: int
    gpu_bandwidth: float
    ram_usable_bytes: int
    host_bandwidth: float
    placements: list[PlacementEstimate] = field(default_factory=list)
    """N = 0 .. moe_layers."""
    recommended: PlacementEstimate | None = None

    def by_n(self, n: int) -> PlacementEstimate:
        return self.placements[n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_bytes(config: ModelConfig, req: PlanRequest) -> tuple[int, int, list[int]]:
    """(non-expert bytes, embedding-table bytes, routed-expert bytes of each MoE layer in order)."""
    fmt = parse_weight_format(req.weights, req.dtype)
    par = Parallel()
    rest = embed = 0
    experts: dict[int, int] = {}
    for spec in tensor_inventory(config, mtp=req.mtp):
        b = shard_bytes(spec, storage_for(spec, fmt, req.quantize_head), par, config)
        if spec.kind == "experts":
            experts[spec.layer] = experts.get(spec.layer, 0) + b
        else:
            rest += b
            if spec.kind == "embed":
                embed += b
    return rest, embed, [experts[i] for i in sorted(experts)]


def estimate_placements(model: str | os.PathLike | ModelConfig, *, weights: str = "bf16", context: int = 4096,
                        batch: int = 1, gpu: str | Device = "h200", ram: int | str | None = None,
                        gpu_bandwidth: float | str | None = None, host_bandwidth: float | str = DEFAULT_HOST_BANDWIDTH,
                        utilization: float = DEFAULT_UTILIZATION, dtype: str | None = None) -> PlacementPlan:
    """Every placement N = 0..moe_layers of ``model`` for one GPU of kind ``gpu`` and ``ram`` bytes of host RAM."""
    config = load_config(model)
    if not config.moe_num_experts:
        raise PlacementPlanError(f"{model}: a dense model has no routed experts to place in host RAM")
    device = gpu if isinstance(gpu, Device) else find_device(gpu)
    if device.kind != "gpu":
        raise PlacementPlanError(f"gpu={device.key!r} is the host's RAM, not a GPU; name a GPU (h200, h100, 24GB)")
    if gpu_bandwidth is None:
        if device.key not in GPU_BANDWIDTH:
            raise PlacementPlanError(f"no HBM bandwidth known for {device.name}; give gpu_bandwidth (e.g. '1TB/s')")
        gbw = GPU_BANDWIDTH[device.key]
    else:
        gbw = parse_bandwidth(gpu_bandwidth)
    hbw = parse_bandwidth(host_bandwidth)
    if not 0 < utilization <= 1:
        raise PlacementPlanError(f"utilization={utilization} must be in (0, 1]")
    from ernie45.tools.hardware import host_memory_bytes

    ram_b = parse_ram(ram) if ram is not None else host_memory_bytes()
    req = PlanRequest(weights=weights, dtype=dtype, context=context, batch=batch).resolved()
    req.validate(config)
    rest, embed, layer_experts = _layer_bytes(config, req)
    par = Parallel()
    kv = kv_cache_bytes(config, req, par)
    act = activation_bytes(config, req, par)
    act_b = FLOAT_BYTES[req.dtype]
    k, e = config.moe_k, config.moe_num_experts
    rows = min(req.prefill_chunk, req.context * req.batch)
    pinned = rows * (2 * config.hidden_size * act_b + k * (8 + act_b))  # x and y, ids (int64) and weights
    kv_read = config.kv_bytes_per_token(kv_dtype_bytes(req.kv_dtype)) * req.context
    token_row = embed // max(config.vocab_size, 1)
    gpu_usable, ram_usable = int(device.memory_bytes * utilization), int(ram_b * utilization)
    total_experts = sum(layer_experts)
    plan = PlacementPlan(str(model) if not isinstance(model, ModelConfig) else "config", req.weights, req.context,
                         req.batch, device.name, gpu_usable, gbw, ram_usable, hbw)
    for n in range(len(layer_experts) + 1):
        gpu_exp = sum(layer_experts[:n])
        host_exp = total_experts - gpu_exp
        gpu_total = rest + gpu_exp + kv + act + GPU_CONTEXT_BYTES
        host_total = host_exp + (pinned if n < len(layer_experts) else 0) + CPU_PROCESS_BYTES
        gpu_read = rest - embed + token_row + round(gpu_exp * k / e) + kv_read
        host_read = round(host_exp * k / e)
        seconds = gpu_read / gbw + host_read / hbw
        plan.placements.append(PlacementEstimate(
            gpu_experts=n, moe_layers=len(layer_experts), gpu_bytes=gpu_total, gpu_weights_bytes=rest + gpu_exp,
            gpu_expert_bytes=gpu_exp, kv_cache_bytes=kv, activation_bytes=act, host_bytes=host_total,
            host_expert_bytes=host_exp, pinned_bytes=pinned if n < len(layer_experts) else 0,
            host_load_peak_bytes=rest + total_experts + CPU_PROCESS_BYTES if n < len(layer_experts) else 0,
            gpu_read_bytes_per_token=gpu_read, host_read_bytes_per_token=host_read, tok_s_batch1=1.0 / seconds,
            fits_gpu=gpu_total <= gpu_usable,
            fits_host=max(host_total, rest + total_experts + CPU_PROCESS_BYTES if n < len(layer_experts) else 0)
            <= ram_usable))
    return plan


def recommend_placement(plan: PlacementPlan, placement: str | int = "auto") -> PlacementEstimate:
    """``auto``: all on the GPU if it fits, else the largest N that fits, else experts_on=cpu; ``gpu`` / ``cpu`` /
    an int N: that placement, checked. Raises ``PlacementPlanError`` naming what is short when nothing fits."""
    last = len(plan.placements) - 1
    if placement == "auto":
        for est in reversed(plan.placements):
            if est.fits:
                plan.recommended = est
                return est
        est = plan.placements[0]
        raise PlacementPlanError(_short(plan, est, "no placement fits: even with every routed expert in host RAM"))
    if placement == "gpu":
        n = last
    elif placement == "cpu":
        n = 0
    elif isinstance(placement, int) and not isinstance(placement, bool) or str(placement).isdigit():
        n = int(placement)
        if n > last:
            raise PlacementPlanError(f"gpu_experts={n} exceeds the model's {last} MoE layers; use 0..{last}")
    else:
        raise PlacementPlanError(f"placement={placement!r}: use auto, gpu, cpu or a number of GPU MoE layers")
    est = plan.placements[n]
    if not est.fits:
        raise PlacementPlanError(_short(plan, est, f"{est.name} does not fit"))
    plan.recommended = est
    return est


def _short(plan: PlacementPlan, est: PlacementEstimate, head: str) -> str:
    parts = []
    if not est.fits_gpu:
        parts.append(f"the GPU part needs {est.gpu_bytes / 1e9:.1f} GB of {plan.gpu_usable_bytes / 1e9:.1f} GB usable "
                     f"on {plan.gpu}")
    if not est.fits_host:
        need = max(est.host_bytes, est.host_load_peak_bytes)
        parts.append(f"host RAM needs {need / 1e9:.1f} GB (loading peak) of {plan.ram_usable_bytes / 1e9:.1f} GB "
                     "usable")
    return f"{head}: {'; '.join(parts)}. Use a smaller weight format, a shorter --context or a larger GPU / RAM."


def format_placements(plan: PlacementPlan) -> str:
    lines = [f"{plan.model}: weights {plan.weights_format}, context {plan.context:,} x batch {plan.batch}; "
             f"{plan.gpu} ({plan.gpu_usable_bytes / 1e9:.1f} GB usable, {plan.gpu_bandwidth / 1e12:.2f} TB/s), "
             f"host RAM {plan.ram_usable_bytes / 1e9:.1f} GB usable at {plan.host_bandwidth / 1e9:.0f} GB/s", "",
             "placement          GPU GB   host GB  load peak GB  GPU MB/tok  host MB/tok  tok/s@1 (roofline)  fits"]
    shown = {0, len(plan.placements) - 1}
    fitting = [p.gpu_experts for p in plan.placements if p.fits]
    shown |= {max(fitting)} if fitting else set()
    for p in plan.placements:
        if p.gpu_experts not in shown:
            continue
        lines.append(f"  {p.name:<16}{p.gpu_bytes / 1e9:>8.1f}{p.host_bytes / 1e9:>10.1f}"
                     f"{p.host_load_peak_bytes / 1e9:>14.1f}{p.gpu_read_bytes_per_token / 1e6:>12.0f}"
                     f"{p.host_read_bytes_per_token / 1e6:>13.0f}{p.tok_s_batch1:>20.1f}  "
                     f"{'yes' if p.fits else 'no'}")
    if plan.recommended is not None:
        r = plan.recommended
        flags = "" if r.gpu_experts == r.moe_layers else \
            " --experts-on cpu" if r.gpu_experts == 0 else f" --gpu-experts {r.gpu_experts}"
        lines += ["", f"recommended: {r.name} (ernie45 serve MODEL --device cuda{flags})"]
    return "\n".join(lines)
