"""Quantization schemes: which bits, groups and method each class of weight gets.

Three classes of weight, following Baidu's deployed layouts (spec §5): the routed ``experts`` (the bulk of
an MoE model), the ``dense`` linears (attention, dense MLP, shared experts, MTP projection) which every token
reads, and the LM ``head``. The router ``mlp.gate``, the norms and the embeddings always stay in full
precision. The scheme is stored as JSON in the checkpoint metadata under ``ernie45.quant``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from ernie45.quant.math import check_bits

METADATA_KEY = "ernie45.quant"
METHODS = ("rtn", "mse", "hqq", "gptq")
Method = Literal["rtn", "mse", "hqq", "gptq"]


@dataclass(frozen=True)
class TensorScheme:
    """How one class of weight is quantized."""

    bits: int
    """Bits per weight code: 8, 6, 4 or 2."""
    group_size: int | None = 128
    """Input columns sharing one scale/offset; None = per output channel."""
    symmetric: bool = False
    """Zero exactly representable, no stored minimum (int8 uses it: the int8 kernel is symmetric)."""
    method: Method = "rtn"
    """rtn: round to nearest on the min/max grid; mse: data-free range search + least-squares refit of scale and
    offset; hqq: HQQ's lp zero-point optimisation (Badri & Shaji 2023); gptq: calibrated error feedback
    (needs ``quantize_model(..., calibration=ids)``)."""

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size={self.group_size}: use a multiple of 8 such as 32, 64 or 128, "
                             f"or None for per-channel")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {list(METHODS)}")
        if self.method != "rtn" and self.symmetric:
            raise ValueError(f"method={self.method!r} optimises offsets, so it needs symmetric=False")

    def group_for(self, k: int) -> int:
        """The group size used for a row of k columns: per-channel is k; a group wider than the row
        shrinks to the row (tiny models)."""
        return k if self.group_size is None else min(self.group_size, k)

    def bits_per_weight(self, k: int, scale_bytes: int = 2) -> float:
        """Storage bits per weight including scales (and offsets when asymmetric)."""
        per_group = (1 if self.symmetric else 2) * scale_bytes * 8
        return self.bits + per_group / self.group_for(k)

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'} {self.method}"


BASE: dict[int, TensorScheme] = {
    8: TensorScheme(8, None, symmetric=True),  # per-channel: torch's int8 kernel
    # An LM head option (head_bits=6): 6.5 bits a weight with bf16 scale and offset per 64, the size of llama.cpp's
    # Q6_K output in its Q4 files. On the test model it costs ~25% more next-token KL than the int8 head
    # (tests/quant/test_quality.py), so the presets keep int8 and 6 is the user's size/quality trade.
    6: TensorScheme(6, 64),
    4: TensorScheme(4, 128),  # torch's int4 kernel takes groups of 32..256
    # Baidu's 2-bit experts use groups of 64 (spec §5). Data-free default RTN, not mse/hqq: on our trained test
    # model their lower weight error gave a higher next-token KL; calibrated "gptq" beats all three
    # (tests/quant/test_quality.py records the table) but needs activations, so it is not an on-load default.
    2: TensorScheme(2, 64),
}
"""The default scheme for each bit width."""


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model scheme: experts, dense linears, and the LM head (None keeps it full precision)."""

    experts: TensorScheme
    dense: TensorScheme
    head: TensorScheme | None = None
    name: str = "custom"
    """The preset it came from ("int8", "int4", "int2"), for logs and the checkpoint's metadata."""

    @classmethod
    def from_name(cls, name: str, group_size: int | None | Literal["default"] = "default",
                  method: str | None = None, dense_bits: int | None = None,
                  head_bits: int | None | Literal["default"] = "default") -> QuantConfig:
        """A preset with optional overrides.

        int8: every linear int8 per-channel symmetric (FastDeploy's WINT8; runs on torch's int8 kernel).
        int4: int4 asymmetric groups of 128 (torch's int4 kernel); head int8.
        int2: experts 2-bit groups of 64, dense linears int4 g128, head int8: the
            mixed layout of Baidu's 2-bit release (experts low-bit, everything read per token higher).
        group_size / method override the main (expert) scheme, and the dense one when it has the same bits.
        method="gptq" (calibrated) also applies to dense linears of fewer than 8 bits, in the same format: the
        int2 preset's int4 attention and shared experts carry ~1/5 of its next-token KL on the demo model
        (benchmarks/results/2026-12-04-gptq-int2.md). int8 layers and the int8 head stay round-to-nearest
        (torch's symmetric int8 kernel; their error is ~100x smaller).
        dense_bits: bits for the dense linears (8, 6, 4 or 2). head_bits: bits for the LM head (8, 6, 4 or 2;
        6 = 6-bit groups of 64, llama.cpp's Q6_K size), None = bf16.
        """
        key = str(name).lower().removeprefix("w")
        presets = {"int8": (8, 8), "int4": (4, 4), "int2": (2, 4)}
        if key not in presets:
            raise ValueError(f"quant={name!r} is not a scheme; choose one of {sorted(presets)}")
        for what, b in (("dense_bits", dense_bits), ("head_bits", head_bits)):
            if b not in (None, 0, "default") and b not in BASE:
                raise ValueError(f"{what}={b!r} is not supported; choose 8, 6, 4 or 2")
        experts = BASE[presets[key][0]]
        dense = BASE[dense_bits if dense_bits else presets[key][1]]
        changes: dict[str, Any] = {}
        if group_size != "default":
            changes["group_size"] = group_size
        if method is not None:
            changes["method"] = method
        if changes:
            # int8 is symmetric only where torch's per-channel int8 kernel can run it.
            g = changes.get("group_size", experts.group_size)
            changes["symmetric"] = experts.bits == 8 and g is None and changes.get("method", "rtn") == "rtn"
            experts = dataclasses.replace(experts, **changes)
            if dense.bits == experts.bits:
                dense = experts
            elif method == "gptq" and dense.bits < 8:
                dense = dataclasses.replace(dense, method="gptq", symmetric=False)
        head = BASE[8] if head_bits == "default" else BASE[head_bits] if head_bits else None
        return cls(experts, dense, head, name=key)

    def to_json(self) -> str:
        return json.dumps({"version": 1, "name": self.name, "experts": dataclasses.asdict(self.experts),
                           "dense": dataclasses.asdict(self.dense),
                           "head": dataclasses.asdict(self.head) if self.head else None})

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> QuantConfig:
        try:
            raw = json.loads(text)
            if raw.get("version") != 1:
                raise ValueError(f"unknown scheme version {raw.get('version')!r}; a newer ernie45 wrote it")
            return cls(TensorScheme(**raw["experts"]), TensorScheme(**raw["dense"]),
                       TensorScheme(**raw["head"]) if raw.get("head") else None, name=raw.get("name", "custom"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{source}: metadata {METADATA_KEY!r} is not a valid quantization scheme ({e})"
                             ) from None

    def describe(self) -> str:
        head = self.head.describe() if self.head else "bf16"
        return f"{self.name}: experts {self.experts.describe()}, dense {self.dense.describe()}, head {head}"
