"""``quantize_model``: swap a model's linears and stacked experts for quantized ones, by name.

Which module gets which scheme (``QuantConfig``): routed experts (``*.mlp.experts``) -> ``experts``;
``lm_head`` -> ``head`` (None keeps it); every other ``nn.Linear`` (attention, dense MLP, shared experts,
MTP projection) -> ``dense``. The router ``mlp.gate`` (an fp32 ``Router``, not a Linear), norms and
embeddings are never touched: routing decisions and the residual stream stay exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ernie45.model.moe import Experts
from ernie45.quant.gptq import quantize_gptq
from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight, quantize_tensor
from ernie45.quant.scheme import QuantConfig, TensorScheme

log = logging.getLogger(__name__)


def plan_modules(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Module, TensorScheme]]:
    """(qualified name, module, scheme) of every module that the config quantizes."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            continue
        if isinstance(m, Experts):
            yield name, m, config.experts
        elif isinstance(m, nn.Linear):
            scheme = config.head if name == "lm_head" else config.dense
            if scheme is not None:
                yield name, m, scheme


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def quantize_model(model: nn.Module, config: QuantConfig | str, *, build_only: bool = False,
                   dtype: torch.dtype | None = None, progress: bool | None = None,
                   calibration: torch.Tensor | None = None) -> nn.Module:
    """Swap the model's linears and experts for quantized modules in place; returns the model.

    config: a ``QuantConfig`` or a preset name ("int8", "int4", "int2").
    build_only: allocate empty quantized modules (on the model's device, ``meta`` included) without
        quantizing; the loader fills them tensor by tensor.
    dtype: compute dtype of scales and activations (default: each module's weight dtype).
    progress: a bar over modules (None: only on a terminal).
    calibration: token ids [B, T] for ``method="gptq"``, text like what the model will see; the layers are
        calibrated one after another on them (``gptq.calibrate``). More tokens generalise better: on the demo
        model 512 / 2,048 / 8,192 tokens gave 2.5x / 3.0x / 4.0x lower held-out KL than round-to-nearest
        (benchmarks/results/2026-12-04-gptq-int2.md).
    """
    if isinstance(config, str):
        config = QuantConfig.from_name(config)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quant_config.describe()}); load the "
                         f"full-precision checkpoint to quantize it with another scheme")
    todo = list(plan_modules(model, config))
    if not build_only and any(s.method == "gptq" for _, _, s in todo):
        if calibration is None:
            raise ValueError("method='gptq' needs calibration=token_ids [batch, seq] to measure layer inputs")
        done = _calibrated(model, todo, calibration, dtype)
        todo = [t for t in todo if t[0] not in done]
    bar = tqdm(todo, desc="quantizing", unit="module", disable=None if progress is None else not progress)
    for name, m, scheme in bar:
        try:
            if build_only:
                new = _empty(m, scheme, dtype)
            elif scheme.method == "gptq":  # a module the calibration pass does not reach (the MTP block)
                log.warning("%s: no calibration activations reach it; quantized without them", name)
                new = _empty(m, scheme, dtype)
                for _, qw, w in _weights(m, new):
                    for i, w_NK in enumerate(w.detach().reshape(-1, qw.n, qw.k)):
                        qw.set(i if w.dim() == 3 else None, *quantize_gptq(w_NK, None, qw.bits, qw.group,
                                                                           grid_dtype=qw.dtype))
            elif isinstance(m, Experts):
                new = QuantExperts.from_experts(m, scheme, dtype or m.gate_up_proj.dtype)
            else:
                new = QuantLinear.from_linear(m, scheme, dtype or m.weight.dtype)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        _set_module(model, name, new)
    model.quant_config = config
    log.info("quantized %d modules (%s)", len(todo), config.describe())
    return model


def _empty(m: nn.Module, scheme: TensorScheme, dtype: torch.dtype | None) -> QuantLinear | QuantExperts:
    """An unfilled quantized module of ``m``'s shape (bias copied), on its device."""
    if isinstance(m, Experts):
        e, two_i, h = m.gate_up_proj.shape
        return QuantExperts(e, h, two_i // 2, scheme, dtype or m.gate_up_proj.dtype, m.gate_up_proj.device)
    new = QuantLinear(m.in_features, m.out_features, scheme, m.bias is not None, dtype or m.weight.dtype,
                      m.weight.device)
    if m.bias is not None and m.bias.device.type != "meta":
        with torch.no_grad():
            new.bias.copy_(m.bias)
    return new


def _weights(m: nn.Module, new: nn.Module) -> Iterator[tuple[str, QWeight, torch.Tensor]]:
    """(projection name, quantized weight, full-precision weight) pairs of a module and its quantized twin."""
    if isinstance(m, Experts):
        yield "gate_up_proj", new.gate_up_proj, m.gate_up_proj
        yield "down_proj", new.down_proj, m.down_proj
    else:
        yield "weight", new, m.weight


def _calibrated(model: nn.Module, todo: list[tuple[str, nn.Module, TensorScheme]], ids: torch.Tensor,
                dtype: torch.dtype | None) -> set[str]:
    """Quantize every module the calibration pass reaches (``gptq.calibrate``): GPTQ for ``method="gptq"``
    schemes, the data-free method of the others, in the forward's order so each GPTQ weight compensates the
    errors of everything quantized before it. Returns the names done (swapped into the model)."""
    from ernie45.quant.gptq import calibrate

    plan = {name: (m, scheme) for name, m, scheme in todo}
    built: dict[str, nn.Module] = {}

    def quantize_one(name: str, proj: str, m: nn.Module, hess, write_back: bool) -> None:  # noqa: ANN001
        scheme = plan[name][1]
        if name not in built:
            built[name] = _empty(m, scheme, dtype)
        new = built[name]
        qw, w = next((qw, w) for p, qw, w in _weights(m, new) if p == proj)
        stack = w.dim() == 3
        for i, w_NK in enumerate(w.detach().reshape(-1, qw.n, qw.k)):
            h = (hess[i] if stack else hess) if hess is not None else None
            if scheme.method == "gptq":
                parts = quantize_gptq(w_NK, h, qw.bits, qw.group, grid_dtype=qw.dtype)
            else:
                parts = quantize_tensor(w_NK, scheme)
            j = i if stack else None
            try:
                qw.set(j, *parts)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if write_back:
                with torch.no_grad():
                    w_NK.copy_(qw.dequantize(j, w.dtype))

    def finish(name: str) -> None:
        _set_module(model, name, built.pop(name))

    return calibrate(model, set(plan), ids, quantize_one, finish)


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized codes, scales, everything left in full precision)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def qweights(model: nn.Module) -> Iterator[tuple[str, QWeight]]:
    """Every quantized weight of a model by qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, QWeight):
            yield name, m
