"""ModelConfig: presets, HF config.json in both spellings, validation, parameter counts."""

from __future__ import annotations

import json

import pytest

from ernie45 import ConfigError, ModelConfig

OFFICIAL = "/work/shared/official/ernie-4.5-0.3b-base/config.json"


def _official_path() -> str:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for p in (OFFICIAL, os.path.join(here, "..", "..", "shared", "official", "ernie-4.5-0.3b-base", "config.json")):
        if os.path.exists(p):
            return p
    pytest.skip("shared/official fixtures not found")


def test_official_03b_config_is_the_preset():
    cfg = ModelConfig.from_json(_official_path())
    assert cfg == ModelConfig.from_name("ernie-4.5-0.3b")
    assert cfg.head_dim == 128 and cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.model_type == "ernie4_5" and not cfg.is_moe


def test_transformers_v5_spelling_reads_the_same(tmp_path):
    import transformers

    ref = transformers.Ernie4_5_MoeConfig()  # "ERNIE-4.5-21B-A3B style" defaults
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw
    cfg = ModelConfig.from_json(tmp_path)
    want = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_nextn_predict_layers=0)
    assert cfg == want


@pytest.mark.parametrize("arch,model_type", [
    ("Ernie4_5ForCausalLM", "ernie4_5"), ("Ernie4_5_ForCausalLM", "ernie4_5"),
    ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe")])
def test_every_architecture_spelling(arch, model_type):
    raw = ModelConfig.from_name("tiny-moe" if "Moe" in arch else "tiny-dense").to_hf_dict()
    raw["architectures"] = [arch]
    raw.pop("model_type")
    assert ModelConfig.from_hf_dict(raw).model_type == model_type


def test_hf_dict_round_trip_keeps_everything():
    for name in ("ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b", "tiny-moe"):
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_published_sizes():
    small = ModelConfig.from_name("ernie-4.5-0.3b")
    assert abs(small.num_params() / 1e9 - 0.36) < 0.005
    mid = ModelConfig.from_name("ernie-4.5-21b-a3b")
    assert abs(mid.num_params() / 1e9 - 21.8) < 0.1  # "21.8B in all"
    assert 2.8 < mid.num_active_params() / 1e9 < 3.5  # "A3B", ~3.3B with embeddings
    big = ModelConfig.from_name("ernie-4.5-300b-a47b")
    assert abs(big.num_params() / 1e9 - 300) < 3
    assert abs(big.num_active_params() / 1e9 - 47) < 1.5
    assert big.kv_bytes_per_token(2) == 2 * 54 * 8 * 128 * 2 == 221_184
    assert mid.moe_layers == list(range(1, 28)) and big.moe_layers == list(range(3, 54))


@pytest.mark.parametrize("changes,needle", [
    (dict(moe_k=9), "moe_k=9"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(moe_layer_end_index=7), "moe_layer_end_index=7"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers=2"),
])
def test_validation_names_field_and_value(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_name("tiny-moe").replace(**changes)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    raw = ModelConfig.from_name("tiny-moe").to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "moe_k": 12}))
    with pytest.raises(ConfigError, match=r"config.json: moe_k=12 must be between 1 and moe_num_experts=8"):
        ModelConfig.from_json(tmp_path)
