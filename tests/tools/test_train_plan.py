"""Training planner for pp x ep x fsdp layouts (``ernie45.tools.train_plan``): the state arithmetic by
hand, the smallest layout per GPU kind, the CLI. Its activation model is checked against measured
memory in tests/train/test_recompute.py (one process) and tests/parallel/test_pipeline.py (pp=2 ranks)."""

from __future__ import annotations

import json

import pytest

from ernie45 import ErnieForCausalLM, ModelConfig
from ernie45.cli import main
from ernie45.tools.hardware import find_device
from ernie45.tools.train_plan import TrainLayout, candidate_train_layouts, smallest_layouts, train_memory


def test_state_is_16_bytes_per_parameter_sharded_by_the_layout():
    cfg = ModelConfig.from_name("tiny-moe").replace(num_hidden_layers=4)
    n = ErnieForCausalLM(cfg).num_parameters()
    one = train_memory(cfg, TrainLayout(), 1, 64, dtype_bytes=4)
    assert (one.weights_bytes, one.gradient_bytes, one.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
    experts = sum(p.numel() for name, p in ErnieForCausalLM(cfg).named_parameters() if ".experts." in name)
    ep = train_memory(cfg, TrainLayout(ep=2), 1, 64, dtype_bytes=4)
    assert ep.weights_bytes == 4 * (n - experts // 2 - (n - experts) // 2)  # FSDP over the 2 data ranks too
    pp = train_memory(cfg, TrainLayout(pp=2), 1, 64, dtype_bytes=4)
    assert pp.weights_bytes < 0.7 * one.weights_bytes
    # 1F1B: the first stage keeps pp micro-batches in flight, so more micro-batches per step do not add memory
    a2 = train_memory(cfg, TrainLayout(pp=2), 1, 512, dtype_bytes=4, microbatches=2)
    a8 = train_memory(cfg, TrainLayout(pp=2), 1, 512, dtype_bytes=4, microbatches=8)
    assert a8.activation_bytes - a2.activation_bytes < 0.1 * a2.activation_bytes
    with pytest.raises(ValueError, match="ep=3 does not divide fsdp=4"):
        train_memory(cfg, TrainLayout(ep=3, fsdp=4), 1, 64)


def test_smallest_300b_layout_fits_and_nothing_smaller_does():
    cfg = ModelConfig.from_name("ernie-4.5-300b-a47b")
    devices = [find_device("h100"), find_device("h200")]
    fits = smallest_layouts(cfg, 1, 4096, "full", devices=devices)
    by = {f.device: f for f in fits}
    assert by["h200"].gpus < by["h100"].gpus  # more memory per GPU: fewer GPUs
    for f, dev in zip(fits, devices):
        assert f.per_gpu_total_bytes <= f.usable_bytes
        for lay in candidate_train_layouts(cfg):
            if lay.gpus < f.gpus:
                assert train_memory(cfg, lay, 1, 4096, "full").total_bytes > f.usable_bytes, (dev.key, lay)
    # the 300B's 4.8 TB of fp32 state alone needs more than 32 H200s
    assert by["h200"].gpus >= 64


def test_cli_prints_the_training_layout(capsys):
    rc = main(["plan", "ernie-4.5-300b-a47b", "--mode", "full", "--pp", "2", "--ep", "2", "--fsdp", "2",
               "--recompute", "attention,experts", "--device", "h200", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    tl = out["training_layout"]
    assert tl["memory"]["layout"] == {"pp": 2, "ep": 2, "fsdp": 2} and tl["memory"]["gpus"] == 4
    assert tl["memory"]["recompute"] == ["attention", "experts"]
    assert tl["smallest"][0]["device"] == "h200" and tl["smallest"][0]["gpus"] >= 64
    rc = main(["plan", "ernie-4.5-21b-a3b", "--mode", "full", "--pp", "2", "--recompute", "full",
               "--device", "h100"])
    text = capsys.readouterr().out
    assert "training layout pp=2 ep=1 fsdp=1" in text and "smallest training layout" in text


def test_recompute_choices_match_the_trainer():
    from ernie45.tools.train_plan import RECOMPUTE, _parse
    from ernie45.train.recompute import CHOICES, parse_recompute

    assert RECOMPUTE == CHOICES
    for value in ("none", "full", ["attention", "experts"], "mlp"):
        assert _parse(value) == parse_recompute(value)
    with pytest.raises(ValueError, match="unknown choice"):
        _parse("bogus")
