"""LoRA: only adapters train, merge equals base+adapter, adapters save alone and reload."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ernie45 import ModelConfig, init_weights
from ernie45.model.model import ErnieForCausalLM
from ernie45.train.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer


def _model(seed=0):
    return init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe")), seed=seed).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


IDS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))


def test_wraps_attention_dense_mlp_shared_and_stacked_experts():
    m = apply_lora(_model(), LoRAConfig(r=4))
    layer0, layer1 = m.model.layers[0], m.model.layers[1]
    assert isinstance(layer0.self_attn.q_proj, LoRALinear) and isinstance(layer0.mlp.down_proj, LoRALinear)
    assert isinstance(layer1.mlp.experts, LoRAExperts) and isinstance(layer1.mlp.shared_experts.up_proj, LoRALinear)
    assert type(layer1.mlp.gate).__name__ == "Router"  # the router is never adapted
    assert layer1.mlp.experts.gate_up_A.shape == (8, 4, 64) and layer1.mlp.experts.down_B.shape == (8, 64, 4)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate_up_A", "gate_up_B", "down_A",
                                                      "down_B") for n in trainable)


def test_fresh_adapter_is_identity_and_merge_matches_adapter_outputs():
    base = _model()
    with torch.no_grad():
        ref = base(IDS).logits
    m = apply_lora(_model(), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref)  # B = 0 at init
    _randomize_adapters(m)
    with torch.no_grad():
        adapted = m(IDS).logits
        assert (adapted - ref).abs().max() > 1e-3  # the adapters (incl. experts) do something
        merged = merge_lora(m)
        assert not any(isinstance(x, (LoRALinear, LoRAExperts)) for x in merged.modules())
        torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_only_experts_adapter_changes_routed_expert_output():
    m = apply_lora(_model(), LoRAConfig(r=2, targets=["experts"]))
    _randomize_adapters(m)
    ex = m.model.layers[1].mlp.experts
    x = torch.randn(5, 64)
    base_out = torch.nn.functional.linear(
        torch.nn.functional.silu(x @ ex.gate_up_proj[3][:32].T) * (x @ ex.gate_up_proj[3][32:].T), ex.down_proj[3])
    with torch.no_grad():
        got = ex.expert_forward(3, x)
        gu = x @ (ex.gate_up_proj[3] + ex.scale * ex.gate_up_B[3] @ ex.gate_up_A[3]).T
        a = torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:]
        want = a @ (ex.down_proj[3] + ex.scale * ex.down_B[3] @ ex.down_A[3]).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base_out).abs().max() > 1e-4


def test_adapter_saves_alone_and_reloads(tmp_path):
    m = apply_lora(_model(), LoRAConfig(r=4))
    _randomize_adapters(m)
    with torch.no_grad():
        want = m(IDS).logits
    save_adapter(m, str(tmp_path / "ad"), LoRAConfig(r=4), base="tiny-moe")
    files = sorted(os.listdir(tmp_path / "ad"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model"] == "tiny-moe"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert all("lora_" in k or k.endswith(("_A", "_B")) for k in f.keys())  # no base weights inside
    for merge in (False, True):
        again = load_adapter(_model(), str(tmp_path / "ad"), merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(again(IDS).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a LoRA adapter folder"):
        load_adapter(_model(), str(tmp_path))


def test_lora_training_changes_only_adapters(tmp_path, tok, tok_dir, small_corpus):
    base_dir = tmp_path / "base"
    from ernie45 import save_model

    base = init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe").replace(vocab_size=1024)), seed=0)
    save_model(base, base_dir)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (base_dir / f).write_bytes(open(os.path.join(tok_dir, f), "rb").read())
    cfg = TrainConfig(task="pretrain", output_dir=str(tmp_path / "run"), init_from=str(base_dir),
                      data=[small_corpus], seq_len=32, batch_size=4, max_steps=4, lr=1e-2, warmup_steps=1,
                      lora={"r": 4, "alpha": 8}, export_dtype="float32", plot=False, save_every=4,
                      freeze_correction_bias=True)
    tr = Trainer(cfg, tokenizer=tok)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(("lora_" in n) or n.endswith(("_A", "_B")) for n in changed)
    assert any("experts.gate_up_" in n for n in changed)
    # the export is the merged model; the adapter is saved alone beside it
    from ernie45 import load_model

    merged = load_model(tmp_path / "run" / "final", dtype=torch.float32)
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tr.model(ids).logits, atol=1e-4, rtol=1e-4)
        reloaded = load_adapter(load_model(base_dir, dtype=torch.float32), str(tmp_path / "run" / "adapter"))
        torch.testing.assert_close(reloaded(ids).logits, tr.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_lora_config():
    with pytest.raises(ValueError, match="not adaptable"):
        LoRAConfig(targets=["lm_head"])
    with pytest.raises(ValueError, match="positive integer"):
        LoRAConfig(r=0)
