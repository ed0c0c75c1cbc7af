"""Paddle folders in, and ``ernie45 convert`` between formats with its final logit check."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from ernie45.cli import main
from ernie45.config import ModelConfig
from ernie45.loading import load_model, save_model
from ernie45.model.checkpoint import CheckpointError, build_empty, native_to_hf
from ernie45.tokenizer import Tokenizer

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "ernie45", "assets", "demo")


def tiny(**changes) -> torch.nn.Module:
    cfg = ModelConfig.from_name("tiny-moe").replace(use_bias=False, tie_word_embeddings=False, **changes)
    model = build_empty(cfg, torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if "e_score" in n)]:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in n else torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def write_paddle(model, folder) -> None:  # noqa: ANN001
    """The published -Paddle layout, written from the HF tensor names independently of ernie45.formats.paddle:
    ``ernie.`` prefix, [in, out] linears, fused qkv_proj [H, q|k|v] and up_gate_proj [H, gate|up], router [H, E],
    Paddle's model_type spelling."""
    hf = dict(native_to_hf(model))
    out = {}
    for name in sorted(hf):
        t = hf[name]
        pname = name.replace("model.", "ernie.", 1)
        if re.search(r"\.(k|v)_proj\.weight$|\.up_proj\.weight$", name):
            continue  # written with their q_proj / gate_proj partner
        if name.endswith("q_proj.weight"):
            base = name[: -len("q_proj.weight")]
            qkv = torch.cat([hf[base + f"{p}_proj.weight"] for p in "qkv"])
            out[pname.replace("q_proj", "qkv_proj")] = qkv.t().contiguous()
        elif name.endswith("gate_proj.weight"):
            base = name[: -len("gate_proj.weight")]
            fused = torch.cat([hf[base + "gate_proj.weight"], hf[base + "up_proj.weight"]])
            out[pname.replace("gate_proj", "up_gate_proj")] = fused.t().contiguous()
        elif t.dim() == 2 and "norm" not in name and "embed_tokens" not in name and "moe_statics" not in name:
            out[pname] = t.t().contiguous()  # o_proj, down_proj, router, lm_head: Paddle Linear [in, out]
        else:
            out[pname] = t.contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) if "gate.weight" not in k and "moe_statics" not in k else v
               for k, v in out.items()}, os.path.join(folder, "model.safetensors"))
    model.config.save_json(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["model_type"] = "ernie"  # Paddle's spelling
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_paddle_layout_loads_to_identical_logits(tmp_path):
    save_model(tiny().to(torch.bfloat16), tmp_path / "hf")
    hf = load_model(tmp_path / "hf", dtype=torch.float32)
    write_paddle(hf, tmp_path / "paddle")  # the same known weights in the Paddle layout
    pd = load_model(tmp_path / "paddle", dtype=torch.float32)  # detected by its fused names
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(pd(ids).logits, hf(ids).logits, rtol=0, atol=0)
    assert pd.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_paddle_wrong_shape_is_named(tmp_path):
    model = tiny()
    write_paddle(model, tmp_path / "p")
    cfg = json.load(open(tmp_path / "p" / "config.json"))
    cfg["num_key_value_heads"] = 4
    json.dump(cfg, open(tmp_path / "p" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="qkv_proj"):
        load_model(tmp_path / "p")


def test_convert_round_trips(tmp_path, capsys):
    """HF -> Paddle -> HF keeps the logits; GGUF -> HF folder rebuilds the tokenizer; int4 conversion reports its
    logit check."""
    pytest.importorskip("gguf")
    model = tiny()
    save_model(model.to(torch.bfloat16), tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "pd"), "--to", "paddle", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["max_abs_diff"] == 0.0
    assert main(["convert", str(tmp_path / "pd"), str(tmp_path / "back"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_diff"] == 0.0
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "q4"), "--type", "int4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < res["max_rel_diff"] < 0.2
    assert load_model(tmp_path / "q4").quant_config.name == "int4"


@pytest.mark.slow
def test_gguf_to_hf_folder_keeps_the_tokenizer(tmp_path, capsys):
    pytest.importorskip("gguf")
    tok = Tokenizer.from_pretrained(DEMO)
    assert main(["export-gguf", "demo", str(tmp_path / "d.gguf"), "--type", "q8_0"]) == 0
    assert main(["convert", str(tmp_path / "d.gguf"), str(tmp_path / "hf"), "--type", "bf16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["max_rel_diff"] < 0.02 and res["same_argmax"]  # bf16 compute: quantized kernels vs dense
    back = Tokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world, 12345 中文 <|begin_of_sentence|>User: hi"
    assert back.encode(text) == tok.encode(text)
    assert getattr(load_model(tmp_path / "hf"), "quant_config", None) is None
