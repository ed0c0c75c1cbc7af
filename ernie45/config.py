"""Model configuration: one dataclass for the dense 0.3B and the MoE 21B-A3B / 300B-A47B.

Reads and writes Hugging Face ``config.json`` in both spellings the world uses (spec §1): the original
Baidu files (``Ernie4_5_ForCausalLM``, top-level ``rope_theta``, explicit ``head_dim``) and the files
transformers >= 5 writes (``Ernie4_5ForCausalLM`` / ``Ernie4_5_MoeForCausalLM``, ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = {
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Ernie4_5_ForCausalLM": "ernie4_5",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
    "Ernie4_5_MoEForCausalLM": "ernie4_5_moe",
}
MODEL_TYPES = ("ernie4_5", "ernie4_5_moe")


class ConfigError(ValueError):
    """A config.json or a ModelConfig field that cannot describe an ERNIE 4.5 model."""


@dataclass
class ModelConfig:
    """Shape and numerics of an ERNIE 4.5 text model. Field names follow the HF config.json keys."""

    vocab_size: int = 103424
    """Rows of the embedding table and of the LM head."""
    hidden_size: int = 1024
    """Model width H."""
    intermediate_size: int = 3072
    """Width of the dense SwiGLU MLP (dense layers and the MTP block)."""
    num_hidden_layers: int = 18
    """Decoder layers L."""
    num_attention_heads: int = 16
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (GQA); must divide num_attention_heads."""
    head_dim: int | None = None
    """Per-head width d; None derives hidden_size // num_attention_heads (0.3B sets 128 explicitly)."""
    max_position_embeddings: int = 131072
    """Longest context in tokens."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 500000.0
    """RoPE base θ (interleaved layout, spec §2.5)."""
    hidden_act: str = "silu"
    """MLP activation; ERNIE 4.5 uses SiLU (SwiGLU)."""
    use_bias: bool = False
    """Biases on attention and dense/shared MLP projections (never on routed experts)."""
    tie_word_embeddings: bool = True
    """LM head shares the embedding matrix."""
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "bfloat16"
    """Dtype the checkpoint is stored in."""
    moe_num_experts: int = 0
    """Routed experts E per MoE layer; 0 means a dense model."""
    moe_k: int = 0
    """Experts selected per token (top-k)."""
    moe_num_shared_experts: int = 0
    """Shared experts, fused into one SwiGLU of width moe_intermediate_size x this."""
    moe_intermediate_size: int = 0
    """Width of one routed expert."""
    moe_layer_start_index: int = 0
    """First layer index that may be MoE."""
    moe_layer_end_index: int = -1
    """Last layer index that may be MoE; -1 means the last layer."""
    moe_layer_interval: int = 1
    """Layer i is MoE iff (i+1) % interval == 0 and start <= i <= end (spec §1.2)."""
    moe_norm_min: float = 1e-12
    """Clamp of the top-k weight sum when renormalising (spec §2.7)."""
    num_nextn_predict_layers: int = 0
    """MTP draft blocks shipped with the checkpoint (0 or 1)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Keys of config.json we do not model, written back unchanged."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"head_dim is not set and hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the field, its value and the rule it breaks."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA groups must be whole)"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; ERNIE 4.5 uses 'silu'")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} must be positive")
        if self.has_dense_layers or self.num_nextn_predict_layers:
            if self.intermediate_size <= 0:
                raise ConfigError(f"intermediate_size={self.intermediate_size} must be positive")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(f"num_nextn_predict_layers={self.num_nextn_predict_layers}: only 0 or 1 exist")
        if self.moe_num_experts < 0:
            raise ConfigError(f"moe_num_experts={self.moe_num_experts} must be >= 0 (0 = dense)")
        if self.moe_num_experts:
            if not 1 <= self.moe_k <= self.moe_num_experts:
                raise ConfigError(
                    f"moe_k={self.moe_k} must be between 1 and moe_num_experts={self.moe_num_experts}"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
            if self.moe_num_shared_experts < 0:
                raise ConfigError(f"moe_num_shared_experts={self.moe_num_shared_experts} must be >= 0")
            if self.moe_layer_interval <= 0:
                raise ConfigError(f"moe_layer_interval={self.moe_layer_interval} must be positive")
            if self.moe_layer_start_index < 0:
                raise ConfigError(f"moe_layer_start_index={self.moe_layer_start_index} must be >= 0")
            if self.moe_layer_end_index >= self.num_hidden_layers:
                raise ConfigError(
                    f"moe_layer_end_index={self.moe_layer_end_index} is past the last layer "
                    f"(num_hidden_layers={self.num_hidden_layers})"
                )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary (vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ structure
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def model_type(self) -> str:
        return "ernie4_5_moe" if self.is_moe else "ernie4_5"

    def is_moe_layer(self, i: int) -> bool:
        """Spec §1.2: the rule shared by transformers, vLLM and the original Baidu code."""
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def has_dense_layers(self) -> bool:
        return any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts

    # ------------------------------------------------------------------ parameter counts
    def _attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        n = h * q + 2 * h * kv + q * h
        if self.use_bias:
            n += q + 2 * kv + h
        return n

    def _mlp_params(self, width: int, bias: bool) -> int:
        n = 3 * self.hidden_size * width
        return n + (2 * width + self.hidden_size if bias else 0)

    def _layer_params(self, i: int, active: bool) -> int:
        n = self._attention_params() + 2 * self.hidden_size
        if not self.is_moe_layer(i):
            return n + self._mlp_params(self.intermediate_size, self.use_bias)
        experts = self.moe_k if active else self.moe_num_experts
        n += self.moe_num_experts * self.hidden_size + self.moe_num_experts  # router + correction bias
        n += experts * self._mlp_params(self.moe_intermediate_size, False)
        if self.moe_num_shared_experts:
            n += self._mlp_params(self.shared_intermediate_size, self.use_bias)
        return n

    def _mtp_params(self) -> int:
        h = self.hidden_size
        dense_block = self._attention_params() + 2 * h + self._mlp_params(self.intermediate_size, self.use_bias)
        return self.num_nextn_predict_layers * (2 * h + 2 * h * h + dense_block)

    def num_params(self, include_mtp: bool = False) -> int:
        """Total parameters, counting a tied head once."""
        n = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size
        n += sum(self._layer_params(i, active=False) for i in range(self.num_hidden_layers))
        return n + (self._mtp_params() if include_mtp else 0)

    def num_active_params(self) -> int:
        """Parameters touched per token: every dense weight, k of E routed experts, embeddings and head."""
        n = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size
        return n + sum(self._layer_params(i, active=True) for i in range(self.num_hidden_layers))

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for every layer: 2 x L x kv_heads x head_dim x bytes (DESIGN.md memory arithmetic)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed HF config.json. ``source`` names the file in error messages."""
        raw = dict(raw)
        archs = raw.pop("architectures", None) or []
        model_type = raw.pop("model_type", None)
        arch_types = {ARCHITECTURES[a] for a in archs if a in ARCHITECTURES}
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown and not arch_types:
            raise ConfigError(
                f"{source}: architectures={unknown} is not an ERNIE 4.5 text model; expected one of "
                f"{sorted(ARCHITECTURES)}"
            )
        if model_type is None:
            if not arch_types:
                raise ConfigError(f"{source}: neither model_type nor a known architectures entry is set")
            model_type = arch_types.pop()
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; expected one of {list(MODEL_TYPES)}"
            )
        rope = raw.pop("rope_parameters", None) or {}
        scaling = raw.pop("rope_scaling", None)
        if scaling:
            raise ConfigError(f"{source}: rope_scaling={scaling!r} is not used by ERNIE 4.5; remove it")
        if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r} is not supported")
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(raw.get(key), list):
                raw[key] = raw[key][0]
            if key in raw and raw[key] is None:
                raw.pop(key)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: raw.pop(k) for k in list(raw) if k in known}
        if model_type == "ernie4_5":
            for k in [k for k in kwargs if k.startswith("moe_")]:
                raw[k] = kwargs.pop(k)  # a dense config never routes; keep stray keys verbatim
        elif not kwargs.get("moe_num_experts"):
            raise ConfigError(f"{source}: model_type 'ernie4_5_moe' needs moe_num_experts > 0")
        if model_type == "ernie4_5_moe":
            # Defaults of transformers' Ernie4_5_MoeConfig for keys a file may omit.
            kwargs.setdefault("moe_k", 6)
            kwargs.setdefault("moe_num_shared_experts", 2)
            kwargs.setdefault("moe_intermediate_size", 1536)
            kwargs.setdefault("moe_layer_start_index", 1)
            if isinstance(kwargs.get("moe_layer_start_index"), list):
                kwargs["moe_layer_start_index"] = kwargs["moe_layer_start_index"][0]
            if isinstance(kwargs.get("moe_layer_end_index"), list):
                kwargs["moe_layer_end_index"] = kwargs["moe_layer_end_index"][0]
            if isinstance(kwargs.get("moe_num_experts"), list):
                kwargs["moe_num_experts"] = kwargs["moe_num_experts"][0]
        if kwargs.get("moe_layer_end_index") is None:
            kwargs.pop("moe_layer_end_index", None)
        for key in ("moe_k", "moe_num_shared_experts", "moe_layer_interval", "num_nextn_predict_layers"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        for key in ("rope_theta", "rms_norm_eps", "moe_norm_min"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = float(kwargs[key])
        try:
            return cls(**kwargs, extra=raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``config.json`` (a file, or the folder that holds it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no config.json; a checkpoint folder needs one (HF format)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_hf_dict(raw, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers >= 5 reads (and our own loader reads back identically)."""
        out: dict[str, Any] = dict(self.extra)
        for k in ("auto_map", "transformers_version", "rope_parameters"):
            out.pop(k, None)
        out.update(
            architectures=["Ernie4_5_MoeForCausalLM" if self.is_moe else "Ernie4_5ForCausalLM"],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            hidden_act=self.hidden_act,
            use_bias=self.use_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.torch_dtype,
        )
        if self.is_moe:
            out.update(
                moe_num_experts=self.moe_num_experts,
                moe_k=self.moe_k,
                moe_num_shared_experts=self.moe_num_shared_experts,
                moe_intermediate_size=self.moe_intermediate_size,
                moe_layer_start_index=self.moe_layer_start_index,
                moe_layer_end_index=self.moe_layer_end_index,
                moe_layer_interval=self.moe_layer_interval,
                moe_norm_min=self.moe_norm_min,
            )
        out["num_nextn_predict_layers"] = self.num_nextn_predict_layers
        return out

    def save_json(self, folder: str | os.PathLike) -> None:
        from ernie45.utils import atomic_write_text

        atomic_write_text(os.path.join(folder, "config.json"), json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """A named preset: the three released shapes and tiny ones for tests."""
        key = name.lower().removeprefix("baidu/").removesuffix("-pt").removesuffix("-base")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[key])


PRESETS: dict[str, dict[str, Any]] = {
    # Spec §1.1. The 0.3B keeps its explicit head_dim=128 (not hidden/heads = 64).
    "ernie-4.5-0.3b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
    ),
    "ernie-4.5-21b-a3b": dict(
        hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, tie_word_embeddings=True, moe_num_experts=64, moe_k=6,
        moe_num_shared_experts=2, moe_intermediate_size=1536, moe_layer_start_index=1,
        moe_layer_end_index=27, num_nextn_predict_layers=1,
    ),
    "ernie-4.5-300b-a47b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, moe_num_experts=64, moe_k=8,
        moe_num_shared_experts=0, moe_intermediate_size=3584, moe_layer_start_index=3,
        moe_layer_end_index=53, num_nextn_predict_layers=1,
    ),
    # Tiny shapes for tests: small vocab, every structural feature switched on.
    "tiny-dense": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    ),
    "tiny-moe": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_intermediate_size=32, moe_layer_start_index=1,
    ),
}
