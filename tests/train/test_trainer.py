"""Trainer: loss goes down, kill-and-resume gives the same loss curve, files on disk, HF export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer, lr_at
from tests.train.conftest import ROOT, tiny_model


def _cfg(tmp_path, corpus, **kw) -> TrainConfig:
    base = dict(task="pretrain", output_dir=str(tmp_path / "run"), model=tiny_model(), data=[corpus],
                seq_len=32, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, save_every=2, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(data=["x"], model={"preset": "tiny-dense"}, tokenizer="t", lr=1.0, warmup_steps=4,
                      max_steps=14, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert abs(lr_at(14, cfg) - 0.1) < 1e-9 and abs(lr_at(9, cfg) - 0.55) < 1e-9


def test_loss_decreases_on_demo_corpus(tmp_path, tok, tok_dir, small_corpus):
    cfg = _cfg(tmp_path, small_corpus, tokenizer=tok_dir, max_steps=24, save_every=24, plot=True)
    hist = Trainer(cfg, tokenizer=tok).train()
    first, last = sum(r["loss"] for r in hist[:3]) / 3, sum(r["loss"] for r in hist[-3:]) / 3
    assert first > 6.5  # ~ln(1024) at init
    assert last < first - 1.0, (first, last)  # measured: 6.87 -> 5.60
    out = cfg.output_dir
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert len(_losses(out)) == 24
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-000024"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "step-000024"))) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    for f in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, "final", f))


@pytest.mark.parametrize("extra", [
    {},
    {"precision": "bf16", "grad_accum": 2, "aux_free_rate": 1e-3, "aux_loss_coef": 0.01,
     "gradient_checkpointing": True},
])
def test_stop_and_resume_gives_identical_losses(tmp_path, tok, tok_dir, small_corpus, extra):
    full = _cfg(tmp_path / "a", small_corpus, tokenizer=tok_dir, **extra)
    Trainer(full, tokenizer=tok).train()
    ref = _losses(full.output_dir)
    cut = _cfg(tmp_path / "b", small_corpus, tokenizer=tok_dir, **extra)
    Trainer(cut, tokenizer=tok).train(stop_after=3)  # "killed" after step 3; last checkpoint is step 2
    assert _losses(cut.output_dir)[:3] == ref[:3]
    resumed = Trainer(cut, tokenizer=tok)
    resumed.train(resume=True)
    assert resumed.step == 6
    assert _losses(cut.output_dir) == ref  # bit-identical on CPU, step 3 recomputed
    from safetensors.torch import load_file

    wa = load_file(os.path.join(full.output_dir, "checkpoints", "step-000006", "model.safetensors"))
    wb = load_file(os.path.join(cut.output_dir, "checkpoints", "step-000006", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tok, tok_dir, small_corpus):
    with pytest.raises(ValueError, match="no checkpoint in"):
        Trainer(_cfg(tmp_path, small_corpus, tokenizer=tok_dir), tokenizer=tok).train(resume=True)


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: pretrain\ndata: [x]\ntokenizer: t\nmodel: {preset: tiny-moe}\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_yaml(str(path))
    path.write_text("task: finetune\ndata: [x]\ntokenizer: t\nmodel: {preset: tiny-moe}\n")
    with pytest.raises(ValueError, match="task='finetune': choose one of"):
        TrainConfig.from_yaml(str(path))


def test_export_loads_in_transformers_with_same_logits(tmp_path, tok, tok_dir, small_corpus):
    import transformers
    cfg = _cfg(tmp_path, small_corpus, tokenizer=tok_dir, max_steps=3, export_dtype="float32",
               aux_free_rate=0.05)
    tr = Trainer(cfg, tokenizer=tok)
    tr.train()
    bias = tr.model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # aux-free balancing moved it, so the export must carry it
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "final"),
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    tr.model.eval()
    with torch.no_grad():
        ours, ref = tr.model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_run_killed_mid_way_resumes_to_the_same_curve(tmp_path, tok_dir, small_corpus):
    """A real SIGKILL of `ernie45 train pretrain` in the middle of the run, then --resume."""
    def recipe(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({"task": "pretrain", "output_dir": str(tmp_path / name), "tokenizer": tok_dir,
                                    "model": tiny_model(), "data": [small_corpus], "seq_len": 32, "batch_size": 4,
                                    "max_steps": 24, "save_every": 3, "plot": False}))
        return str(path)

    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "ernie45.cli", "train", "pretrain", "--config"]
    subprocess.run(cmd + [recipe("full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [recipe("cut")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 8 <= done < 24, "the run was not killed mid-way"
    subprocess.run(cmd + [recipe("cut"), "--resume"], check=True, env=env, capture_output=True)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


def test_every_shipped_recipe_parses():
    recipes = os.path.join(ROOT, "recipes")
    names = sorted(f for f in os.listdir(recipes) if f.endswith(".yaml"))
    assert {"demo_pretrain.yaml", "demo_sft.yaml", "sft_lora.yaml", "dpo.yaml"} <= set(names)
    for name in names:
        cfg = TrainConfig.from_yaml(os.path.join(recipes, name))
        assert cfg.task in ("pretrain", "sft", "dpo", "upo")


def test_a_failing_plot_never_costs_the_run(tmp_path, tok, tok_dir, small_corpus, monkeypatch):
    """Without matplotlib (or with any plotting error) training finishes, checkpoints and exports final/; the
    plot is a warning."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    cfg = _cfg(tmp_path, small_corpus, tokenizer=tok_dir, max_steps=2, save_every=1, plot=True)
    with pytest.warns(UserWarning, match="could not draw .*loss.png"):
        hist = Trainer(cfg, tokenizer=tok).train()
    assert len(hist) == 2 and len(_losses(cfg.output_dir)) == 2
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", "config.json"))
    assert not os.path.exists(os.path.join(cfg.output_dir, "loss.png"))
