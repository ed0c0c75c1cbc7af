"""`ernie45 train pretrain --ep 2 --fsdp 2` under torchrun: the loss curve and the exported model equal
single-process training; a checkpoint of 2 ranks resumes on 4 (--ep 2 --fsdp 4) on the same curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ernie45 import load_model
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer
from tests.train.conftest import ROOT, tiny_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _recipe(tmp_path, corpus, tok_dir, out: str) -> dict:
    return dict(task="pretrain", output_dir=str(tmp_path / out), model=tiny_model(), data=[corpus], tokenizer=tok_dir,
                seq_len=32, batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, save_every=2, plot=False,
                grad_clip=0.5, export_dtype="float32", keep_checkpoints=3)


def _torchrun(nproc: int, recipe: dict, path, *flags: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "ernie45.train.distributed", "pretrain", "--config", str(path), *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tok, tok_dir, small_corpus) -> tuple[dict, list[float]]:
    single = _recipe(tmp_path_factory.mktemp("single"), small_corpus, tok_dir, "single")
    Trainer(TrainConfig(**single), tokenizer=tok).train()
    return single, _losses(single["output_dir"])


def test_train_ep2_fsdp2_equals_single_process(tmp_path, single_run, tok_dir, small_corpus):
    single, want = single_run
    par = _recipe(tmp_path, small_corpus, tok_dir, "par")
    _torchrun(2, par, tmp_path / "par.yaml", "--ep", "2", "--fsdp", "2")
    torch.testing.assert_close(torch.tensor(_losses(par["output_dir"])), torch.tensor(want), rtol=1e-5, atol=1e-5)
    got, ref = load_model(os.path.join(par["output_dir"], "final"), dtype=torch.float32), \
        load_model(os.path.join(single["output_dir"], "final"), dtype=torch.float32)
    # AdamW turns a last-bit gradient difference near zero into up to lr of movement: atol = 1% of lr
    for (name, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=3e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_train_checkpoint_of_2_ranks_resumes_on_4(tmp_path, single_run, tok_dir, small_corpus):
    _, want = single_run
    half = dict(_recipe(tmp_path, small_corpus, tok_dir, "resume"), max_steps=2)
    _torchrun(2, half, tmp_path / "half.yaml", "--ep", "2", "--fsdp", "2")
    _torchrun(4, dict(half, max_steps=4), tmp_path / "rest.yaml", "--ep", "2", "--fsdp", "4", "--resume")
    torch.testing.assert_close(torch.tensor(_losses(half["output_dir"])), torch.tensor(want), rtol=1e-5, atol=1e-5)
    # Steps 1-2 were not redone: the step-2 checkpoint is still the one the 2 ranks wrote.
    saved_by = {}
    for step in (2, 4):
        with open(os.path.join(half["output_dir"], "dcp_checkpoints", f"step-{step:08d}", "ernie45_train.json")) as f:
            saved_by[step] = json.load(f)["saved_by"]
    assert saved_by == {2: {"dp": 1, "ep": 2, "tp": 1}, 4: {"dp": 2, "ep": 2, "tp": 1}}
