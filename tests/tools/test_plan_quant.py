"""The planner's quantized weight bytes against ``ernie45.quant``'s real storage: the bytes of a model built
by ``quantize_model`` (exact, for every preset, dtype and real shape), and the resident memory of a process
after ``load_model(path, quant=...)`` (within 1%)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig
from ernie45.quant.quantize import quantize_model, quantized_nbytes
from ernie45.tools import parse_weight_format, plan_memory, weight_bytes
from tests.tools.test_plan_measured import TOLERANCE, measure_load


def _nonpersistent_bytes(model: torch.nn.Module) -> int:
    """quantized_nbytes counts every buffer; RoPE's inv_freq is not a weight (not in the state dict)."""
    persistent = set(model.state_dict())
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in persistent)


@pytest.mark.parametrize("name", ["ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b", "tiny-moe"])
@pytest.mark.parametrize("quant", ["int8", "int4", "int2"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_weight_bytes_equal_quantize_model_storage(name, quant, dtype):
    cfg = ModelConfig.from_name(name)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for mtp in (False, True):
        c = cfg if mtp else cfg.replace(num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = ErnieForCausalLM(c)
        quantize_model(model, quant, build_only=True, dtype=torch_dtype, progress=False)
        model = model.to(dtype=torch_dtype)
        real = quantized_nbytes(model) - _nonpersistent_bytes(model)
        assert weight_bytes(c, parse_weight_format(quant, dtype), mtp=mtp).total_bytes == real


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
    from tests.tools.test_plan_measured import random_checkpoint

    cfg = ModelConfig.from_name("ernie-4.5-0.3b").replace(num_hidden_layers=4)
    return random_checkpoint(cfg, str(tmp_path_factory.mktemp("q-small-0.3b-4l")))


def _check(path: str, quant: str, dtype: str = "bf16") -> None:
    plan = plan_memory(path, weights=quant, dtype=dtype, device="cpu", devices=[])
    got = measure_load(path, dtype, quant)
    assert got["tensor_bytes"] == plan.weights_bytes, (got, plan.weights_bytes)
    assert abs(got["rss_delta"] / plan.weights_bytes - 1) <= TOLERANCE, (got, plan.weights_bytes)


@pytest.mark.parametrize("quant", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantize_on_load_resident(small_checkpoint, quant):
    _check(small_checkpoint, quant)


@pytest.mark.slow
def test_quantize_on_load_resident_moe_2bit(tmp_path_factory):
    """The 21B-A3B shape with 2 layers and 2 experts: 2-bit HQQ experts, int4 dense, int8 head."""
    from tests.tools.test_plan_measured import random_checkpoint

    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_hidden_layers=2, moe_num_experts=2, moe_k=2,
                                                            moe_layer_end_index=1, num_nextn_predict_layers=0)
    _check(random_checkpoint(cfg, str(tmp_path_factory.mktemp("q-mid-int2"))), "int2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_checkpoint_folder_plans_its_own_scheme(tmp_path, dtype):
    """A folder written by save_model from a quantized model is planned in its stored scheme (group size
    overridden here, so not a preset) and compute dtype, byte for byte what the model holds."""
    from ernie45 import init_weights, load_model, save_model
    from ernie45.quant.scheme import QuantConfig

    cfg = ModelConfig.from_name("tiny-moe")
    model = init_weights(ErnieForCausalLM(cfg), seed=0).to(dtype)
    quantize_model(model, QuantConfig.from_name("int4", group_size=32), progress=False)
    save_model(model, tmp_path)
    plan = plan_memory(tmp_path, devices=[])
    assert plan.weights_format == "checkpoint:int4"
    loaded = load_model(tmp_path, dtype=dtype)
    assert plan.weights_bytes == quantized_nbytes(loaded) - _nonpersistent_bytes(loaded)
    # an explicit --weights still wins; and a plain folder is planned in its stored dtype
    assert plan_memory(tmp_path, weights="bf16", devices=[]).weights_format == "bf16"
    plain = tmp_path / "plain"
    save_model(init_weights(ErnieForCausalLM(cfg), seed=0).to(dtype), plain)
    expected = "fp32" if dtype == torch.float32 else "bf16"
    assert plan_memory(plain, devices=[]).weights_format == expected
