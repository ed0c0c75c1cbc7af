"""``load_model`` / ``save_model``: the one entry point for checkpoints, plain or quantized.

It sits above both formats so neither imports the other: ``ernie45.model.checkpoint`` reads and writes
full-precision HF checkpoints of the plain model, ``ernie45.quant.load`` quantizes while loading and reads
and writes quantized checkpoints (scheme in the safetensors metadata). This module only chooses.
The quant imports are local to the functions: ``import ernie45`` stays as light as the plain model.
"""

from __future__ import annotations

import os

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
    **quant_options,
) -> ErnieForCausalLM:
    """Load an HF-format ERNIE 4.5 checkpoint (a folder, or ``"demo"``) into ``ErnieForCausalLM``.

    dtype: compute dtype of every weight except the router and its bias, which stay fp32.
    device: where the weights end up. progress: show a bar over shards (None: only on a terminal).
    quant_options: ``quant="int4"`` etc. quantize while loading (see ``ernie45.quant.load.load_quantized``);
    a checkpoint saved quantized loads quantized without them.
    """
    folder = resolve_model_path(path)
    if quant_options.get("quant") or is_quantized_checkpoint(folder):
        from ernie45.quant.load import load_quantized  # quantize-on-load streams differently

        return load_quantized(folder, dtype=resolve_dtype(dtype), device=device, progress=progress, **quant_options)
    if quant_options:
        raise TypeError(f"load_model got unexpected options {sorted(quant_options)}")
    return load_checkpoint(folder, dtype=dtype, device=device, progress=progress)


def save_model(model: ErnieForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Save as an HF checkpoint that transformers and we load (full precision), or as a quantized
    checkpoint with its scheme in the metadata (a model from ``load_model(..., quant=...)``)."""
    if getattr(model, "quant_config", None) is not None:
        from ernie45.quant.load import save_quantized

        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        save_quantized(model, folder, max_shard_size)
        return
    save_checkpoint(model, path, max_shard_size)
