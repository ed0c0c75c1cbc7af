"""Mixed bits: QuantConfig rules by module pattern and layer range, the wint2 preset, their place in checkpoint
metadata (old version-1 metadata still read), and the planner's bytes from the same rules."""

from __future__ import annotations

import json

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, load_model, save_model
from ernie45.quant import QuantConfig, QuantExperts, QuantLinear, TensorScheme, quantize_model, quantized_nbytes
from ernie45.quant.scheme import Rule
from ernie45.tools import parse_weight_format, weight_bytes
from ernie45.tools.formats import quant_format


def _persistent_bytes(model: torch.nn.Module) -> int:
    keep = set(model.state_dict())
    return quantized_nbytes(model) - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                         if n not in keep)


def test_wint2_preset_layout():
    """Baidu's layout: dense int8 per channel, experts of layers 0-6 int4 per channel, later 2-bit g64, head bf16."""
    cfg = ModelConfig.from_name("tiny-moe").replace(num_hidden_layers=9, moe_layer_end_index=8)
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    quantize_model(model, "wint2", build_only=True, progress=False)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.scheme == TensorScheme(8, None, symmetric=True)
    for i in (1, 6):
        ex = layers[i].mlp.experts
        assert isinstance(ex, QuantExperts) and ex.gate_up_proj.scheme == TensorScheme(4, None)
    for i in (7, 8):
        assert layers[i].mlp.experts.down_proj.scheme == TensorScheme(2, 64)
    assert layers[8].mlp.shared_experts.down_proj.bits == 8
    assert not isinstance(model.lm_head, QuantLinear)
    with pytest.raises(ValueError, match="fixed layout"):
        QuantConfig.from_name("wint2", group_size=32)


def test_rules_first_match_and_json():
    r = (Rule("*.self_attn.v_proj", TensorScheme(8, 32), (2, 5)), Rule("*.mlp.experts.down_proj", None),
         Rule("lm_head", TensorScheme(6, 64)))
    qc = QuantConfig(TensorScheme(4, 128), TensorScheme(4, 64), None, rules=r)
    assert qc.scheme_for("model.layers.3.self_attn.v_proj", "dense") == TensorScheme(8, 32)
    assert qc.scheme_for("model.layers.6.self_attn.v_proj", "dense") == TensorScheme(4, 64)
    assert qc.scheme_for("model.layers.1.mlp.experts.down_proj", "experts") is None
    assert qc.scheme_for("lm_head", "head") == TensorScheme(6, 64)
    assert QuantConfig.from_json(qc.to_json()) == qc
    assert json.loads(qc.to_json())["version"] == 2
    plain = QuantConfig.from_name("int4")
    assert json.loads(plain.to_json())["version"] == 1  # older readers still load rule-free checkpoints
    old = ('{"version": 1, "name": "int4", "experts": {"bits": 4, "group_size": 128, "symmetric": false, "method": '
           '"rtn"}, "dense": {"bits": 4, "group_size": 128, "symmetric": false, "method": "rtn"}, "head": null}')
    assert QuantConfig.from_json(old) == QuantConfig(TensorScheme(4, 128), TensorScheme(4, 128), None, "int4")
    with pytest.raises(ValueError, match="layers"):
        Rule("x", None, (5, 2))


def test_half_quantized_expert_stack_is_refused():
    cfg = ModelConfig.from_name("tiny-moe")
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    qc = QuantConfig(TensorScheme(4, 32), TensorScheme(8, None, True), rules=(Rule("*.experts.down_proj", None),))
    with pytest.raises(ValueError, match="whole or not at all"):
        quantize_model(model, qc, build_only=True, progress=False)


def test_mixed_checkpoint_round_trip(tmp_path):
    """Per-layer bits and a down_proj scheme of its own survive save_model / load_model bit for bit."""
    cfg = ModelConfig.from_name("tiny-moe")
    model = init_weights(ErnieForCausalLM(cfg), seed=0)
    qc = QuantConfig(TensorScheme(4, 32), TensorScheme(8, None, True), TensorScheme(8, 32), name="mixed",
                     rules=(Rule("*.mlp.experts.down_proj", TensorScheme(6, 16, True), (2, 2)),
                            Rule("*.self_attn.*", TensorScheme(2, 32), (0, 0))))
    quantize_model(model, qc, progress=False)
    assert model.model.layers[2].mlp.experts.down_proj.bits == 6
    assert model.model.layers[1].mlp.experts.down_proj.bits == 4
    assert model.model.layers[0].self_attn.k_proj.bits == 2
    save_model(model, tmp_path)
    back = load_model(tmp_path, dtype=torch.float32)
    assert back.quant_config == qc
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.float()(ids).logits, rtol=1e-5, atol=1e-5)
    # the planner reads the stored rules: its bytes are the model's
    assert weight_bytes(cfg, quant_format(qc, "fp32")).total_bytes == _persistent_bytes(back)


@pytest.mark.parametrize("name", ["ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b"])
def test_planner_wint2_uses_the_preset_rules(name):
    """--weights wint2 follows the same per-layer rules as quantize_model(model, 'wint2'): with our storage the
    bytes equal the quantized model's; FastDeploy's storage differs in the experts' bytes (CCQ 2-bit, symmetric
    int4)."""
    cfg = ModelConfig.from_name(name).replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    quantize_model(model, "wint2", build_only=True, dtype=torch.bfloat16, progress=False)
    model = model.to(torch.bfloat16)
    ours = weight_bytes(cfg, quant_format("wint2")).total_bytes
    assert ours == _persistent_bytes(model)
    fd = weight_bytes(cfg, parse_weight_format("wint2"))
    ours_by_kind = weight_bytes(cfg, quant_format("wint2")).by_kind
    assert fd.by_kind["linear"] == ours_by_kind["linear"]  # both: int8 per channel, symmetric, bf16 scales
    assert fd.by_kind["experts"] != ours_by_kind["experts"]  # CCQ 2-bit vs our 2-bit g64 with offsets
