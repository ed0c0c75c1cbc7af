"""``quantize_model``: swap a model's linears and stacked experts for quantized ones, by name.

Which module gets which scheme (``QuantConfig.scheme_for``): a matching rule first, else routed experts
(``*.mlp.experts``) -> ``experts``; ``lm_head`` -> ``head`` (None keeps it); every other ``nn.Linear``
(attention, dense MLP, shared experts, MTP projection) -> ``dense``.
The router ``mlp.gate`` (an fp32 ``Router``, not a Linear), norms and
embeddings are never touched: routing decisions and the residual stream stay exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ernie45.model.moe import Experts
from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight
from ernie45.quant.scheme import QuantConfig, TensorScheme

log = logging.getLogger(__name__)


def plan_modules(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Module, TensorScheme]]:
    """(qualified name, module, scheme) of every module that the config quantizes."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            continue
        if isinstance(m, Experts):
            gate_up, down = (config.scheme_for(f"{name}.{w}", "experts") for w in ("gate_up_proj", "down_proj"))
            if (gate_up is None) != (down is None):
                raise ValueError(f"{name}: the rules quantize one of gate_up_proj / down_proj but not the other; "
                                 f"an expert stack is quantized whole or not at all")
            if gate_up is not None:
                yield name, m, gate_up
        elif isinstance(m, nn.Linear):
            scheme = config.scheme_for(name, "head" if name == "lm_head" else "dense")
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
    calibration: token ids [B, T] for ``method="gptq"`` (the hessians of every layer's inputs).
    """
    if isinstance(config, str):
        config = QuantConfig.from_name(config)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quant_config.describe()}); load the "
                         f"full-precision checkpoint to quantize it with another scheme")
    todo = list(plan_modules(model, config))
    hess = None
    if not build_only and any(s.method == "gptq" for _, _, s in todo):
        if calibration is None:
            raise ValueError("method='gptq' needs calibration=token_ids [batch, seq] to measure layer inputs")
        from ernie45.quant.gptq import collect_hessians

        hess = collect_hessians(model, calibration)
    bar = tqdm(todo, desc="quantizing", unit="module", disable=None if progress is None else not progress)
    for name, m, scheme in bar:
        try:
            if hess is not None and scheme.method == "gptq":
                if isinstance(m, Experts) and config.scheme_for(f"{name}.down_proj", "experts") != scheme:
                    raise ValueError("gptq quantizes an expert stack with one scheme; drop the down_proj rule")
                new = _quantize_gptq(name, m, scheme, dtype, hess)
            elif isinstance(m, Experts):
                w = m.gate_up_proj
                e, two_i, h = w.shape
                dt = dtype or w.dtype
                down = config.scheme_for(f"{name}.down_proj", "experts")
                new = (QuantExperts(e, h, two_i // 2, scheme, dt, w.device, down) if build_only
                       else QuantExperts.from_experts(m, scheme, dt, down))
            else:
                dt = dtype or m.weight.dtype
                new = (QuantLinear(m.in_features, m.out_features, scheme, m.bias is not None, dt, m.weight.device)
                       if build_only else QuantLinear.from_linear(m, scheme, dt))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        _set_module(model, name, new)
    model.quant_config = config
    log.info("quantized %d modules (%s)", len(todo), config.describe())
    return model


def _quantize_gptq(name: str, m: nn.Module, scheme: TensorScheme, dtype: torch.dtype | None,
                   hess: dict[str, torch.Tensor]) -> nn.Module:
    from ernie45.quant.gptq import quantize_gptq

    if isinstance(m, Experts):
        e, two_i, h = m.gate_up_proj.shape
        new = QuantExperts(e, h, two_i // 2, scheme, dtype or m.gate_up_proj.dtype, m.gate_up_proj.device)
        for i in range(e):
            for proj in ("gate_up_proj", "down_proj"):
                qw = getattr(new, proj)
                w = getattr(m, proj)[i].detach()
                qw.set(i, *quantize_gptq(w, hess.get(f"{name}.{proj}.{i}"), scheme.bits, qw.group))
        return new
    new = QuantLinear(m.in_features, m.out_features, scheme, m.bias is not None, dtype or m.weight.dtype,
                      m.weight.device)
    new.set(None, *quantize_gptq(m.weight.detach(), hess.get(name), scheme.bits, new.group))
    if m.bias is not None:
        with torch.no_grad():
            new.bias.copy_(m.bias)
    return new


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
