"""Quantize-on-load and quantized checkpoints.

``load_quantized`` (reached through ``ernie45.load_model(path, quant="int4")``) builds the model on the
meta device, swaps in empty quantized modules, allocates them (so memory is the quantized size from the
start), then streams the bf16 checkpoint tensor by tensor, quantizing each one as it arrives — one expert
slice at a time for stacked experts. Peak memory is the quantized model plus one expert's temporaries, so a
checkpoint larger than RAM quantizes on a small machine.

A quantized checkpoint (``save_quantized``) is safetensors with native tensor names: for each quantized
weight ``<module>.qweight`` (codes packed along K, ``math.pack``), ``<module>.scales`` and ``<module>.zeros``
``[.., N, G]`` (w = (code - 2**(bits-1)) * scale + zero); everything else as in the model. The scheme is
JSON in the metadata key ``ernie45.quant``; ``load_model(folder)`` sees it and loads the checkpoint
directly, converting to the kernels' layouts.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import ExitStack

import torch
from tqdm.auto import tqdm

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import (
    CheckpointError,
    Target,
    TensorRef,
    _fill,
    index_checkpoint,
    plan_load,
    read_into,
    read_tensor,
    reset_nonpersistent_buffers,
    save_tensors,
)
from ernie45.model.model import ErnieForCausalLM
from ernie45.quant.math import pack, unpack
from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight
from ernie45.quant.quantize import _set_module, quantize_model, qweights
from ernie45.quant.scheme import METADATA_KEY, QuantConfig
from ernie45.utils import advise_huge_pages, resolve_dtype

log = logging.getLogger(__name__)

LAYOUT_KEY = "ernie45.quant.layout"
LAYOUT = "packed-v1"
"""On-disk layout version: codes packed along K, first column in the lowest bits."""
def build_quantized(config: ModelConfig, qconfig: QuantConfig, dtype: torch.dtype) -> ErnieForCausalLM:
    """Allocate a quantized model without filling it: meta build, module swap, one allocation."""
    with torch.device("meta"):
        model = ErnieForCausalLM(config)
    quantize_model(model, qconfig, build_only=True, dtype=dtype, progress=False)
    model = model.to(dtype=dtype).to_empty(device="cpu")  # int codes stay int; the router stays fp32
    advise_huge_pages([*model.parameters(), *model.buffers()])  # before the first write: 2 MiB pages stream faster
    reset_nonpersistent_buffers(model)
    if not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    model.quant_config = qconfig
    return model


def _scheme_from(quant: str | QuantConfig, opts: dict) -> QuantConfig:
    if isinstance(quant, QuantConfig):
        if opts:
            raise TypeError(f"options {sorted(opts)} conflict with a QuantConfig; put them in the config")
        return quant
    allowed = {"group_size", "method", "dense_bits", "head_bits"}
    unknown = set(opts) - allowed
    if unknown:
        raise TypeError(f"load_model got unexpected options {sorted(unknown)}; quantization takes "
                        f"{sorted(allowed)}")
    return QuantConfig.from_name(quant, **opts)


def load_quantized(folder: str, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cpu",
                   progress: bool | None = None, quant: str | QuantConfig | None = None,
                   **opts) -> ErnieForCausalLM:
    """Load a checkpoint quantized: a bf16/fp32 one is quantized while it streams in, a quantized one
    (metadata ``ernie45.quant``) is read as it is.

    quant: "int8", "int4", "int2" or a ``QuantConfig``; opts: group_size, method ("rtn" | "hqq"),
    dense_bits, head_bits (see ``QuantConfig.from_name``). dtype: compute dtype (activations, scales).
    device: loaded and quantized on the CPU, then moved (``to_device``: the packed layout off the CPU).
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    refs, meta = index_checkpoint(folder)
    config = ModelConfig.from_json(folder)
    if METADATA_KEY in meta:
        stored = QuantConfig.from_json(meta[METADATA_KEY], source=folder)
        if quant is not None and _scheme_from(quant, opts) != stored:
            raise ValueError(f"{folder} is already quantized ({stored.describe()}); load it without quant=, "
                             f"or quantize the full-precision checkpoint")
        return to_device(_load_prequantized(folder, config, stored, refs, meta, dtype, progress), device)
    if quant is None:
        raise ValueError("load_quantized needs quant= ('int8', 'int4', 'int2') for a full-precision checkpoint")
    qconfig = _scheme_from(quant, opts)
    config, plan = plan_load(config, refs, folder)
    model = build_quantized(config, qconfig, dtype)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    if config.extra.get("moe_use_aux_free") is False:
        for n, b in params.items():
            if n.endswith("e_score_correction_bias"):
                b.zero_()
    # Walk the checkpoint in file order so reads stream; a stacked expert tensor is done slice by slice.
    order = sorted(plan, key=lambda n: (plan[n][0][0].file, plan[n][0][0].start))
    total = sum(ref.nbytes for entries in plan.values() for ref, _ in entries)
    bar = tqdm(total=total, desc=f"quantizing to {qconfig.name}", unit="B", unit_scale=True,
               disable=None if progress is None else not progress)
    with ExitStack() as stack, torch.no_grad():
        files: dict[str, object] = {}

        def fh(path: str):  # noqa: ANN202 - an open binary file
            if path not in files:
                files[path] = stack.enter_context(open(path, "rb"))
            return files[path]

        for name in order:
            entries = plan[name]
            owner, _, leaf = name.rpartition(".")
            mod = modules.get(owner)
            if isinstance(mod, QuantLinear) and leaf == "weight":
                (ref, tgt), = entries
                w = read_tensor(ref, fh(ref.file))
                mod.quantize_(None, w.t() if tgt.part == "transposed" else w)
            elif isinstance(mod, QuantExperts):
                _quantize_experts(getattr(mod, leaf), entries, fh)
            else:
                for ref, tgt in entries:
                    _fill(params[name], ref, tgt, fh(ref.file))
            bar.update(sum(ref.nbytes for ref, _ in entries))
        if config.tie_word_embeddings and isinstance(model.lm_head, QuantLinear):
            model.lm_head.quantize_(None, model.model.embed_tokens.weight)  # a tied head: its own quantized copy
    bar.close()
    model.eval()
    return to_device(model, device)


