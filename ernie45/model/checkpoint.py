"""HF safetensors checkpoints <-> the native module tree.

One declarative name map (``NAME_RULES``) serves loading, saving and sharded loading. Loading builds the
model on the meta device, allocates it once, and reads each tensor from its file straight into place
(``readinto`` at the tensor's byte offset), so peak memory stays near the model's own size. Headers are
checked against the file size first: a truncated or corrupt file is reported with its name before any
tensor is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ernie45.config import ModelConfig
from ernie45.model.layers import RotaryEmbedding
from ernie45.model.model import ErnieForCausalLM
from ernie45.utils import advise_huge_pages, atomic_path, atomic_write_text, resolve_dtype

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, byte range (absolute), dtype and shape."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse and validate one safetensors header; returns (tensors, __metadata__)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, "
                                      f"file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if hi - lo != expected or lo < 0:
            raise CheckpointError(f"{path}: tensor {name!r} spans {hi - lo} bytes but {info['dtype']} "
                                  f"{list(shape)} needs {expected}; the file is corrupt")
        if base + hi > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + hi} but the file "
                                  f"has {size} bytes; download or copy it again")
        refs[name] = TensorRef(path, name, dtype, shape, base + lo, base + hi)
    return refs, meta


def read_into(ref: TensorRef, out: torch.Tensor, f=None) -> None:  # noqa: ANN001 - optional open file
    """Read ``ref`` into the contiguous CPU tensor ``out`` (same dtype and numel) without a copy."""
    assert out.is_contiguous() and out.dtype == ref.dtype and out.numel() == math.prod(ref.shape)
    buf = out.view(-1).view(torch.uint8).numpy()
    own = f is None
    f = open(ref.file, "rb") if own else f
    try:
        f.seek(ref.start)
        got = f.readinto(buf)
    finally:
        if own:
            f.close()
    if got != ref.nbytes:
        raise CheckpointError(f"{ref.file}: truncated while reading tensor {ref.name!r}")


def read_tensor(ref: TensorRef, f=None) -> torch.Tensor:  # noqa: ANN001
    out = torch.empty(ref.shape, dtype=ref.dtype)
    read_into(ref, out, f)
    return out


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, from the index when there is one."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                owner = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"{index}: shard {name!r} (holding {owner!r}, ...) is missing from {folder}")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    if found:
        return [os.path.join(folder, p) for p in found]
    raise CheckpointError(f"{folder}: no {SINGLE_FILE}, no {INDEX_FILE} and no *.safetensors file")


def index_checkpoint(folder: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Every tensor of a checkpoint by name, plus the first file's __metadata__."""
    refs: dict[str, TensorRef] = {}
    meta: dict[str, str] = {}
    for i, path in enumerate(checkpoint_files(folder)):
        file_refs, file_meta = read_header(path)
        if i == 0:
            meta = file_meta
        for name, ref in file_refs.items():
            if name in refs:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {refs[name].file}")
            refs[name] = ref
    return refs, meta


# ------------------------------------------------------------------------------------------ name map
@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a native parameter, optionally one expert's slice of it."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" / "up": which half of gate_up_proj
    squeeze: bool = False  # [1, E] -> [E]


_L = r"model\.layers\.(\d+)\.mlp\."
# HF name pattern -> native template. Everything else maps to itself.
NAME_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(_L + r"moe_statics\.e_score_correction_bias$"), "model.layers.{0}.mlp.gate.e_score_correction_bias"),
    (re.compile(_L + r"gate\.moe_statics\.e_score_correction_bias$"),
     "model.layers.{0}.mlp.gate.e_score_correction_bias"),
    (re.compile(_L + r"experts\.(\d+)\.(gate|up)_proj\.weight$"), "model.layers.{0}.mlp.experts.gate_up_proj"),
    (re.compile(_L + r"experts\.(\d+)\.down_proj\.weight$"), "model.layers.{0}.mlp.experts.down_proj"),
]
IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.rotary\.inv_freq)$")


