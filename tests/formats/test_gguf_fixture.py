"""A file made by llama.cpp itself, without llama.cpp at test time: ``fixtures/tiny-q4km.gguf`` is llama.cpp's own
Q4_K_M (Q4_K + Q6_K tensors) of a tiny MoE, with llama.cpp's logits on it recorded beside it
(``fixtures/make_gguf_fixtures.py`` rebuilds both with llama-cpp-python). We load it with every weight equal to
gguf-py's dequantization and logits close to llama.cpp's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ernie45.formats import ggml  # noqa: E402
from ernie45.formats.gguf import GGUFFile, gguf_to_native, load_gguf  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "fixtures")
PATH = os.path.join(HERE, "tiny-q4km.gguf")
TOKENS = [5, 12, 19, 26, 33, 40, 47, 54, 61]


def test_llama_cpp_q4km_fixture_loads_exactly():
    assert {ggml.Q4_K, ggml.Q6_K} <= {t.qtype for t in GGUFFile(PATH).tensors.values()}
    model = load_gguf(PATH, dtype=torch.float32)
    mods = dict(model.named_modules())
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for t in gguf.GGUFReader(PATH).tensors:
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        native, part = gguf_to_native(t.name)
        owner, _, leaf = native.rpartition(".")
        mod = mods.get(owner)
        if ref.dim() == 3:
            qw = getattr(mod, leaf)
            rows = slice(0, ref.shape[1]) if part != "up" else slice(ref.shape[1], None)
            got = torch.stack([qw.dequantize(e, torch.float32)[rows] for e in range(ref.shape[0])])
        elif hasattr(mod, "qweight") and leaf == "weight":
            got = mod.dequantize(None, torch.float32)
        else:
            got = params[native].float().reshape(ref.shape)
        assert torch.equal(got, ref), t.name
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0]
    theirs = torch.from_numpy(np.load(os.path.join(HERE, "tiny-q4km-llama-logits.npy")))
    # llama.cpp quantizes activations to Q8 for its quantized matmuls; we compute in fp32: the median position
    err = float(((ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)).median())
    assert err < 3e-2, err
