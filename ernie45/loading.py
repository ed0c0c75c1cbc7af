"""``load_model`` / ``save_model``: the one entry point for checkpoints, plain or quantized.

It sits above both formats so neither imports the other: ``ernie45.model.checkpoint`` reads and writes
full-precision HF checkpoints of the plain model, ``ernie45.quant.load`` quantizes while loading and reads
and writes quantized checkpoints (scheme in the safetensors metadata). This module only chooses.
The quant imports are local to the functions: ``import ernie45`` stays as light as the plain model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ernie45.model.checkpoint import (
    CheckpointError,
    index_checkpoint,
    load_checkpoint,
    resolve_model_path,
    save_checkpoint,
)
from ernie45.model.model import ErnieForCausalLM
from ernie45.utils import resolve_dtype

__all__ = ["is_quantized_checkpoint", "load_model", "save_model"]


def is_quantized_checkpoint(folder: str) -> bool:
    """True when the checkpoint's safetensors metadata carries a quantization scheme."""
    from ernie45.quant.scheme import METADATA_KEY

    try:
        _, meta = index_checkpoint(folder)
    except CheckpointError:
        return False  # no readable weights: load_checkpoint reports the problem with the file's name
    return METADATA_KEY in meta


def load_model(
    path: str | os.PathLike = "demo",
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    experts_on: str | None = None,
    gpu_experts: int | None = None,
    **quant_options,
) -> ErnieForCausalLM:
    """Load an HF-format ERNIE 4.5 checkpoint (a folder, or ``"demo"``) into ``ErnieForCausalLM``.

    dtype: compute dtype of every weight except the router and its bias, which stay fp32.
    device: where the weights end up. progress: show a bar over shards (None: only on a terminal).
    quant_options: ``quant="int4"`` etc. quantize while loading (see ``ernie45.quant.load.load_quantized``);
    a checkpoint saved quantized loads quantized without them.
    experts_on / gpu_experts: hybrid placement (``ernie45.offload.place_experts``): load on the host, keep the
    routed experts of the chosen MoE layers there and move the rest to ``device``.
    """
    if experts_on is not None or gpu_experts is not None:
        from ernie45.offload import place_experts

        model = load_model(path, dtype, "cpu", progress, **quant_options)
        place_experts(model, device, experts_on=experts_on or "cpu", gpu_experts=gpu_experts)
        return model
    folder = resolve_model_path(path)
    if quant_options.get("quant") or is_quantized_checkpoint(folder):
        from ernie45.quant.load import load_quantized  # quantize-on-load streams differently

        model = load_quantized(folder, dtype=resolve_dtype(dtype), device=device, progress=progress,
                               **quant_options)
    elif quant_options:
        raise TypeError(f"load_model got unexpected options {sorted(quant_options)}")
    else:
        model = load_checkpoint(folder, dtype=dtype, device=device, progress=progress)
    model.checkpoint_folder = folder  # save_model copies its tokenizer and generation files along
    return model


def save_model(model: ErnieForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               tokenizer: str | os.PathLike | Any = None) -> None:
    """Save as an HF checkpoint that transformers and we load (full precision), or as a quantized
    checkpoint with its scheme in the metadata (a model from ``load_model(..., quant=...)``).

    tokenizer: where the tokenizer and generation files come from (a model name as ``load_model`` takes, or a
    ``Tokenizer`` read from a folder); by default the folder the model was loaded from, if any. They are copied
    beside the weights so the folder opens everywhere (``LLM``, ``ernie45 serve``, transformers)."""
    from ernie45 import resolve

    folder = os.fspath(path)
    src = getattr(tokenizer, "source", tokenizer) if tokenizer is not None else getattr(model, "checkpoint_folder",
                                                                                        None)
    if getattr(model, "quant_config", None) is not None:
        from ernie45.quant.load import save_quantized

        os.makedirs(folder, exist_ok=True)
        save_quantized(model, folder, max_shard_size)
    else:
        save_checkpoint(model, folder, max_shard_size)
    if src is not None and os.fspath(src) != "<memory>":
        resolve.copy_files(src, folder, resolve.TOKENIZER_FILES)