def hf_to_native(name: str) -> Target:
    if name.startswith("ernie."):  # the original remote-code prefix (spec §3.2)
        name = "model." + name[len("ernie."):]
    for pattern, template in NAME_RULES:
        m = pattern.match(name)
        if not m:
            continue
        g = m.groups()
        if "experts" in template:
            part = g[2] if len(g) > 2 else None
            return Target(template.format(g[0]), expert=int(g[1]), part=part)
        return Target(template.format(g[0]), squeeze=True)
    return Target(name)


def native_to_hf(model: ErnieForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF state dict of a native model (per-expert names, [1, E] bias, tied head left out)."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.gate.e_score_correction_bias"):
            yield name.replace("mlp.gate.e_score_correction_bias", "mlp.moe_statics.e_score_correction_bias"), \
                t.reshape(1, -1)
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                yield f"{prefix}{e}.gate_proj.weight", gate
                yield f"{prefix}{e}.up_proj.weight", up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


# ------------------------------------------------------------------------------------------- loading
def resolve_model_path(path: str | os.PathLike) -> str:
    """The checkpoint folder of a model name: a folder, a file in one, or ``demo`` (``ernie45.resolve``)."""
    from ernie45 import resolve

    try:
        return resolve.checkpoint_folder(path)
    except resolve.ModelNameError as e:
        raise CheckpointError(str(e)) from None


def build_empty(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> ErnieForCausalLM:
    """Allocate the model without initialising it (meta build, then one allocation per tensor)."""
    with torch.device("meta"):
        model = ErnieForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    advise_huge_pages([*model.parameters(), *model.buffers()])  # before the first write: 2 MiB pages stream faster
    reset_nonpersistent_buffers(model)
    model.tie_weights()
    return model


def reset_nonpersistent_buffers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset()


def plan_load(config: ModelConfig, refs: dict[str, TensorRef], folder: str) -> tuple[ModelConfig, dict]:
    """Check every checkpoint tensor against the native model; returns the (maybe MTP-less) config and
    {native name: [(ref, target), ...]}. Raises CheckpointError naming the file and tensor."""
    has_mtp = any(".mtp_" in n for n in refs)
    if config.num_nextn_predict_layers and not has_mtp:
        log.info("%s: config asks for %d MTP layer(s) but the checkpoint has no mtp tensors; loading without",
                 folder, config.num_nextn_predict_layers)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in ErnieForCausalLM(config).state_dict().items()}
    plan: dict[str, list[tuple[TensorRef, Target]]] = {}
    for name, ref in refs.items():
        if IGNORABLE.search(name):
            continue
        if ".mtp_" in name and not config.num_nextn_predict_layers:
            continue  # the draft head is optional for plain LM logits (spec §8.7)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head stored anyway (spec §1.3)
        tgt = hf_to_native(name)
        if tgt.name not in shapes:
            raise CheckpointError(f"{ref.file}: unexpected tensor {name!r} for a {config.model_type} model with "
                                  f"{config.num_hidden_layers} layers (MoE layers {config.moe_layers or 'none'}); "
                                  f"is config.json the one for these weights?")
        want, _ = shapes[tgt.name]
        if tgt.expert is not None:
            e, rows = want[0], want[1] if tgt.part is None else want[1] // 2
            want = (rows, want[2])
            if tgt.expert >= e:
                raise CheckpointError(f"{ref.file}: tensor {name!r} names expert {tgt.expert} but moe_num_experts={e}")
        elif tgt.squeeze:
            want = (1, *want)
        got = ref.shape
        if name.endswith("mtp_linear_proj.0.weight") and got == want[::-1] and got != want:
            tgt = Target(tgt.name, part="transposed")  # some 300B files store it as [2H, H] (spec §3.4)
        elif got != want:
            raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {list(got)} but the config implies "
                                  f"{list(want)}")
        plan.setdefault(tgt.name, []).append((ref, tgt))
    missing = []
    for n, (shape, _) in shapes.items():
        if n == "lm_head.weight" and config.tie_word_embeddings:
            continue
        entries = plan.get(n, [])
        stacked = ".experts." in n and entries and entries[0][1].expert is not None
        need = shape[0] * (2 if n.endswith("gate_up_proj") else 1) if stacked else 1
        if len(entries) < need:
            if n.endswith("e_score_correction_bias") and config.extra.get("moe_use_aux_free") is False:
                continue
            missing.append(n if need == 1 else f"{n} ({len(entries)} of {need} expert slices)")
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                              f"the checkpoint is incomplete or does not match config.json")
    return config, plan


