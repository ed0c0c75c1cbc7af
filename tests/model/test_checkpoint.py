"""Checkpoint loading: errors that name the file and tensor, MTP tensors, memory, the official config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie45 import CheckpointError, ConfigError, ErnieForCausalLM, ModelConfig, init_weights, load_model, save_model
from tests.reference import hf_model


@pytest.fixture()
def tiny_ckpt(tmp_path):
    model = init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe")), seed=0)
    save_model(model, tmp_path)
    return tmp_path


def _edit(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config(tiny_ckpt):
    os.unlink(tiny_ckpt / "config.json")
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tiny_ckpt)


def test_unknown_model_type(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    raw["model_type"] = "qwen3_moe"
    (tiny_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="model_type='qwen3_moe'"):
        load_model(tiny_ckpt)


def test_moe_k_larger_than_experts(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    raw["moe_k"] = 9
    (tiny_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="moe_k=9"):
        load_model(tiny_ckpt)


def test_missing_tensor(tiny_ckpt):
    _edit(tiny_ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tiny_ckpt)


def test_missing_expert_slice(tiny_ckpt):
    _edit(tiny_ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.experts\.gate_up_proj \(15 of 16 expert slices\)"):
        load_model(tiny_ckpt)


def test_shape_mismatch_names_tensor_and_shapes(tiny_ckpt):
    _edit(tiny_ckpt, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has "
                                              r"shape \[100, 64\] but the config implies \[128, 64\]"):
        load_model(tiny_ckpt)


def test_unexpected_tensor(tiny_ckpt):
    _edit(tiny_ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.qkv_proj.weight'"):
        load_model(tiny_ckpt)


def test_truncated_file(tiny_ckpt):
    path = tiny_ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: tensor"):
        load_model(tiny_ckpt)


def test_corrupt_header(tiny_ckpt):
    path = tiny_ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_model(tiny_ckpt)


def test_missing_shard(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    out = tmp_path / "sharded"
    save_model(model, out, max_shard_size="100KB")
    os.unlink(sorted(out.glob("model-*.safetensors"))[1])
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: shard 'model-00002-of-"):
        load_model(out)


def test_no_weights_at_all(tmp_path):
    ModelConfig.from_name("tiny-dense").save_json(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_wrong_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model("/nonexistent/ernie")


def test_resave_over_sharded_folder_leaves_no_stale_shards(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    out = tmp_path / "o"
    save_model(model, out, max_shard_size="50KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    save_model(model, out)  # now a single file: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    load_model(out)


def _mtp_tensors(cfg: ModelConfig, transposed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    proj = r(h, 2 * h)
    t = {
        "model.mtp_emb_norm.0.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.mtp_hidden_norm.0.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.mtp_linear_proj.0.weight": proj.t().contiguous() if transposed else proj,
        "model.mtp_block.0.input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.mtp_block.0.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        "model.mtp_block.0.self_attn.q_proj.weight": r(q, h),
        "model.mtp_block.0.self_attn.k_proj.weight": r(kv, h),
        "model.mtp_block.0.self_attn.v_proj.weight": r(kv, h),
        "model.mtp_block.0.self_attn.o_proj.weight": r(h, q),
        "model.mtp_block.0.mlp.gate_proj.weight": r(cfg.intermediate_size, h),
        "model.mtp_block.0.mlp.up_proj.weight": r(cfg.intermediate_size, h),
        "model.mtp_block.0.mlp.down_proj.weight": r(h, cfg.intermediate_size),
    }
    return t, proj


@pytest.mark.parametrize("transposed", [False, True])
def test_mtp_tensors_load_and_draft_logits_match_a_reference_layer(tmp_path, transposed):
    """MTP: 12 tensors (spec §3.4), the projection possibly stored [2H, H]; the draft forward is checked
    against transformers' own dense decoder layer holding the same weights."""
    import transformers
    from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe as hfm

    cfg = ModelConfig.from_name("tiny-moe").replace(num_nextn_predict_layers=1)
    ref = hf_model(cfg, seed=5)
    ref.save_pretrained(tmp_path)
    mtp, proj = _mtp_tensors(cfg, transposed)
    _edit(tmp_path, lambda t: t.update(mtp))
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.has_mtp
    torch.testing.assert_close(ours.model.mtp_linear_proj[0].weight, proj)

    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = ours(ids).hidden_states
        draft = ours.mtp_logits(hidden, nxt)
        # Independent reference: transformers' decoder layer (layer 0 is dense) with the MTP block weights.
        layer = hfm.Ernie4_5_MoeDecoderLayer(ref.config, 0).float().eval()
        layer.load_state_dict({k.removeprefix("model.mtp_block.0."): v for k, v in mtp.items()
                               if k.startswith("model.mtp_block.0.")})
        norm = lambda w, x: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))  # noqa: E731
        e = norm(mtp["model.mtp_emb_norm.0.weight"], ref.model.embed_tokens(nxt))
        hh = norm(mtp["model.mtp_hidden_norm.0.weight"], hidden)
        u = torch.cat([e, hh], -1) @ proj.T
        pos = torch.arange(6)[None]
        cos_sin = ref.model.rotary_emb(u, pos)
        mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
        u = layer(u, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        want = ref.lm_head(ref.model.norm(u))
    torch.testing.assert_close(draft, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    del transformers


def test_config_mtp_without_tensors_loads_without_draft_head(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe").replace(num_nextn_predict_layers=1)
    hf_model(cfg, seed=0).save_pretrained(tmp_path)  # transformers drops MTP
    model = load_model(tmp_path)
    assert not model.has_mtp
    with pytest.raises(RuntimeError, match="no MTP block"):
        model.mtp_logits(torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long))


def test_official_03b_config_checkpoint_loads(tmp_path):
    """The published 0.3B config.json (original spelling) + random weights in the real 0.3B shape."""
    import shutil

    from tests.test_config import _official_path

    cfg = ModelConfig.from_json(_official_path())
    model = ErnieForCausalLM(cfg)  # ~0.36B params; init cost is fine here
    save_model(model.to(torch.bfloat16), tmp_path)
    shutil.copy(_official_path(), tmp_path / "config.json")
    loaded = load_model(tmp_path)
    assert loaded.config == ModelConfig.from_name("ernie-4.5-0.3b")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.layers[17].mlp.down_proj.weight, model.model.layers[17].mlp.down_proj.weight)


PEAK_SCRIPT = r"""
import sys, torch, ernie45
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
m = ernie45.load_model(sys.argv[1], dtype=torch.float32)
print(base, rss('VmHWM:'))
"""


@pytest.mark.slow
def test_load_peak_rss_below_one_and_a_half_times_checkpoint(tmp_path):
    cfg = ModelConfig.from_name("tiny-dense").replace(vocab_size=200_000, hidden_size=256, num_attention_heads=4,
                                                      head_dim=64, tie_word_embeddings=False)
    from ernie45.model.checkpoint import build_empty

    model = build_empty(cfg, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_model(model, tmp_path, max_shard_size="80MB")
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert size > 200e6
    del model
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    base, peak = map(int, out.stdout.split())
    assert peak - base < 1.5 * size, f"peak {peak - base} vs checkpoint {size}"


LIGHT_SCRIPT = r"""
import sys, ernie45
ernie45.load_model(sys.argv[1])
ernie45.load_model(sys.argv[1], quant="int4", progress=False)
print(sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules))
"""


def test_loading_never_imports_dynamo(tiny_ckpt):
    """The loaders build on the meta device; an initialiser run there (nn.Embedding's normal_, RoPE's arange)
    goes through torch's Python decompositions, which import torch._dynamo and triton: ~1 s and ~130 MB of
    every loading process, for values nobody reads."""
    out = subprocess.run([sys.executable, "-c", LIGHT_SCRIPT, str(tiny_ckpt)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]", out.stdout


def test_a_model_built_off_meta_is_still_initialised():
    torch.manual_seed(0)
    model = ErnieForCausalLM(ModelConfig.from_name("tiny-moe"))
    emb = model.model.embed_tokens.weight
    assert 0.9 < emb.std().item() < 1.1 and emb.mean().abs().item() < 0.05  # nn.Embedding's N(0, 1)
    rot = model.model.rotary
    d = rot.head_dim
    torch.testing.assert_close(rot.inv_freq, 1.0 / rot.theta ** (torch.arange(0, d, 2).float() / d))
