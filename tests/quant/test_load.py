"""Quantize-on-load, quantized checkpoints (save -> load_model), the CLI verb, and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, load_model, save_model
from ernie45.cli import main as cli_main
from ernie45.model.checkpoint import CheckpointError, read_header
from ernie45.quant import QuantConfig, quantize_model
from ernie45.quant.quantize import qweights
from ernie45.quant.scheme import METADATA_KEY

CFG = ModelConfig.from_name("tiny-moe").replace(hidden_size=128, moe_intermediate_size=64, intermediate_size=256,
                                                head_dim=32, num_hidden_layers=3)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("bf16"))
    model = init_weights(ErnieForCausalLM(CFG), std=0.05, seed=0).to(torch.bfloat16)
    save_model(model, folder, max_shard_size="300KB")  # several shards: experts split across files
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    return folder


@pytest.mark.parametrize("quant,opts", [("int8", {}), ("int4", {"group_size": 32}), ("int2", {}),
                                        ("int2", {"method": "rtn", "head_bits": None}), ("int4", {"head_bits": 6})])
def test_quantize_on_load_equals_quantizing_the_loaded_model(bf16_ckpt: str, quant: str, opts: dict) -> None:
    direct = load_model(bf16_ckpt, quant=quant, progress=False, **opts)
    after = quantize_model(load_model(bf16_ckpt), QuantConfig.from_name(quant, **opts))
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    assert direct.quant_config == after.quant_config
    for (n, a), (_, b) in zip(direct.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(direct(ids).logits, after(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["int8", "int4", "int2"])
def test_quantized_checkpoint_round_trip(bf16_ckpt: str, tmp_path, quant: str) -> None:  # noqa: ANN001
    model = load_model(bf16_ckpt, quant=quant, progress=False)
    out = str(tmp_path / "q")
    save_model(model, out, max_shard_size="200KB")
    _, meta = read_header(os.path.join(out, sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]))
    assert QuantConfig.from_json(meta[METADATA_KEY]) == model.quant_config
    again = load_model(out, progress=False)  # no quant=: the metadata says it
    assert again.quant_config == model.quant_config
    ids = torch.randint(0, CFG.vocab_size, (1, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    src = sum(os.path.getsize(os.path.join(bf16_ckpt, f)) for f in os.listdir(bf16_ckpt)
              if f.endswith(".safetensors"))
    assert disk < src * {"int8": 0.8, "int4": 0.6, "int2": 0.6}[quant]  # embeddings stay bf16
    with pytest.raises(ValueError, match="already quantized"):
        load_model(out, quant="int8" if quant != "int8" else "int4")


def test_quantized_checkpoint_errors(bf16_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match="bits"):
        load_model(bf16_ckpt, quant="int4", bits=4)
    with pytest.raises(ValueError, match="calibration"):
        load_model(bf16_ckpt, quant="int2", method="gptq")  # GPTQ needs activations; on-load is data-free
    out = str(tmp_path / "q")
    save_model(load_model(bf16_ckpt, quant="int4", progress=False), out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["moe_intermediate_size"] = 32
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(out)


def test_cli_quantize(bf16_ckpt: str, tmp_path, capsys) -> None:  # noqa: ANN001
    out = str(tmp_path / "cli")
    assert cli_main(["quantize", bf16_ckpt, out, "--bits", "4", "--group-size", "64", "--method", "mse"]) == 0
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    model = load_model(out, progress=False)
    assert model.quant_config.experts.group_size == 64 and model.quant_config.experts.method == "mse"
    assert cli_main(["quantize", bf16_ckpt, str(tmp_path / "x"), "--bits", "4", "--group-size", "12"]) == 2
    assert "group_size=12" in capsys.readouterr().err


# ru_maxrss survives exec: a child forked from a big pytest process starts with the parent's high-water
# mark. VmHWM belongs to the new process image, so it is the peak of this load alone.
PEAK_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, torch
    torch.set_num_threads(1)
    from ernie45 import load_model
    from ernie45.quant import quantized_nbytes

    def status(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    base = status("VmRSS")
    model = load_model(sys.argv[1], quant="int4", progress=False)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "model": quantized_nbytes(model),
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


@pytest.mark.slow
def test_quantize_on_load_peak_memory(tmp_path) -> None:  # noqa: ANN001
    """A 4-bit load of a bf16 checkpoint must never hold the bf16 weights: peak RSS growth stays well under
    the checkpoint size, near the quantized size (measured in a fresh process, ru_maxrss)."""
    cfg = ModelConfig.from_name("tiny-moe").replace(
        vocab_size=1024, hidden_size=1024, intermediate_size=1024, moe_intermediate_size=1024, moe_num_experts=32,
        moe_k=4, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    folder = str(tmp_path / "big")
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # random weights, cheaply: quantization cost does not depend on the values
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, folder, max_shard_size="64MB")
    del model
    ckpt = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, folder], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["base"]
    print(f"checkpoint {ckpt / 2**20:.0f} MiB, quantized {r['model'] / 2**20:.0f} MiB, "
          f"peak RSS growth {growth / 2**20:.0f} MiB")
    assert ckpt > 300 * 2**20 and r["model"] < ckpt / 3
    assert growth < min(r["model"] + 0.5 * ckpt, 0.8 * ckpt), (growth, r)  # a bf16 load alone needs ckpt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_on_cuda_matches_cpu(bf16_ckpt: str, quant: str) -> None:
    from ernie45.kernels import use_kernels  # the CPU's kernels quantize activations: compare with the exact path

    gpu = load_model(bf16_ckpt, quant=quant, dtype=torch.float32, device="cuda", progress=False)
    assert {q.layout for _, q in qweights(gpu)} == {"packed"}
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad(), use_kernels(False):
        cpu = load_model(bf16_ckpt, quant=quant, dtype=torch.float32, progress=False)
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