def target_view(param: torch.Tensor, tgt: Target) -> torch.Tensor:
    """The part of a native parameter a checkpoint tensor fills: one expert's slice (its gate or up half
    of gate_up_proj), the [1, E] view of a squeezed bias, or the whole parameter."""
    if tgt.expert is not None:
        dest = param[tgt.expert]
        if tgt.part in ("gate", "up"):
            half = dest.shape[0] // 2
            dest = dest[:half] if tgt.part == "gate" else dest[half:]
        return dest
    return param.view(1, -1) if tgt.squeeze else param


def _fill(param: torch.Tensor, ref: TensorRef, tgt: Target, f) -> None:  # noqa: ANN001
    dest = target_view(param, tgt)
    if tgt.part == "transposed":
        dest.copy_(read_tensor(ref, f).t())
    elif dest.dtype == ref.dtype and dest.device.type == "cpu" and dest.is_contiguous():
        read_into(ref, dest, f)
    else:
        dest.copy_(read_tensor(ref, f))


def load_checkpoint(
    path: str | os.PathLike = "demo",
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> ErnieForCausalLM:
    """Load a full-precision HF-format ERNIE 4.5 checkpoint (a folder, or ``"demo"``) into ``ErnieForCausalLM``.

    dtype: compute dtype of every weight except the router and its bias, which stay fp32.
    progress: show a bar over shards (None: only on a terminal).
    ``ernie45.load_model`` (``ernie45/loading.py``) is the entry point: it calls this for a full-precision
    checkpoint and the quantized loader (``ernie45.quant.load``) otherwise.
    """
    folder = resolve_model_path(path)
    config = ModelConfig.from_json(folder)
    refs, _ = index_checkpoint(folder)
    config, plan = plan_load(config, refs, folder)
    dtype = resolve_dtype(dtype)
    model = build_empty(config, dtype, "cpu")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    by_file: dict[str, list[tuple[TensorRef, Target]]] = {}
    for entries in plan.values():
        for ref, tgt in entries:
            by_file.setdefault(ref.file, []).append((ref, tgt))
    if config.extra.get("moe_use_aux_free") is False:
        for n, b in params.items():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
    with torch.no_grad():
        for file in tqdm(sorted(by_file), desc="loading shards", unit="shard", disable=_no_bar(progress)):
            with open(file, "rb") as f:
                for ref, tgt in sorted(by_file[file], key=lambda rt: rt[0].start):
                    _fill(params[tgt.name], ref, tgt, f)
    model.tie_weights()
    model.eval()
    model.checkpoint_folder = folder  # save_model copies its tokenizer and generation files along
    return model.to(device) if torch.device(device).type != "cpu" else model


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


# -------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_tensors(tensors: Iterable[tuple[str, torch.Tensor]], folder: str, max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as HF safetensors shards (+ index when more than one), each file atomically."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    for fname, shard in zip(names, shards):
        with atomic_path(os.path.join(folder, fname)) as tmp:
            save_file(shard, tmp, metadata=meta)
    index = os.path.join(folder, INDEX_FILE)
    if n > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        weight_map = {k: fname for fname, s in zip(names, shards) for k in s}
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
    # Stale files from an earlier save with another shard count would be read as part of this one.
    for p in Path(folder).glob("model*.safetensors"):
        if p.name not in names:
            p.unlink()
    if n == 1 and os.path.exists(index):
        os.unlink(index)
    return [os.path.join(folder, f) for f in names]


def save_checkpoint(model: ErnieForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Save a full-precision model as an HF checkpoint (per-expert names, config.json) that transformers and
    we load. ``ernie45.save_model`` (``ernie45/loading.py``) also saves quantized models."""
    if getattr(model, "quant_config", None) is not None:
        raise CheckpointError("save_checkpoint writes full-precision models; save a quantized one with "
                              "ernie45.save_model")
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    dtype = model.model.embed_tokens.weight.dtype
    config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    save_tensors(native_to_hf(model), folder, max_shard_size)
    config.save_json(folder)
