"""Hybrid expert placement (ernie45.offload) on CPU: the "device" and the host are both the CPU, so the whole
exchange (router on the device side, copies into the host buffers, host experts, copy back, add to the shared
experts) runs in CI and is compared against the same model placed on one device."""

from __future__ import annotations

import copy

import pytest
import torch

from ernie45 import ModelConfig
from ernie45.engine.llm import LLM
from ernie45.engine.sampling_params import SamplingParams
from ernie45.model.model import ErnieForCausalLM
from ernie45.model.moe import MoE
from ernie45.offload import HostMoE, PlacementError, choose_gpu_experts, place_experts

CFG = ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False, num_hidden_layers=4,
                                                    moe_layer_end_index=3)  # MoE layers 1-3
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _random_model(seed: int = 0) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    model = ErnieForCausalLM(CFG).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02 if "embed" in name or "lm_head" in name else 0.15)
            if "norm" in name:
                p.fill_(1.0)
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.01)
    return model.eval()


@pytest.fixture(scope="module")
def base() -> ErnieForCausalLM:
    return _random_model()


PROMPTS = [[5, 77, 301, 12, 9], [17] * 9 + [88, 123]]


def _greedy(model: ErnieForCausalLM) -> list[list[int]]:
    llm = LLM(model, kv_cache_memory="4MB", block_size=8)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _logits(model: ErnieForCausalLM) -> torch.Tensor:
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        return model(ids).logits.float()


def _check_hybrid(base: ErnieForCausalLM, n: int | None, experts_on: str = "cpu") -> None:
    ref, hyb = copy.deepcopy(base), copy.deepcopy(base)
    place_experts(ref, "cpu", experts_on="gpu")
    placement = place_experts(hyb, "cpu", experts_on=experts_on, gpu_experts=n)
    moe_layers = sum(CFG.is_moe_layer(i) for i in range(CFG.num_hidden_layers))
    kept = n or 0
    assert placement.moe_layers == moe_layers and placement.gpu_experts == kept
    blocks = [layer.mlp for layer in hyb.model.layers if layer.is_moe]
    assert [type(b) for b in blocks] == [MoE] * kept + [HostMoE] * (moe_layers - kept)
    assert placement.host_expert_bytes > 0 and (placement.device_expert_bytes > 0) == (kept > 0)
    exchange = blocks[-1].exchange
    assert not exchange.bufs
    torch.testing.assert_close(_logits(hyb), _logits(ref), rtol=1e-5, atol=1e-5)
    assert exchange.bufs, "the host experts must have run through the exchange buffers"
    assert _greedy(hyb) == _greedy(ref)


@pytest.mark.parametrize("n", [None, pytest.param(1, marks=pytest.mark.slow), 2])
def test_hybrid_matches_one_device_fp32(base, n):
    _check_hybrid(base, n)


def test_hybrid_records_router_and_state_dict_unchanged(base):
    hyb = copy.deepcopy(base)
    place_experts(hyb, "cpu", experts_on="cpu")
    assert hyb.state_dict().keys() == base.state_dict().keys()
    records_ref: list = []
    records_hyb: list = []
    with torch.inference_mode():
        for layer_ref, layer_hyb in zip(base.model.layers, hyb.model.layers):
            if layer_ref.is_moe:
                x = torch.randn(1, len(PROMPTS[0]), CFG.hidden_size)
                torch.testing.assert_close(layer_hyb.mlp(x, records_hyb), layer_ref.mlp(x, records_ref))
    assert len(records_hyb) == len(records_ref) == 3
    assert all(torch.equal(a[1], b[1]) for a, b in zip(records_hyb, records_ref))


@pytest.mark.slow
def test_hybrid_quantized_int4(base):
    from ernie45.quant.quantize import quantize_model

    q = copy.deepcopy(base)
    quantize_model(q, "int4")
    _check_hybrid(q, 1)  # layer 1's experts on the "device", layers 2-3 on the host


def test_replacing_is_reversible(base):
    m = copy.deepcopy(base)
    place_experts(m, "cpu", experts_on="cpu")
    p = place_experts(m, "cpu", experts_on="gpu")
    assert p.gpu_experts == 3 and not any(isinstance(layer.mlp, HostMoE) for layer in m.model.layers)


def test_auto_chooses_largest_n_that_fits(base):
    m = copy.deepcopy(base)
    blocks = [layer.mlp for layer in m.model.layers if layer.is_moe]
    per = [sum(t.numel() * t.element_size() for t in b.experts.parameters()) for b in blocks]
    total = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    rest = total - sum(per)
    reserve = 1000
    assert choose_gpu_experts(m, rest + reserve + per[0] + per[1] - 1, reserve) == 1  # hand arithmetic
    assert choose_gpu_experts(m, rest + reserve + sum(per), reserve) == 3
    assert choose_gpu_experts(m, rest + reserve - 1, reserve) == 0
    p = place_experts(m, "cpu", experts_on="auto", free_memory=rest + reserve + per[0] + per[1], reserve=reserve)
    assert p.gpu_experts == 2 and p.host_layers == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts_on="cpu", gpu_experts=4), "gpu_experts=4 exceeds the model's 3 MoE layers"),
    (dict(experts_on="cpu", gpu_experts=-1), "must be an integer >= 0"),
    (dict(experts_on="host"), "experts_on='host' is not a placement"),
    (dict(experts_on="auto", gpu_experts=1), "both choose N"),
    (dict(experts_on="auto"), "needs free_memory="),
    (dict(experts_on="cpu", host="meta"), "host must be the cpu"),
])
def test_placement_errors(base, kwargs, message):
    with pytest.raises(PlacementError, match=message):
        place_experts(copy.deepcopy(base), "cpu", **kwargs)


def test_dense_model_refused():
    model = ErnieForCausalLM(ModelConfig.from_name("tiny-dense"))
    with pytest.raises(PlacementError, match="no MoE layer"):
        place_experts(model, "cpu", experts_on="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_clear(base):
    with pytest.raises(PlacementError, match="no CUDA device"):
        place_experts(copy.deepcopy(base), "cuda", experts_on="cpu")


@pytest.mark.slow
def test_load_model_and_cli_wiring(capsys):
    """``load_model(..., experts_on=...)`` (what ``LLMEngine(path, experts_on=...)`` passes through) and
    ``ernie45 generate --experts-on cpu``: the bundled demo checkpoint, same greedy text as the plain placement."""
    from ernie45 import load_model
    from ernie45.cli import main

    hyb = load_model("demo", dtype=torch.float32, experts_on="cpu", gpu_experts=1)
    assert hyb.placement.gpu_experts == 1 and hyb.placement.host_layers == hyb.placement.moe_layers - 1
    assert any(isinstance(layer.mlp, HostMoE) for layer in hyb.model.layers)
    plain = load_model("demo", dtype=torch.float32)
    ids = torch.tensor([[1, 300, 301, 302, 77]])
    with torch.inference_mode():
        torch.testing.assert_close(hyb(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    flags = ["--dtype", "float32", "--kv-cache-memory", "4MB", "--temperature", "0", "--max-tokens", "4"]
    assert main(["generate", "demo", "Hello", *flags]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "demo", "Hello", *flags, "--experts-on", "cpu"]) == 0
    assert capsys.readouterr().out == want
    assert main(["generate", "demo", "Hello", *flags, "--gpu-experts", "9"]) == 2
    assert "gpu_experts=9 exceeds the model's" in capsys.readouterr().err