@torch.no_grad()
def to_device(model: ErnieForCausalLM, device: str | torch.device) -> ErnieForCausalLM:
    """Move a quantized model (loaded on the CPU) to ``device``. Off the CPU every quantized weight is
    re-stored, bit-exactly, in the portable ``packed`` layout (dequantized per call): the ``int8``/``int4``
    layouts are for the CPU kernels, which other devices do not have."""
    device = torch.device(device)
    if device.type == "cpu":
        return model
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            new = QuantLinear(m.in_features, m.out_features, m.scheme, m.bias is not None, m.dtype, device)
            new.set_stored(None, *(t.to(device) for t in m.stored(None)))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        elif isinstance(m, QuantExperts):
            new = QuantExperts(m.num_experts, m.hidden, m.width, m.gate_up_proj.scheme, m.gate_up_proj.dtype,
                               device)
            for src, dst in ((m.gate_up_proj, new.gate_up_proj), (m.down_proj, new.down_proj)):
                for i in range(m.num_experts):
                    dst.set_stored(i, *(t.to(device) for t in src.stored(i)))
        else:
            continue
        _set_module(model, name, new)
    model.to(device)
    if not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    return model.eval()


def _quantize_experts(qw: QWeight, entries: list[tuple[TensorRef, Target]], fh) -> None:  # noqa: ANN001
    """Quantize a stacked expert weight from its per-expert checkpoint slices, one expert at a time."""
    by_expert: dict[int, dict[str | None, TensorRef]] = defaultdict(dict)
    for ref, tgt in entries:
        by_expert[tgt.expert][tgt.part] = ref
    for e in sorted(by_expert):
        parts = by_expert[e]
        if set(parts) == {"gate", "up"}:  # gate rows first (moe.Experts)
            w = torch.cat([read_tensor(parts["gate"], fh(parts["gate"].file)),
                           read_tensor(parts["up"], fh(parts["up"].file))])
        else:
            ref = parts[None]
            w = read_tensor(ref, fh(ref.file))
        qw.quantize_(e, w)


