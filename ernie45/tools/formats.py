"""Weight and KV-cache storage formats: how many bytes a tensor takes when stored a given way.

A *storage* describes one matrix ``[rows, cols]`` (torch ``[out, in]`` layout; quantization groups run
along ``cols``, the input features). A *weight format* says which storage each kind of tensor gets.
The rule shared with ``ernie45/quant``: only the projection matrices are quantized (attention, dense and
shared MLPs, routed experts); the router, its correction bias, the norms, the embeddings (and the LM head
unless asked) stay full precision. Quantized storage = packed bits + per-group scales (+ zero points when
asymmetric) + any per-row extras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bytes per element of the unquantized dtypes a user can name.
FLOAT_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
CANONICAL_FLOAT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# KV-cache element bytes: fp8 (e4m3) and int8 store one byte per element (static per-channel scales in
# FastDeploy's C8 cache are a few KB in all, below the planner's resolution).
KV_BYTES = {**FLOAT_BYTES, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class Storage:
    """How one ``[rows, cols]`` matrix is stored; ``cols`` is the quantization (input) axis."""

    name: str
    bits: int
    """Bits per weight element (packed along cols, each row rounded up to whole bytes)."""
    group_size: int | None = None
    """Weights along cols sharing one scale; None = the whole row (per output channel)."""
    scale_bits: int = 0
    """Bits of one group scale (16 for a bf16 scale; CCQ packs two 4-bit local scales per byte)."""
    zero_bits: int = 0
    """Bits of one group zero point (asymmetric schemes); 0 for symmetric."""
    block: int | None = None
    """Square blocks (block-wise fp8, 128x128) with one fp32 scale each, instead of row groups."""
    row_extra_bytes: int = 0
    """Bytes per output row besides the group scales (CCQ: bf16 super scale, fp32 code scale and zp)."""
    quantized: bool = True

    def matrix_bytes(self, rows: int, cols: int, count: int = 1) -> int:
        """Bytes of ``count`` stacked ``[rows, cols]`` matrices stored this way."""
        if not self.quantized:
            return count * rows * cols * self.bits // 8
        if self.block:
            blocks = math.ceil(rows / self.block) * math.ceil(cols / self.block)
            return count * (rows * cols * self.bits // 8 + blocks * 4)
        packed = rows * math.ceil(cols * self.bits / 8)
        groups = 1 if self.group_size is None else math.ceil(cols / self.group_size)
        meta = rows * math.ceil(groups * (self.scale_bits + self.zero_bits) / 8)
        return count * (packed + meta + rows * self.row_extra_bytes)

    def vector_bytes(self, n: int) -> int:
        """A 1-D tensor (norm weight, bias): only ever stored in a float format."""
        assert not self.quantized, "vectors are never quantized"
        return n * self.bits // 8


def float_storage(dtype: str) -> Storage:
    key = dtype.lower().removeprefix("torch.")
    if key not in FLOAT_BYTES:
        raise ValueError(f"dtype={dtype!r} is not a float storage; choose one of {sorted(FLOAT_BYTES)}")
    return Storage(CANONICAL_FLOAT.get(key, key), FLOAT_BYTES[key] * 8, quantized=False)


def int_storage(bits: int, group_size: int | None = None, asymmetric: bool = False, scale_bits: int = 16
                ) -> Storage:
    """Integer weight-only storage: codes + one scale per group (+ one zero point when asymmetric), both
    ``scale_bits`` wide (bf16 by default; ernie45.quant keeps them in the compute dtype)."""
    name = f"int{bits}" + (f"-g{group_size}" if group_size else "") + ("-asym" if asymmetric else "")
    return Storage(name, bits, group_size, scale_bits=scale_bits, zero_bits=scale_bits if asymmetric else 0)


# FastDeploy's WINT2 (CCQ) expert storage, read from its moe_expert_ffn_wint2 op and tests: weights
# uint8 [E, in/4, out] (4 per byte), local scales uint8 [E, in/128, out] (two 4-bit scales per byte, one
# per 64 inputs), per output channel a bf16 super scale and fp32 code_scale and code_zp.
CCQ2 = Storage("ccq2-g64", 2, group_size=64, scale_bits=4, row_extra_bytes=2 + 4 + 4)
FP8_BLOCK = Storage("fp8-b128", 8, block=128)


@dataclass(frozen=True)
class WeightFormat:
    """Which storage each kind of weight gets. The router and its correction bias are fp32 whatever the
    format (spec §3.1); embeddings and norms take ``full``."""

    name: str
    dense: Storage
    """Attention projections, dense MLPs, shared experts, the MTP projection and block."""
    experts: Storage
    """Routed experts."""
    full: Storage
    """Embeddings, norms, biases."""
    head: Storage | None = None
    """The LM head; None = full precision (a tied head then shares the embedding)."""
    expert_layers: tuple[tuple[int, int, Storage], ...] = field(default=())
    """(first layer, last layer, storage) overrides for routed experts."""
    description: str = ""
    quant: object = None
    """An ``ernie45.quant.QuantConfig`` whose ``scheme_for`` (class defaults and per-module/layer rules) picks the
    storage of every projection, the same rule ``quantize_model`` applies; None = dense/experts/head above."""
    fastdeploy: bool = False
    """With ``quant``: store schemes as FastDeploy does (symmetric per-channel bf16 scales; 2-bit as CCQ)."""

    def scheme_storage(self, scheme) -> Storage:  # noqa: ANN001 - ernie45.quant.TensorScheme | None
        """The storage of one scheme of ``quant`` (None: full precision)."""
        if scheme is None:
            return self.full
        if self.fastdeploy:
            return CCQ2 if scheme.bits == 2 else int_storage(scheme.bits, scheme.group_size)
        return scheme_storage(scheme, self.full.bits)

    @property
    def quantized(self) -> bool:
        return self.dense.quantized or self.experts.quantized

    def expert_storage(self, layer: int) -> Storage:
        for first, last, storage in self.expert_layers:
            if first <= layer <= last:
                return storage
        return self.experts


# Names a user can pass as --weights; int<b>[-g<N>][-asym] is parsed too (see parse_weight_format).
FORMAT_HELP = {
    "fp32": "every tensor fp32",
    "bf16": "every tensor bf16 (router fp32), as the checkpoints ship",
    "fp16": "every tensor fp16 (router fp32)",
    "fp8": "block-wise fp8 e4m3, 128x128 blocks with fp32 scales (FastDeploy block_wise_fp8)",
    "int8": "ernie45.quant int8: every projection and the head int8 per channel, symmetric",
    "int4": "ernie45.quant int4: projections int4 in groups of 128 with scale and offset, head int8",
    "int2": "ernie45.quant int2: experts 2-bit groups of 64 with scale and offset, dense int4 g128, head int8",
    "wint8": "FastDeploy WINT8: projections int8 per output channel, bf16 scales, head bf16",
    "wint4": "FastDeploy WINT4: projections int4 per output channel, bf16 scales, head bf16",
    "wint2": "Baidu's 2-bit release (spec §5): dense weights int8, experts of layers 0-6 int4, the rest "
             "CCQ 2-bit g64 (4-bit local scales), head bf16",
}
ALIASES = {"2bit": "wint2", "2-bit": "wint2", "w4w2": "wint2", "ccq": "wint2", "baidu-2bit": "wint2",
           "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8-block": "fp8"}
QUANT_PRESETS = ("int8", "int4", "int2")
"""Formats that are ernie45.quant's own presets: read from its QuantConfig, so the two never drift."""


