"""The real 21B-A3B dimensions (hidden 2560, 20/4 heads, 64 experts top-6, 2 shared, vocab 103424) with two
layers - one dense, one MoE - against transformers in bf16."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig, load_model, save_model
from ernie45.model.checkpoint import build_empty


@pytest.mark.slow
def test_21b_shape_two_layers_bf16_matches_transformers(tmp_path):
    import transformers

    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(
        num_hidden_layers=2, moe_layer_end_index=1, num_nextn_predict_layers=0)
    assert cfg.moe_layers == [1]
    model = build_empty(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.rand(64, generator=g) * 0.02)
    save_model(model, tmp_path)
    del model
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert ref.model.layers[1].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=g)
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = ours(ids).logits.float()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.03 * scale
    assert (got - want).abs().mean().item() <= 0.01 * want.abs().mean().item() * 10
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