def _load_prequantized(folder: str, config: ModelConfig, qconfig: QuantConfig, refs: dict[str, TensorRef],
                       meta: dict[str, str], dtype: torch.dtype, progress: bool | None) -> ErnieForCausalLM:
    if meta.get(LAYOUT_KEY, LAYOUT) != LAYOUT:
        raise CheckpointError(f"{folder}: quantized layout {meta[LAYOUT_KEY]!r} is not {LAYOUT!r}; "
                              f"a newer ernie45 wrote it")
    if config.num_nextn_predict_layers and not any(".mtp_" in n for n in refs):
        config = config.replace(num_nextn_predict_layers=0)
    model = build_quantized(config, qconfig, dtype)
    qws = dict(qweights(model))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = {n for n in model.state_dict() if n.rpartition(".")[0] not in qws}
    if isinstance(model.lm_head, torch.nn.Linear) and config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    for qname in qws:
        expected |= {f"{qname}.qweight", f"{qname}.scales", f"{qname}.zeros"}
        expected |= {f"{qname}.bias"} if f"{qname}.bias" in params else set()
    missing = sorted(expected - set(refs))
    extra = sorted(set(refs) - expected)
    if missing or extra:
        raise CheckpointError(f"{folder}: quantized checkpoint does not match config.json and its scheme "
                              f"({qconfig.describe()}): missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for name in tqdm(sorted(expected, key=lambda n: (refs[n].file, refs[n].start)), desc="loading",
                         unit="tensor", disable=None if progress is None else not progress):
            owner, _, leaf = name.rpartition(".")
            if owner in qws and leaf != "bias":
                continue
            dest, ref = params[name], refs[name]
            if tuple(ref.shape) != tuple(dest.shape):
                raise CheckpointError(f"{ref.file}: tensor {name!r} has shape {list(ref.shape)}, expected "
                                      f"{list(dest.shape)}")
            if dest.dtype == ref.dtype:
                read_into(ref, dest)
            else:
                dest.copy_(read_tensor(ref))
        for qname, qw in qws.items():
            lead = tuple(qw.qweight.shape[:-2])
            want = {"qweight": (*lead, qw.n, qw.k * qw.bits // 8), "scales": (*lead, qw.n, qw.k // qw.group),
                    "zeros": (*lead, qw.n, qw.k // qw.group)}
            for leaf, shape in want.items():
                ref = refs[f"{qname}.{leaf}"]
                if tuple(ref.shape) != shape:
                    raise CheckpointError(f"{ref.file}: tensor {ref.name!r} has shape {list(ref.shape)}, expected "
                                          f"{list(shape)} for {qw.scheme.describe()}; config.json does not match")
            codes, scales, zeros = (read_tensor(refs[f"{qname}.{s}"]) for s in ("qweight", "scales", "zeros"))
            for i in range(codes.shape[0]) if codes.dim() == 3 else [None]:
                c, s, z = (t if i is None else t[i] for t in (codes, scales, zeros))
                qw.set_stored(i, unpack(c, qw.bits), s.to(qw.dtype), z.to(qw.dtype))
    model.eval()
    return model


def quantized_tensors(model: ErnieForCausalLM):  # noqa: ANN201 - iterator of (name, tensor)
    """The checkpoint tensors of a quantized model: portable packed codes for each quantized weight,
    everything else under its native name (a tied, unquantized head left out)."""
    qws = dict(qweights(model))
    tied = model.config.tie_word_embeddings and not isinstance(model.lm_head, QWeight)
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in qws and leaf != "bias" or (tied and name == "lm_head.weight"):
            continue
        yield name, t
    for qname, qw in qws.items():
        lead = qw.qweight.shape[:-2]
        idx = list(range(lead[0])) if lead else [None]
        parts = [qw.stored(i) for i in idx]
        packed = [pack(c, qw.bits) for c, _, _ in parts]
        if lead:
            yield f"{qname}.qweight", torch.stack(packed)
            yield f"{qname}.scales", torch.stack([s for _, s, _ in parts]).contiguous()
            yield f"{qname}.zeros", torch.stack([z for _, _, z in parts]).contiguous()
        else:
            yield f"{qname}.qweight", packed[0]
            yield f"{qname}.scales", parts[0][1].contiguous()
            yield f"{qname}.zeros", parts[0][2].contiguous()


def save_quantized(model: ErnieForCausalLM, folder: str, max_shard_size: int | str = "5GB") -> None:
    """Write a quantized model as safetensors with the scheme in the metadata (``save_model`` calls it)."""
    qconfig: QuantConfig = model.quant_config
    dtype = model.model.embed_tokens.weight.dtype
    meta = {METADATA_KEY: qconfig.to_json(), LAYOUT_KEY: LAYOUT}
    save_tensors(quantized_tensors(model), folder, max_shard_size, metadata=meta)
    model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save_json(folder)