def scheme_storage(scheme, scale_bits: int) -> Storage:  # noqa: ANN001 - ernie45.quant.TensorScheme
    """The storage ernie45.quant gives a TensorScheme: codes packed along K, and per group a scale and an
    offset in the compute dtype; only the symmetric per-channel int8 layout (torch's int8 kernel) stores
    no offsets."""
    offsets = not (scheme.bits == 8 and scheme.symmetric and scheme.group_size is None)
    return int_storage(scheme.bits, scheme.group_size, offsets, scale_bits)


def quant_format(scheme, dtype: str = "bf16") -> WeightFormat:  # noqa: ANN001 - str or QuantConfig
    """A WeightFormat from an ``ernie45.quant.QuantConfig`` or the name of one of its presets."""
    from ernie45.quant.scheme import QuantConfig

    qc = QuantConfig.from_name(scheme) if isinstance(scheme, str) else scheme
    name = scheme if isinstance(scheme, str) else f"checkpoint:{qc.name}"
    full = float_storage(dtype)
    return WeightFormat(name, scheme_storage(qc.dense, full.bits), scheme_storage(qc.experts, full.bits), full,
                        head=scheme_storage(qc.head, full.bits) if qc.head else None,
                        description=f"{FORMAT_HELP.get(name, name)} [{qc.describe()}]", quant=qc)


