"""llama.cpp's GGUF files of ERNIE 4.5 (architectures ``ernie4_5`` and ``ernie4_5-moe``), in and out.

In (``load_gguf``, reached through ``load_model("x.gguf")``): the PyPI ``gguf`` package parses the container;
the tensor names, the config (from the GGUF metadata) and the tokenizer (``gguf_tokenizer``: a SentencePiece
model rebuilt from ``tokenizer.ggml.*``) are ours. Every weight keeps its own type: ``Q8_0`` / ``Q4_0`` / ``Q4_1``
/ ``Q4_K`` / ``Q6_K`` become our int8 g32 / int4 g32 / 6-bit g16 codes with the file's own scales (``ggml.py``:
exact; ``Q5_0`` / ``Q5_K`` as 6-bit g32), F32/F16/BF16 stay full precision, and other types (``Q5_1``, ``Q2_K``,
``Q3_K``, IQ*) are dequantized by gguf-py and requantized to int8 g32 (``FALLBACK``). The per-module schemes become a
``QuantConfig`` with rules, so ``save_model`` writes the result as our quantized checkpoint. Tensors are read
one at a time (stacked experts one expert at a time) with ``readinto`` into the allocated model: peak memory
is the result plus one expert's temporaries.

Out (``export_gguf``): ``bf16`` / ``q8_0`` / ``q4_0`` files that llama.cpp loads, written tensor by tensor. A
weight that is already our symmetric int8 / int4 in groups of 32 is written as Q8_0 / Q4_0 from its own codes
(lossless both ways); others are quantized by gguf-py's reference quantizer. Norms, the router and its bias
stay F32 (llama.cpp's converter does the same).

Names follow llama.cpp's converter (``conversion/ernie.py`` and ``gguf-py/gguf/tensor_mapping.py``); the
config keys and which layers are MoE follow ``src/models/ernie4-5.cpp``: every layer from
``leading_dense_block_count`` on with (i + 1) % ``interleave_moe_layer_step`` == 0 is MoE.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ernie45.config import ModelConfig
from ernie45.formats import ggml
from ernie45.model.checkpoint import CheckpointError, build_empty
from ernie45.model.model import ErnieForCausalLM
from ernie45.quant.scheme import QuantConfig, Rule, TensorScheme
from ernie45.utils import atomic_path, resolve_dtype

log = logging.getLogger(__name__)

ARCH_DENSE, ARCH_MOE = "ernie4_5", "ernie4_5-moe"
FALLBACK = TensorScheme(8, 32)
"""Our scheme for ggml types without an exact counterpart: dequantized by gguf-py, requantized int8 g32."""
EXPORT_TYPES = {"bf16": ggml.BF16, "q8_0": ggml.Q8_0, "q4_0": ggml.Q4_0, "f32": ggml.F32}

# GGUF name template -> (native name template, part). part: "gate"/"up" = that half of the stacked
# gate_up_proj; "bias_vec" = the router bias ([E] in both).
NAMES: list[tuple[str, str, str | None]] = [
    ("token_embd.weight", "model.embed_tokens.weight", None),
    ("output_norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", None),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    *((f"blk.{{i}}.attn_{g}.{w}", f"model.layers.{{i}}.self_attn.{o}_proj.{w}", None)
      for g, o in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for w in ("weight", "bias")),
    *((f"blk.{{i}}.ffn_{p}.{w}", f"model.layers.{{i}}.mlp.{p}_proj.{w}", None)
      for p in ("gate", "up", "down") for w in ("weight", "bias")),
    *((f"blk.{{i}}.ffn_{p}_shexp.{w}", f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.{w}", None)
      for p in ("gate", "up", "down") for w in ("weight", "bias")),
    ("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.mlp.gate.weight", None),
    ("blk.{i}.exp_probs_b.bias", "model.layers.{i}.mlp.gate.e_score_correction_bias", None),
    ("blk.{i}.ffn_gate_exps.weight", "model.layers.{i}.mlp.experts.gate_up_proj", "gate"),
    ("blk.{i}.ffn_up_exps.weight", "model.layers.{i}.mlp.experts.gate_up_proj", "up"),
    ("blk.{i}.ffn_down_exps.weight", "model.layers.{i}.mlp.experts.down_proj", None),
]
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), n, p) for g, n, p in NAMES]


def gguf_to_native(name: str) -> tuple[str, str | None] | None:
    """(native name, part) of a GGUF tensor name, None for a name we do not know."""
    for pattern, native, part in _PATTERNS:
        m = pattern.match(name)
        if m:
            return native.replace("{i}", m.group(1)) if m.groups() else native, part
    return None


def _require_gguf():  # noqa: ANN202 - the gguf module
    try:
        import gguf
    except ImportError:
        raise ImportError("reading or writing GGUF needs the 'gguf' package: pip install 'ernie45[gguf]' "
                          "(or pip install gguf)") from None
    return gguf


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ggml type, torch-order shape, absolute byte range."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    start: int
    nbytes: int


class GGUFFile:
    """The metadata and tensor table of a GGUF file (the data is read on demand with ``read``).

    The header is parsed here, not by gguf-py's ``GGUFReader``: that one builds a numpy view per part of every
    field (two per vocabulary entry: seconds for a 100k-token vocabulary) and maps the whole file. We read the
    header bytes once, keep numeric arrays as numpy and decode the strings in one pass (GGUF v2/v3, little
    endian: ``gguf-py/gguf/gguf_reader.py`` and ``ggml/src/gguf.cpp`` define the layout)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                self._parse(_HeaderReader(f, path))
        except OSError as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        self.arch = self.get("general.architecture")

    def _parse(self, r: _HeaderReader) -> None:
        if r.take(4) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic at the start)")
        version = r.scalar("<I")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file: convert it on a big-endian machine)" if swapped in (2, 3) else ""
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are){hint}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            self.fields[key] = r.value(r.scalar("<I"), key)
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment={align!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
            infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        data = -(-r.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            count = int(np.prod(dims)) if dims else 1
            block, size = _block(qtype, self.path, name)
            if dims[0] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r} has rows of {dims[0]}, not a multiple of its "
                                      f"ggml type's block of {block}")
            t = GGUFTensor(name, qtype, tuple(reversed(dims)), data + offset, count // block * size)
            if t.start + t.nbytes > self.file_size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {t.start + t.nbytes} but the file "
                                      f"has {self.file_size}: the file is truncated")
            self.tensors[name] = t

    def get(self, key: str, default=None):  # noqa: ANN001, ANN201 - any metadata value
        value = self.fields.get(key)
        if value is None:
            return default
        return value.tolist() if isinstance(value, np.ndarray) else value

    def need(self, key: str):  # noqa: ANN201
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is not a complete "
                                  f"{self.arch} model")
        return value

    def read(self, t: GGUFTensor, f, index: int | None = None, count: int | None = None,  # noqa: ANN001
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw bytes of a tensor, [rows, bytes per row] uint8: the whole tensor, slice ``index`` of its first dim
        (``count`` slices from ``index``: [count, rows, bytes]), or rows [r0, r1) of a 2-D tensor."""
        n_rows = t.shape[-2] if len(t.shape) >= 2 else 1
        if len(t.shape) == 3:
            first = t.shape[0]
            per = t.nbytes // first
            start, size = (t.start, t.nbytes) if index is None else (t.start + index * per, (count or 1) * per)
            lead = (first,) if index is None else () if count is None else (count,)
        else:
            per = t.nbytes // n_rows
            r0, r1 = rows if rows is not None else (0, n_rows)
            start, size, lead, n_rows = t.start + r0 * per, (r1 - r0) * per, (), r1 - r0
        buf = torch.empty(size, dtype=torch.uint8)
        got = f.seek(start) == start and f.readinto(memoryview(buf.numpy())) == size
        if not got:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {t.name!r}")
        return buf.reshape(*lead, n_rows, -1)


_VALUE = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value types (GGUFValueType) with a fixed size, as struct / numpy formats; 8 string, 9 array."""


class _HeaderReader:
    """Sequential reads of a GGUF header from a file, in chunks (the header, vocabulary included, is a few MB)."""

    CHUNK = 1 << 20

    def __init__(self, f, path: str) -> None:  # noqa: ANN001 - open binary file
        self.f, self.path, self.buf, self.base, self.pos = f, path, b"", 0, 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end - self.base > len(self.buf):  # keep the unread tail, read on in whole chunks
            tail = self.buf[self.pos - self.base:]
            more = self.f.read(max(self.CHUNK, n - len(tail)))
            self.buf, self.base = tail + more, self.pos
            if end - self.base > len(self.buf):
                raise CheckpointError(f"{self.path}: the GGUF header is truncated (the file ends at byte "
                                      f"{self.base + len(self.buf)})")
        out = memoryview(self.buf)[self.pos - self.base:end - self.base]
        self.pos = end
        return out

    def scalar(self, fmt: str):  # noqa: ANN201
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: a GGUF string near byte {self.pos} is not UTF-8") from None

    def value(self, vtype: int, key: str):  # noqa: ANN201 - int, float, bool, str, list[str] or numpy array
        if vtype in _VALUE:
            return self.scalar(_VALUE[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise CheckpointError(f"{self.path}: metadata key {key!r} has unknown GGUF value type {vtype}")
        itype, n = self.scalar("<I"), self.scalar("<Q")
        if itype in _VALUE:
            dt = np.dtype(_VALUE[itype])
            return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).copy()
        if itype == 8:
            return [self.string() for _ in range(n)]
        return [self.value(itype, key) for _ in range(n)]  # arrays of arrays: rare, small


def _block(qtype: int, path: str, name: str) -> tuple[int, int]:
    """(weights, bytes) of one block of ggml type ``qtype`` (F32/F16/BF16: one weight)."""
    if qtype in (ggml.F32, ggml.F16, ggml.BF16):
        return 1, 4 if qtype == ggml.F32 else 2
    if qtype in ggml.BLOCK:
        return ggml.BLOCK[qtype]
    sizes = _require_gguf().GGML_QUANT_SIZES
    try:
        return sizes[_require_gguf().GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: tensor {name!r} has ggml type {qtype}, which this gguf package does not "
                              f"know (pip install -U gguf)") from None


def gguf_config(g: GGUFFile) -> ModelConfig:
    """A ModelConfig from the GGUF metadata (and the tensor table for what the metadata leaves out)."""
    if g.arch not in (ARCH_DENSE, ARCH_MOE):
        raise CheckpointError(f"{g.path}: GGUF architecture {g.arch!r} is not ERNIE 4.5; ernie45 reads "
                              f"{ARCH_DENSE!r} and {ARCH_MOE!r} files")
    a = g.arch
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{g.path}: no token_embd.weight tensor")
    layers = int(g.need(f"{a}.block_count"))
    heads = int(g.need(f"{a}.attention.head_count"))
    hidden = int(g.need(f"{a}.embedding_length"))
    kw = dict(
        vocab_size=embed.shape[0], hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=int(g.get(f"{a}.feed_forward_length", 0) or 0), num_attention_heads=heads,
        num_key_value_heads=int(g.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=int(g.get(f"{a}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(g.get(f"{a}.context_length", 131072)),
        # stored as float32: 1e-5 comes back as 9.99999975e-06; 7 significant digits restore the config's value
        rms_norm_eps=float(f"{g.need(f'{a}.attention.layer_norm_rms_epsilon'):.7g}"),
        rope_theta=float(f"{g.get(f'{a}.rope.freq_base', 10000.0):.7g}"),
        use_bias="blk.0.attn_q.bias" in g.tensors,
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=int(g.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(g.get("tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=int(g.get("tokenizer.ggml.padding_token_id", 0)),
    )
    if a == ARCH_MOE:
        moe = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors]
        if not moe:
            raise CheckpointError(f"{g.path}: an {ARCH_MOE} file without any ffn_gate_inp tensor")
        shared = int(g.get(f"{a}.expert_shared_count", 0) or 0)
        width = int(g.need(f"{a}.expert_feed_forward_length"))
        kw.update(moe_num_experts=int(g.need(f"{a}.expert_count")), moe_k=int(g.need(f"{a}.expert_used_count")),
                  moe_intermediate_size=width, moe_num_shared_experts=shared,
                  moe_layer_start_index=int(g.get(f"{a}.leading_dense_block_count", 0) or 0),
                  moe_layer_end_index=moe[-1], moe_layer_interval=int(g.get(f"{a}.interleave_moe_layer_step", 1)))
        sh = g.tensors.get(f"blk.{moe[0]}.ffn_gate_shexp.weight")
        if shared and sh is not None and sh.shape[0] != width * shared:
            raise CheckpointError(f"{g.path}: ffn_gate_shexp has {sh.shape[0]} rows but expert_count_shared="
                                  f"{shared} x expert_feed_forward_length={width} = {width * shared}")
    try:
        config = ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{g.path}: GGUF metadata does not describe a valid model ({e})") from None
    want = [i for i in range(layers) if config.is_moe_layer(i)]
    if a == ARCH_MOE and want != moe:
        raise CheckpointError(f"{g.path}: MoE tensors in layers {moe} but the metadata implies {want}")
    return config


def _kind(native: str) -> str:
    if native == "lm_head.weight":
        return "head"
    return "experts" if ".mlp.experts." in native else "dense"


def _scheme_of(qtype: int) -> TensorScheme | None:
    if qtype in (ggml.F32, ggml.F16, ggml.BF16):
        return None
    return ggml.EXACT.get(qtype, FALLBACK)


def gguf_quant_config(g: GGUFFile, config: ModelConfig) -> QuantConfig | None:
    """The QuantConfig that keeps every GGUF weight in its own type: the most common scheme of each class as the
    default, a rule for every module that differs (consecutive layers merged). None when nothing is quantized."""
    modules: dict[str, TensorScheme | None] = {}
    for t in g.tensors.values():
        mapped = gguf_to_native(t.name)
        if mapped is None or len(t.shape) < 2 or mapped[0].endswith(("mlp.gate.weight", "embed_tokens.weight")):
            continue
        native, part = mapped
        scheme = _scheme_of(t.qtype)
        key = native.removesuffix(".weight")
        if part is not None and key in modules and modules[key] != scheme:
            # gate and up of one expert stack in different types: the finer of the two for both (requantized)
            scheme = max(modules[key], scheme, key=lambda s: (s is None, s.bits if s else 0, -(s.group_size or 0)
                                                              if s else 0))
        modules[key] = scheme
    if config.tie_word_embeddings:  # llama.cpp's output is the (quantized) token_embd itself
        modules["lm_head"] = _scheme_of(g.tensors["token_embd.weight"].qtype)
    if all(s is None for s in modules.values()):
        return None
    default: dict[str, TensorScheme | None] = {}
    for kind in ("experts", "dense", "head"):
        seen = Counter(s for n, s in modules.items() if _kind(n + ".weight") == kind)
        default[kind] = seen.most_common(1)[0][0] if seen else None
    # Experts and dense need a default scheme object; a class that is all full precision gets a rule per module.
    fallback = next(s for s in modules.values() if s is not None)
    rules: list[Rule] = []
    grouped: dict[tuple[str, TensorScheme | None], list[int]] = {}
    for name, scheme in sorted(modules.items()):
        kind = _kind(name + ".weight")
        if scheme == default[kind] and (scheme is not None or kind == "head"):
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
        if m is None:
            rules.append(Rule(name, scheme))
        else:
            grouped.setdefault((m.group(2), scheme), []).append(int(m.group(1)))
    for (suffix, scheme), layers in grouped.items():
        layers.sort()
        start = prev = layers[0]
        for i in [*layers[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            rules.append(Rule(f"model.layers.*.{suffix}", scheme, (start, prev)))
            if i is not None:
                start = prev = i
    return QuantConfig(default["experts"] or fallback, default["dense"] or fallback, default["head"],
                       name="gguf", rules=tuple(rules))


@torch.no_grad()
def load_gguf(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              progress: bool | None = None, quant: str | QuantConfig | None = None, **opts) -> ErnieForCausalLM:
    """Load an ERNIE 4.5 GGUF file into ``ErnieForCausalLM``.

    dtype: compute dtype (and of our scales: float32 keeps ggml's f16 scales exact, bf16 rounds them).
    quant: None keeps each tensor's own type (``gguf_quant_config``); a preset or QuantConfig dequantizes every
        weight and quantizes it with that scheme instead (opts as in ``load_model``).
    """
    from ernie45.quant.load import _scheme_from, build_quantized, to_device
    from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight

    path = os.fspath(path)
    dtype = resolve_dtype(dtype)
    g = GGUFFile(path)
    config = gguf_config(g)
    qconfig = gguf_quant_config(g, config) if quant is None else _scheme_from(quant, opts)
    if quant is None and opts:
        raise TypeError(f"load options {sorted(opts)} need quant=")
    model = build_quantized(config, qconfig, dtype) if qconfig else build_empty(config, dtype)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    plan: dict[str, dict[str | None, GGUFTensor]] = {}
    for t in g.tensors.values():
        mapped = gguf_to_native(t.name)
        if mapped is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for an {g.arch} model")
        native, part = mapped
        if native not in params and native.rpartition(".")[0] not in modules:
            raise CheckpointError(f"{path}: tensor {t.name!r} ({native}) does not exist in a model of this config")
        plan.setdefault(native, {})[part] = t
    with torch.device("meta"):
        expected = set(ErnieForCausalLM(config).state_dict())
    expected -= {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(n for n in expected if n not in plan and not n.endswith("e_score_correction_bias"))
    missing += [f"{n} ({p} half)" for n, parts in plan.items() if n.endswith("gate_up_proj")
                for p in ("gate", "up") if p not in parts]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) for {missing[:4]}; the file is incomplete or not "
                              f"the model its metadata describes")
    for n, b in params.items():
        if n.endswith("e_score_correction_bias") and n not in plan:
            b.zero_()
    total = sum(t.nbytes for parts in plan.values() for t in parts.values())
    bar = tqdm(total=total, desc="loading GGUF", unit="B", unit_scale=True,
               disable=None if progress is None else not progress)
    with open(path, "rb") as f:
        for native, parts in sorted(plan.items(), key=lambda kv: min(t.start for t in kv[1].values())):
            owner = native.rpartition(".")[0]
            mod = modules.get(owner)
            if isinstance(mod, QuantExperts):
                qw: QWeight = getattr(mod, native.rpartition(".")[2])
                _fill_quant(qw, [parts[p] for p in ("gate", "up") if p in parts] or [parts[None]], g, f)
            elif isinstance(mod, QuantLinear) and native.endswith(".weight"):
                _fill_quant(mod, [parts[None]], g, f)
            else:
                _fill_float(params[native], parts, g, f)
            bar.update(sum(t.nbytes for t in parts.values()))
            if native == "model.embed_tokens.weight" and config.tie_word_embeddings \
                    and isinstance(model.lm_head, QuantLinear):
                _fill_quant(model.lm_head, [parts[None]], g, f)  # the head is token_embd's own codes
    bar.close()
    if not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    model.gguf_source = path
    model.eval()
    return to_device(model, device) if qconfig else (model.to(device) if torch.device(device).type != "cpu" else model)


CHUNK = 1 << 22
"""Weights converted per step (4M): a large 2-D tensor goes in row blocks of about this size, an expert stack in
runs of whole experts up to it (at least one). The temporaries of a step (raw blocks, codes, fp32 scales or a
dequantized block) are a few times this many bytes, so the import's peak is the model plus tens of MB."""


def _steps(t: GGUFTensor, rows_of: int) -> Iterator[dict]:
    """``g.read`` arguments covering tensor ``t`` (``rows_of``: rows per expert or of the matrix, with gate and
    up together for a stacked gate_up) a chunk at a time: runs of experts, or blocks of a multiple of 64 rows."""
    k = t.shape[-1]
    if len(t.shape) == 3:
        step = max(1, CHUNK // (rows_of * k))
        for e in range(0, t.shape[0], step):
            yield {"index": e, "count": min(step, t.shape[0] - e)}
        return
    n = t.shape[0] if len(t.shape) == 2 else 1
    step = n if n * k <= CHUNK else max(64, CHUNK // k // 64 * 64)
    for r in range(0, n, step):
        yield {"rows": (r, min(n, r + step))}


def _to_float(raw: torch.Tensor, t: GGUFTensor) -> torch.Tensor:
    """Raw blocks [..., rows, bytes] -> fp32 [..., rows, K] by gguf-py's dequantize (ggml's own arithmetic: our
    middle-code form reorders the K-quants' d * sc * q - dmin * m, which can differ in the last bit)."""
    return ggml.to_float(raw.numpy(), t.qtype, (*raw.shape[:-1], t.shape[-1]))


def _fill_quant(qw, tensors: list[GGUFTensor], g: GGUFFile, f) -> None:  # noqa: ANN001
    """Fill a quantized weight (a QuantLinear, or an expert stack from one GGUF tensor or the gate and up halves)
    a chunk at a time, straight into its buffers: the file's own codes and scales when the type is exact for the
    module's scheme (no float round trip), else dequantized and requantized."""
    from ernie45.quant.modules import quantize_tensor

    exact = all(ggml.EXACT.get(t.qtype) == qw.scheme for t in tensors)
    stacked = len(tensors[0].shape) == 3
    rows = sum(t.shape[-2] for t in tensors)
    for at in _steps(tensors[0], rows):
        raws = [g.read(t, f, **at) for t in tensors]
        if exact:
            parts = [ggml.decode(r, t.qtype, t.shape[-1]) for r, t in zip(raws, tensors)]
            codes, scales, zeros = (torch.cat(p, dim=-2) for p in zip(*parts))
            scales, zeros = scales.to(qw.dtype), zeros.to(qw.dtype)
            if not stacked:
                qw.set_stored(None, codes, scales, zeros, slice(*at.get("rows", (0, qw.n))))
                continue
            for j in range(codes.shape[0]):
                qw.set_stored(at["index"] + j, codes[j], scales[j], zeros[j])
            continue
        w = torch.cat([_to_float(r, t) for r, t in zip(raws, tensors)], dim=-2)
        if not stacked:
            qw.set(None, *quantize_tensor(w, qw.scheme), slice(*at.get("rows", (0, qw.n))))
            continue
        for j in range(w.shape[0]):
            qw.quantize_(at["index"] + j, w[j])


def _fill_float(param: torch.Tensor, parts: dict, g: GGUFFile, f) -> None:  # noqa: ANN001
    """A full-precision parameter (the embedding, norms, router, or a float expert stack) a chunk at a time."""
    if None not in parts:  # gate_up_proj [E, 2I, H] from ffn_gate_exps and ffn_up_exps
        half = param.shape[1] // 2
        for p, rows in (("gate", slice(0, half)), ("up", slice(half, None))):
            t = parts[p]
            for at in _steps(t, half):
                e = at["index"]
                param[e:e + at["count"], rows].copy_(_to_float(g.read(t, f, **at), t))
        return
    t = parts[None]
    if len(t.shape) == 3:
        for at in _steps(t, t.shape[1]):
            e = at["index"]
            param[e:e + at["count"]].copy_(_to_float(g.read(t, f, **at), t))
        return
    if len(t.shape) < 2 or tuple(param.shape) != t.shape:  # 1-D, or a vector that llama.cpp stores as [1, n]
        param.copy_(_to_float(g.read(t, f), t).reshape(param.shape))
        return
    for at in _steps(t, t.shape[0]):
        r0, r1 = at["rows"]
        param[r0:r1].copy_(_to_float(g.read(t, f, **at), t))


# ----------------------------------------------------------------------------------------- tokenizer
def gguf_tokenizer(path: str | os.PathLike):  # noqa: ANN201 - ernie45.tokenizer.Tokenizer | None
    """The tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` metadata, as our SentencePiece ``Tokenizer``
    (None when the file has no SentencePiece-style ``llama`` vocabulary).

    llama.cpp keeps the pieces, their scores and token types (which use SentencePiece's own type numbers) and
    the dummy-prefix flag; we write them back into a ``ModelProto`` for a BPE model with byte fallback (the
    merge-by-score algorithm llama.cpp's SPM tokenizer runs). The special tokens come from the ``*_token_id``
    keys, the chat template from ``tokenizer.chat_template``."""
    import sentencepiece as spm

    from ernie45.tokenizer import Tokenizer

    g = path if isinstance(path, GGUFFile) else GGUFFile(os.fspath(path))
    if g.get("tokenizer.ggml.model") != "llama":
        return None
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise ImportError("rebuilding the GGUF tokenizer needs protobuf: pip install 'ernie45[gguf]'") from None
    tokens = g.need("tokenizer.ggml.tokens")
    scores = g.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    m = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = text, float(score), int(kind) if 1 <= int(kind) <= 6 else 1
    ids = {k: g.get(f"tokenizer.ggml.{k}_token_id") for k in ("unk", "bos", "eos", "padding")}
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = 6 in types
    t.unk_id = int(ids["unk"]) if ids["unk"] is not None else 0
    t.bos_id = int(ids["bos"]) if ids["bos"] is not None else -1
    t.eos_id = int(ids["eos"]) if ids["eos"] is not None else -1
    t.pad_id = -1  # ERNIE pads with <unk> (id 0); SentencePiece would claim a piece of its own
    for key, i in (("unk_piece", t.unk_id), ("bos_piece", t.bos_id), ("eos_piece", t.eos_id)):
        if i >= 0:
            setattr(t, key, tokens[i])
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(m.SerializeToString())
    except RuntimeError as e:
        raise CheckpointError(f"{g.path}: the GGUF vocabulary does not form a SentencePiece model ({e})") from None
    config: dict = {"add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
                    "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False))}
    for key, tid in (("bos_token", ids["bos"]), ("eos_token", ids["eos"]), ("unk_token", ids["unk"]),
                     ("pad_token", ids["padding"])):
        if tid is not None and 0 <= int(tid) < len(tokens):
            config[key] = tokens[int(tid)]
    template = g.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return Tokenizer(sp, config, {}, source=g.path)


# -------------------------------------------------------------------------------------------- writing
def _tokenizer_kv(w, tokenizer, vocab_size: int) -> None:  # noqa: ANN001
    """tokenizer.ggml.* from our Tokenizer (the SentencePiece pieces, as llama.cpp's converter writes them),
    padded to the model's vocabulary with unused [PAD<i>] pieces; without a tokenizer, placeholder pieces."""
    if tokenizer is None:
        log.warning("no tokenizer: the GGUF gets placeholder pieces <t0>.. (llama.cpp needs a vocabulary); "
                    "token ids still match")
        tokens = [f"<t{i}>" for i in range(vocab_size)]
        scores, types = [0.0] * vocab_size, [2 if i == 0 else 3 if i < 3 else 1 for i in range(vocab_size)]
        add_prefix, bos, eos, unk, pad = False, 1, 2, 0, 0
    else:
        sp = tokenizer.sp
        n = sp.get_piece_size()
        tokens = list(tokenizer._pieces)
        scores = [sp.get_score(i) for i in range(n)]
        types = [6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                 5 if sp.is_unused(i) else 4 if _user_defined(sp, i) else 1 for i in range(n)]
        for content, tid in sorted(tokenizer._token_to_id.items(), key=lambda kv: kv[1]):
            if tid >= len(tokens):  # added tokens beyond the SentencePiece model
                tokens += [f"[PAD{i}]" for i in range(len(tokens), tid)]
                scores += [-1000.0] * (tid - len(scores))
                types += [5] * (tid - len(types))
                tokens.append(content)
                scores.append(0.0)
                types.append(3)
        add_prefix = tokenizer.add_dummy_prefix
        bos, eos, unk = sp.bos_id(), sp.eos_id(), max(sp.unk_id(), 0)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else unk
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} pieces but the model only {vocab_size} embedding rows")
    pad_n = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    scores += [-1000.0] * pad_n
    types += [5] * pad_n
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(bool(add_prefix))
    w.add_add_bos_token(False)  # spec §4: ERNIE adds no BOS
    w.add_add_eos_token(False)
    for setter, tid in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_unk_token_id, unk),
                        (w.add_pad_token_id, pad)):
        if tid is not None and tid >= 0:
            setter(int(tid))


def _user_defined(sp, i: int) -> bool:  # noqa: ANN001
    # sentencepiece's Python API has no is_user_defined; a user-defined piece encodes to itself alone
    piece = sp.id_to_piece(i)
    return len(piece) > 1 and sp.encode(piece) == [i] and piece.startswith("<") and piece.endswith(">")


def _weights(model: ErnieForCausalLM) -> Iterator[tuple[str, str, object, int | None]]:
    """(GGUF name, role, source, expert half) for every tensor to write. source: a tensor, or a QWeight with
    the expert-stack half it holds ("gate"/"up"/None)."""
    from ernie45.quant.modules import QuantExperts

    cfg = model.config
    m = model.model
    # Tied: llama.cpp's one token_embd is both the lookup and the head; a quantized head of ours is written there
    # from its own codes (the head keeps its exact values; the lookup then reads the quantized rows).
    head_codes = cfg.tie_word_embeddings and hasattr(model.lm_head, "qweight")
    yield "token_embd.weight", "embed", model.lm_head if head_codes else m.embed_tokens.weight.detach(), None
    yield "output_norm.weight", "norm", m.norm.weight, None
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reads token_embd as the head (a quantized head of ours is
        # a quantization of that same embedding)
        yield "output.weight", "linear", _src(model.lm_head), None
    for i, layer in enumerate(m.layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", "norm", layer.input_layernorm.weight, None
        yield b + "ffn_norm.weight", "norm", layer.post_attention_layernorm.weight, None
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output")):
            lin = getattr(layer.self_attn, ours)
            yield b + theirs + ".weight", "linear", _src(lin), None
            if lin.bias is not None:
                yield b + theirs + ".bias", "norm", lin.bias, None
        mlps = []
        if not layer.is_moe:
            mlps.append(("", layer.mlp))
        else:
            moe = layer.mlp
            yield b + "ffn_gate_inp.weight", "norm", moe.gate.weight, None
            yield b + "exp_probs_b.bias", "norm", moe.gate.e_score_correction_bias, None
            ex = moe.experts
            gu = ex.gate_up_proj if isinstance(ex, QuantExperts) else ex.gate_up_proj.detach()
            dn = ex.down_proj if isinstance(ex, QuantExperts) else ex.down_proj.detach()
            yield b + "ffn_gate_exps.weight", "experts", gu, "gate"
            yield b + "ffn_up_exps.weight", "experts", gu, "up"
            yield b + "ffn_down_exps.weight", "experts", dn, None
            if moe.shared_experts is not None:
                mlps.append(("_shexp", moe.shared_experts))
        for suffix, mlp in mlps:
            for p in ("gate", "up", "down"):
                lin = getattr(mlp, f"{p}_proj")
                yield b + f"ffn_{p}{suffix}.weight", "linear", _src(lin), None
                if lin.bias is not None:
                    yield b + f"ffn_{p}{suffix}.bias", "norm", lin.bias, None


def _src(lin):  # noqa: ANN001, ANN202
    return lin if hasattr(lin, "qweight") else lin.weight.detach()


def _shape(src, half: str | None) -> tuple[int, ...]:  # noqa: ANN001
    if hasattr(src, "qweight"):
        lead = tuple(src.qweight.shape[:-2])
        shape = (*lead, src.n, src.k)
    else:
        shape = tuple(src.shape)
    if half is not None:
        shape = (*shape[:-2], shape[-2] // 2, shape[-1])
    return shape


def _slice(src, i: int | None, half: str | None, qtype: int) -> np.ndarray:  # noqa: ANN001
    """One matrix (expert ``i`` of a stack) in ``qtype``'s bytes: our own codes when they are exactly that type,
    else the float values quantized by gguf-py."""
    from gguf.quants import quantize

    if hasattr(src, "qweight"):
        codes, scales, zeros = src.stored(i)
        if half is not None:
            rows = codes.shape[0] // 2
            sel = slice(0, rows) if half == "gate" else slice(rows, None)
            codes, scales, zeros = codes[sel], scales[sel], zeros[sel]
        bits = src.bits
        if (qtype, bits) in ((ggml.Q8_0, 8), (ggml.Q4_0, 4)) and src.group == 32 and not bool(zeros.any()):
            return ggml.encode(codes, scales, qtype)
        from ernie45.quant.math import dequantize_mid

        w = dequantize_mid(codes, scales, zeros, bits)
    else:
        w = src if i is None else src[i]
        if half is not None:
            rows = w.shape[0] // 2
            w = w[:rows] if half == "gate" else w[rows:]
    w = w.float()
    if qtype == ggml.F32:
        return w.contiguous().numpy()
    if qtype == ggml.BF16:
        return w.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(w.numpy(), qtype)


@torch.no_grad()
def export_gguf(model: ErnieForCausalLM, path: str | os.PathLike, type: str = "bf16", tokenizer=None,  # noqa: ANN001
                progress: bool | None = None) -> None:
    """Write ``model`` as an llama.cpp GGUF. type: bf16 | q8_0 | q4_0 for the projection weights, the experts and
    the embedding (norms, router and biases stay F32). tokenizer: our Tokenizer, written as llama.cpp's
    ``tokenizer.ggml.*`` (None: placeholder pieces)."""
    gguf = _require_gguf()
    key = type.lower()
    if key not in EXPORT_TYPES:
        raise ValueError(f"--type {type!r} is not supported; choose one of {sorted(EXPORT_TYPES)}")
    qtype = EXPORT_TYPES[key]
    cfg = model.config
    if cfg.is_moe and (cfg.moe_layer_interval != 1 or cfg.moe_layer_end_index != cfg.num_hidden_layers - 1):
        raise ValueError(f"llama.cpp's {ARCH_MOE} makes every layer from moe_layer_start_index on MoE; this model "
                         f"has moe_layer_interval={cfg.moe_layer_interval}, moe_layer_end_index="
                         f"{cfg.moe_layer_end_index} of {cfg.num_hidden_layers} layers, which it cannot express")
    k_quant = qtype in (ggml.Q8_0, ggml.Q4_0)
    items = list(_weights(model))
    for name, role, src, half in items:
        if role != "norm" and k_quant and _shape(src, half)[-1] % 32:
            raise ValueError(f"{name}: rows of {_shape(src, half)[-1]} weights do not split into blocks of 32; "
                             f"export with --type bf16")
    arch = ARCH_MOE if cfg.is_moe else ARCH_DENSE
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.splitext(os.path.basename(path))[0])
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if cfg.is_moe:
            w.add_expert_count(cfg.moe_num_experts)
            w.add_expert_used_count(cfg.moe_k)
            w.add_interleave_moe_layer_step(cfg.moe_layer_interval)
            w.add_leading_dense_block_count(cfg.moe_layer_start_index)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            w.add_expert_shared_count(cfg.moe_num_shared_experts)
            if cfg.moe_num_shared_experts:  # the true width (the converter writes intermediate // kv heads)
                w.add_expert_shared_feed_forward_length(cfg.moe_intermediate_size * cfg.moe_num_shared_experts)
        w.add_file_type({ggml.BF16: gguf.LlamaFileType.MOSTLY_BF16, ggml.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
                         ggml.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, ggml.F32: gguf.LlamaFileType.ALL_F32}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_kv(w, tokenizer, cfg.vocab_size)
        plan = []
        for name, role, src, half in items:
            t = ggml.F32 if role == "norm" else qtype
            shape = _shape(src, half)
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, t) if t not in (ggml.F32, ggml.BF16)
                                 else shape)) * (4 if t == ggml.F32 else 2 if t == ggml.BF16 else 1)
            # a dtype other than uint8 makes the writer take ``shape`` as the logical (not byte) shape
            w.add_tensor_info(name, shape, np.dtype(np.float32 if t == ggml.F32 else np.float16), nbytes, raw_dtype=t)
            plan.append((src, half, t, shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for src, half, t, shape in tqdm(plan, desc=f"writing GGUF {key}", unit="tensor",
                                        disable=None if progress is None else not progress):
            if len(shape) == 3:
                data = np.stack([_slice(src, e, half, t) for e in range(shape[0])])
            else:
                data = _slice(src, None, half, t)
            w.write_tensor_data(np.ascontiguousarray(data))
        w.close()

