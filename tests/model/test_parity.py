"""Logit parity with transformers through our loader (checkpoints written by save_pretrained)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig, load_model, save_model
from tests.reference import hf_model

CONFIGS = {
    # head_dim 32 != hidden/heads = 16, tied head, biases on
    "dense-headdim-bias": ModelConfig.from_name("tiny-dense").replace(use_bias=True),
    "dense-untied": ModelConfig.from_name("tiny-dense").replace(tie_word_embeddings=False, head_dim=16),
    # shared expert, MoE from layer 1
    "moe-shared": ModelConfig.from_name("tiny-moe"),
    # no shared expert, untied, MoE only on layers 2..3 with interval 1 and head_dim != hidden/heads
    "moe-noshared-untied": ModelConfig.from_name("tiny-moe").replace(
        moe_num_shared_experts=0, tie_word_embeddings=False, num_hidden_layers=4, moe_layer_start_index=2,
        moe_layer_end_index=3, head_dim=32),
    # interval 2: layers 1 and 3 MoE; biases on
    "moe-interval-bias": ModelConfig.from_name("tiny-moe").replace(
        num_hidden_layers=4, moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=2, use_bias=True,
        moe_num_shared_experts=2),
}


def _ids(vocab: int, b: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    ref = hf_model(cfg, seed=1)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    scale = expected.abs().max().item()
    assert scale > 1.0, "reference logits too small to be informative"
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize("name", ["moe-shared", "dense-headdim-bias"])
def test_bf16_logits_close(name, tmp_path):
    cfg = CONFIGS[name]
    ref = hf_model(cfg, seed=2)
    ref.save_pretrained(tmp_path)
    ref = ref.to(torch.bfloat16)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    # Only the routers stay fp32 (spec: fp32 router logits); everything else is bf16, dense or MoE.
    fp32 = {k for k, v in ours.state_dict().items() if v.dtype != torch.bfloat16}
    routers = {f"model.layers.{i}.mlp.gate.{t}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)
               for t in ("weight", "e_score_correction_bias")}
    assert fp32 == routers and (len(routers) > 0) == cfg.is_moe, sorted(fp32)
    assert all(ours.state_dict()[k].dtype == torch.float32 for k in routers)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits.float()
        got = ours(ids).logits.float()
    scale = expected.abs().max().item()
    # bf16 has 8 mantissa bits; two implementations round at slightly different places.
    assert (got - expected).abs().max().item() <= 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_padding_mask_matches_transformers(tmp_path):
    cfg = CONFIGS["moe-shared"]
    ref = hf_model(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(cfg.vocab_size, b=2, t=10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 3:], expected[:, 3:], rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_roundtrip_ours_to_transformers_and_back(tmp_path):
    import transformers

    cfg = CONFIGS["moe-noshared-untied"]
    ref = hf_model(cfg, seed=4)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    save_model(ours, tmp_path / "ours", max_shard_size="200KB")  # forces several shards + index
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    again = load_model(tmp_path / "ours", dtype=torch.float32)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        a, b, c = ours(ids).logits, back(ids).logits, again(ids).logits
    assert torch.equal(a, c), "ours -> save -> ours must be bit-exact"
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