def parse_weight_format(name: str, dtype: str = "bf16") -> WeightFormat:
    """A weight format by name. ``dtype`` is the compute dtype ``load_model(..., dtype=...)`` is given:
    the storage of the tensors a quantized format leaves in full precision, and of ernie45.quant's scales.

    Accepts the names in FORMAT_HELP and ``int<bits>[-g<group>][-asym]`` (e.g. ``int4-g128-asym``: every
    projection that way, bf16 scales, head full precision).
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key in FLOAT_BYTES:
        s = float_storage(key)
        return WeightFormat(s.name, s, s, s, description=FORMAT_HELP.get(s.name, s.name))
    full = float_storage(dtype)
    if key == "fp8":
        return WeightFormat("fp8", FP8_BLOCK, FP8_BLOCK, full, description=FORMAT_HELP["fp8"])
    if key in QUANT_PRESETS:
        return quant_format(key, full.name)
    if key in ("wint8", "wint4"):
        s = int_storage(int(key[4]))
        return WeightFormat(key, s, s, full, description=FORMAT_HELP[key])
    if key == "wint2":
        # The layers and bits are ernie45.quant's ``wint2`` preset (the same rules quantize_model applies;
        # FastDeploy's w4w2 config names absolute layer ids: experts of 0-6 int4, for the 300B MoE layers 3-6);
        # the storage is FastDeploy's (symmetric bf16 scales per channel, CCQ for the 2-bit experts).
        from ernie45.quant.scheme import QuantConfig

        qc = QuantConfig.from_name("wint2")
        return WeightFormat("wint2", int_storage(8), CCQ2, full, description=FORMAT_HELP["wint2"], quant=qc,
                            fastdeploy=True)
    if key.startswith("int"):
        parts = key.split("-")
        try:
            bits = int(parts[0][3:])
            group = None
            asym = False
            for p in parts[1:]:
                if p.startswith("g"):
                    group = int(p[1:])
                elif p == "asym":
                    asym = True
                else:
                    raise ValueError(p)
        except ValueError:
            bits = -1
        if bits in (2, 3, 4, 8) and (group is None or group > 0):
            s = int_storage(bits, group, asym)
            return WeightFormat(s.name, s, s, full, description=s.name)
    raise ValueError(f"--weights {name!r} is not a known weight format; choose one of {sorted(FORMAT_HELP)} "
                     f"or int<bits>[-g<group>][-asym] such as int4-g128-asym")


def kv_dtype_bytes(kv_dtype: str) -> int:
    key = kv_dtype.lower().removeprefix("torch.")
    if key not in KV_BYTES:
        raise ValueError(f"--kv-dtype {kv_dtype!r} is not supported; choose one of {sorted(KV_BYTES)}")
    return KV_BYTES[key]
