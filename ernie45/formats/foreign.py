"""Reading the weight files of other tools: ``load_foreign`` picks llama.cpp's GGUF (``gguf.py``) or an
ERNIEKit/FastDeploy ``-Paddle`` folder (``paddle.py``). ``ernie45.load_model`` (``ernie45/loading.py``) calls it by
file suffix / tensor names; ``ernie45 convert`` (``ernie45/tools/convert.py``) writes the other direction."""

from __future__ import annotations

import os

import torch

from ernie45.model.model import ErnieForCausalLM


def load_foreign(path: str, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 progress: bool | None = None, **options) -> ErnieForCausalLM:
    """A GGUF file or a Paddle checkpoint folder as ``ErnieForCausalLM`` (``load_model`` options)."""
    if os.fspath(path).endswith(".gguf"):
        from ernie45.formats.gguf import load_gguf

        return load_gguf(path, dtype=dtype, device=device, progress=progress, **options)
    from ernie45.formats.paddle import load_paddle

    return load_paddle(path, dtype=dtype, device=device, progress=progress, **options)
