"""``ernie45 convert`` / ``ernie45 export-gguf``: one command between HF safetensors (ours, quantized or not),
llama.cpp GGUF and Paddle folders, with a final logit check of the converted model against the source.

Reading: ``ernie45.load_model`` (GGUF files and Paddle folders through ``ernie45.formats.foreign``).
Writing: ``hf`` (a safetensors folder: plain float, or our quantized checkpoint when the model is quantized or
``--type int8|int4|int2|wint2`` asks), ``gguf`` (``--type bf16|q8_0|q4_0``) and ``paddle`` (bf16 Paddle layout).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ernie45.formats.foreign import load_foreign  # noqa: F401 - re-exported for callers of this module
from ernie45.loading import load_model, save_model
from ernie45.model.checkpoint import build_empty, resolve_model_path, save_tensors
from ernie45.model.model import ErnieForCausalLM

log = logging.getLogger(__name__)

TARGETS = ("hf", "gguf", "paddle")
HF_TYPES = ("keep", "bf16", "fp32", "int8", "int4", "int2", "wint2")


@torch.no_grad()
def dequantize_model(model: ErnieForCausalLM, dtype: torch.dtype = torch.bfloat16) -> ErnieForCausalLM:
    """A full-precision copy of a quantized model (each quantized weight dequantized), built one tensor at a time."""
    if getattr(model, "quant_config", None) is None:
        return model.to(dtype)
    out = build_empty(model.config, dtype)
    mods = dict(model.named_modules())
    src = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, p in list(out.named_parameters()) + list(out.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        q = mods.get(owner)
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if hasattr(q, "qweight") and leaf == "weight":
            p.copy_(q.dequantize(None, torch.float32))
        elif hasattr(getattr(q, leaf, None), "qweight"):  # an expert stack
            qw = getattr(q, leaf)
            for e in range(p.shape[0]):
                p[e].copy_(qw.dequantize(e, torch.float32))
        elif name in src:
            p.copy_(src[name])
    if model.config.tie_word_embeddings:
        out.tie_weights()
    return out.eval()


def _tokenizer(src: str):  # noqa: ANN202 - Tokenizer | None
    from ernie45.loading import load_tokenizer

    try:
        return load_tokenizer(src)
    except (ValueError, ImportError) as e:
        log.warning("%s: tokenizer not carried over (%s)", src, e)
        return None


def _write_tokenizer(src: str, dst: str, tokenizer) -> list[str]:  # noqa: ANN001
    """Tokenizer files for a folder target: copied from a folder source, rebuilt from a GGUF's metadata."""
    from ernie45 import resolve

    os.makedirs(dst, exist_ok=True)
    if os.path.isdir(src):
        return resolve.copy_files(src, dst, resolve.TOKENIZER_FILES + resolve.DOC_FILES)
    if tokenizer is None:
        return []
    from ernie45.utils import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(os.path.join(dst, "tokenizer.model"), tokenizer.sp.serialized_model_proto())
    config = {k: v for k, v in tokenizer.config.items() if isinstance(v, (str, bool, int))}
    config.update(add_bos_token=False, tokenizer_class="LlamaTokenizer", legacy=True, add_prefix_space=False)
    atomic_write_text(os.path.join(dst, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))
    return ["tokenizer.model", "tokenizer_config.json"]


def _probe(model: ErnieForCausalLM, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = (torch.arange(tokens) * 7919 + 11) % model.config.vocab_size  # fixed, spread over the vocabulary
    with torch.no_grad():
        return ids, model(ids[None]).logits[0].float()


def convert(src: str, dst: str, to: str | None = None, type: str | None = None, check_tokens: int = 8,
            dtype: str | torch.dtype = "bfloat16", progress: bool | None = None) -> dict:
    """Convert ``src`` (HF folder, ours quantized, GGUF file or Paddle folder) to ``dst``.

    to: hf | gguf | paddle (default: gguf for a ``.gguf`` destination, else hf).
    type: gguf -> bf16 | q8_0 | q4_0 (default bf16); hf -> keep (default: a quantized source stays quantized) |
        bf16 | fp32 (dequantized) | int8 | int4 | int2 | wint2 (quantized with that preset).
    check_tokens: after writing, load ``dst`` and compare its logits on this many tokens with the source's.
    Returns {"max_abs_diff", "max_rel_diff", "tokens", ...}.
    """
    src, dst = resolve_model_path(src), os.fspath(dst)
    to = (to or ("gguf" if dst.endswith(".gguf") else "hf")).lower()
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not a target; choose one of {list(TARGETS)}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: the destination is the source; give another path")
    model = load_model(src, dtype=dtype, progress=progress)
    tokenizer = _tokenizer(src)
    ids, before = _probe(model, check_tokens)
    if to == "gguf":
        from ernie45.formats.gguf import export_gguf

        export_gguf(model, dst, type or "bf16", tokenizer=tokenizer, progress=progress)
    elif to == "paddle":
        from ernie45.formats.paddle import to_paddle_tensors

        if type not in (None, "bf16"):
            raise ValueError(f"--type {type!r}: the Paddle target is written in bf16 only")
        model = dequantize_model(model, torch.bfloat16)
        save_tensors(to_paddle_tensors(model), dst)
        model.config.save_json(dst)
        _write_tokenizer(src, dst, tokenizer)
    else:
        kind = (type or "keep").lower()
        if kind not in HF_TYPES:
            raise ValueError(f"--type {type!r} is not an HF target type; choose one of {list(HF_TYPES)}")
        if kind in ("bf16", "fp32"):
            model = dequantize_model(model, torch.bfloat16 if kind == "bf16" else torch.float32)
        elif kind != "keep":
            from ernie45.quant import quantize_model

            if getattr(model, "quant_config", None) is not None:
                model = dequantize_model(model, model.model.embed_tokens.weight.dtype)
            quantize_model(model, kind, progress=progress)
        save_model(model, dst)
        _write_tokenizer(src, dst, tokenizer)
    del model
    after_model = load_model(dst, dtype=dtype, progress=False)
    _, after = _probe(after_model, check_tokens)
    diff = float((after - before).abs().max())
    return {"to": to, "type": type or ("bf16" if to != "hf" else "keep"), "tokens": ids.tolist(),
            "max_abs_diff": diff, "max_rel_diff": diff / max(float(before.abs().max()), 1e-30),
            "same_argmax": bool((after.argmax(-1) == before.argmax(-1)).all())}

