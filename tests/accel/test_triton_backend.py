"""The ``triton`` backend end to end: module swaps and paged attention through the engine, against the torch
reference (on CPU under Triton's interpreter, set by tests/conftest.py; fp32)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig
from ernie45.accel import BACKENDS, accelerate
from ernie45.engine.llm import LLMEngine
from ernie45.engine.sampling_params import SamplingParams
from ernie45.kernels import triton as tk
from ernie45.model.model import ErnieForCausalLM, init_weights
from tests.engine.conftest import prompts

pytestmark = pytest.mark.skipif(not tk.available(), reason="triton is not installed (the test extra installs it)")

CFG = ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False, head_dim=16)


def _model(seed: int = 0) -> ErnieForCausalLM:
    return init_weights(ErnieForCausalLM(CFG), std=0.08, seed=seed).eval()


def _generate(model, backend: str, ps, max_tokens: int = 8) -> list[list[int]]:  # noqa: ANN001
    eng = LLMEngine(model, kv_cache_memory="2MB", backend=backend, block_size=4, max_num_batched_tokens=16)
    assert eng.backend == backend
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[str(i)] for i in range(len(ps))]


@pytest.mark.slow
def test_engine_greedy_tokens_equal_the_torch_reference():
    """Chunked prefill (budget 16 < a 21-token prompt), decodes of several sequences, prefix blocks: the same
    tokens through the Triton kernels (fused MoE, paged attention, RMSNorm) as through the reference."""
    ps = prompts(CFG.vocab_size, [21, 6, 11], seed=3)
    ref = _generate(_model(), "torch", ps)
    model = _model()
    got = _generate(model, "triton", ps)
    assert got == ref
    names = {type(m).__name__ for m in model.modules()}
    assert {"TritonRMSNorm", "TritonExperts"} <= names


def test_logits_equal_the_reference_and_swaps_revert():
    model = _model(1)
    ids = torch.tensor([prompts(CFG.vocab_size, [9], seed=1)[0]])
    ref = model(ids).logits
    accelerate(model, "triton")
    assert model.accel_backend == "triton"
    with torch.no_grad():
        got = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    accelerate(model, "torch")
    assert not any(type(m).__name__.startswith("Triton") for m in model.modules())


def test_quantized_experts_and_linears_stay_packed(monkeypatch):
    """A model quantized in the portable packed layout (what a GPU gets): the Triton path reads the codes, and
    equals the reference quantized model."""
    from ernie45.quant import QuantConfig, quantize_model
    from ernie45.quant.formats.packed import PackedFormat

    monkeypatch.setattr("ernie45.quant.modules.choose_format",
                        lambda lead, n, k, s, g, d: PackedFormat(lead, n, k, s, g))
    model = quantize_model(_model(2), QuantConfig.from_name("int4", group_size=16))
    ids = torch.tensor([prompts(CFG.vocab_size, [7], seed=2)[0]])
    with torch.no_grad():
        ref = model(ids).logits
        accelerate(model, "triton")
        names = {type(m).__name__ for m in model.modules()}
        assert {"TritonQuantExperts", "TritonQuantLinear"} <= names
        got = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-3 * ref.abs().max().item()


def test_the_backend_says_where_it_runs(monkeypatch):
    assert "triton" in BACKENDS
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    from ernie45.accel import triton as tb

    if not torch.cuda.is_available():
        assert "no CUDA device" in tb.why_unusable()
        with pytest.raises(ValueError, match="triton"):
            accelerate(_model(), "triton")
