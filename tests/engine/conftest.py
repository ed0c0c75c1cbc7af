"""Engine fixtures: tiny informative fp32 models (untied heads: a tied head with these weights
greedily repeats the last token, which would make generation tests unable to fail)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig, load_model
from tests.reference import hf_model

CONFIGS = {
    "dense": ModelConfig.from_name("tiny-dense").replace(tie_word_embeddings=False),
    "moe": ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict:
    """name -> (transformers model, folder it was saved to)."""
    out = {}
    for name, cfg in CONFIGS.items():
        ref = hf_model(cfg, seed=1)
        folder = tmp_path_factory.mktemp(f"hf-{name}")
        ref.save_pretrained(folder)
        out[name] = (ref, str(folder))
    return out


@pytest.fixture(scope="session")
def moe_model(hf_checkpoints):
    return load_model(hf_checkpoints["moe"][1], dtype=torch.float32)


@pytest.fixture(scope="session")
def dense_model(hf_checkpoints):
    return load_model(hf_checkpoints["dense"][1], dtype=torch.float32)


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
