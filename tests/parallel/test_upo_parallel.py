"""`ernie45 train upo --ep 2` and `--fsdp 2` under torchrun: every metric of every step equals one process on the
same global batch, the rollout replica on each rank samples from the trained weights, a --ep 2 run stopped at
step 2 resumes on the same metrics; and FSDP2 no longer drops the routers' records (expert loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ernie45.train.recipe import TrainConfig
from ernie45.train.upo import UPOTrainer
from tests.parallel.launcher import assert_passed, run_checks
from tests.train.conftest import ROOT, tiny_model
from tests.train.test_upo import write_prompts

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TIMING = {"rollout_s", "rollout_tokens_per_s", "rollout_share", "step_s", "tokens_per_s", "weight_sync_s"}
COMPARED = ("loss", "lr", "grad_norm", "reward_mean", "reward_std", "reward_group_std", "reward_exact", "reward_regex",
            "reward_python", "pg_loss", "clip_fraction", "kl", "dpo_loss", "dpo_margin", "dpo_pairs", "completion_len",
            "accepted_len", "truncated_frac", "expert_imbalance", "tokens", "rollout_tokens")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_prompts(tmp_path_factory.mktemp("upo_mr"))


def _recipe(tmp_path, prompts: str, tok_dir: str, out: str) -> dict:
    # two updates per step (the second off-policy: clipping and π_old matter), KL + DPO on, aux-free balancing on
    upo = {"group_size": 4, "max_new_tokens": 6, "kl_coef": 0.05, "dpo_coef": 0.2, "updates_per_step": 2,
           "mask_truncated": False,
           "rewards": [{"type": "exact"}, {"type": "regex", "pattern": "^[a-z ]+$", "fullmatch": True, "weight": 0.5},
                       {"type": "python", "weight": 0.1,
                        "function": os.path.join(os.path.dirname(prompts), "length_reward.py:chars")}]}
    return dict(task="upo", output_dir=str(tmp_path / out), model=tiny_model(), tokenizer=tok_dir, data=[prompts],
                seq_len=32, batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, save_every=2, plot=False, upo=upo,
                aux_free_rate=1e-3, grad_clip=1.0, export_dtype="float32", keep_checkpoints=3)


def _cli(recipe: dict, path, *flags: str) -> None:
    """`ernie45 train upo --config path FLAGS` as a user runs it (it relaunches itself under torchrun)."""
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "ernie45.cli", "train", "upo", "--config", str(path), *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in COMPARED:
            assert key in g, key
            torch.testing.assert_close(torch.tensor(float(g[key]), dtype=torch.float64),
                                       torch.tensor(float(w[key]), dtype=torch.float64), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=key, s=g["step"]: f"step {s} {k}: {m}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, prompts, tok, tok_dir) -> list[dict]:
    single = _recipe(tmp_path_factory.mktemp("single"), prompts, tok_dir, "single")
    UPOTrainer(TrainConfig(**single), tokenizer=tok).train()
    rows = _rows(os.path.join(single["output_dir"], "metrics.jsonl"))
    assert len(rows) == 4 and all(r["dpo_pairs"] > 0 for r in rows) and "expert_imbalance" in rows[0]
    assert any(r["clip_fraction"] > 0 for r in rows)  # the second minibatch is off-policy: the clip is exercised
    return rows


@pytest.mark.parametrize("flags", [("--ep", "2"), ("--fsdp", "2")], ids=["ep2", "fsdp2"])
def test_upo_on_2_ranks_equals_one_process(tmp_path, single_run, prompts, tok_dir, flags):
    recipe = _recipe(tmp_path, prompts, tok_dir, "par")
    _cli(recipe, tmp_path / "par.yaml", *flags)
    out = recipe["output_dir"]
    rows, rank1 = _rows(os.path.join(out, "metrics.jsonl")), _rows(os.path.join(out, "ranks", "rank1-metrics.jsonl"))
    _assert_same_metrics(rows, single_run)
    # every rank logs the same (global) row
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rank1] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    # engine_logp_diff is the max over ranks: each rank's replica samples from the weights being trained,
    # re-synced after every update (steps 2.. follow two optimizer steps each)
    assert all(r["engine_logp_diff"] < 1e-4 for r in rows), [r["engine_logp_diff"] for r in rows]
    assert all(r["weight_sync_s"] > 0 for r in rows[1:])
    assert os.path.isfile(os.path.join(out, "final", "config.json"))


def test_upo_ep2_stopped_at_step_2_resumes_on_the_same_metrics(tmp_path, single_run, prompts, tok_dir):
    recipe = _recipe(tmp_path, prompts, tok_dir, "resume")
    _cli(recipe, tmp_path / "half.yaml", "--ep", "2", "--max-steps", "2")  # ends at the step-2 DCP checkpoint
    _cli(recipe, tmp_path / "rest.yaml", "--ep", "2", "--resume")
    rows = _rows(os.path.join(recipe["output_dir"], "metrics.jsonl"))
    _assert_same_metrics(rows, single_run)
    # steps 3-4 ran after the resume: the replica was re-synced from the loaded checkpoint
    assert all(r["engine_logp_diff"] < 1e-4 for r in rows)


def fsdp_keeps_router_records(rank: int, world: int) -> None:
    """A forward of an FSDP2-sharded MoE model with grad on returns one router record per MoE layer."""
    from ernie45.config import ModelConfig
    from ernie45.model.model import ErnieForCausalLM, init_weights
    from ernie45.parallel import parallelize
    from ernie45.parallel.fsdp import apply_fsdp
    from ernie45.parallel.mesh import ParallelConfig, init_mesh

    cfg = ModelConfig.from_name("tiny-moe")
    model = init_weights(ErnieForCausalLM(cfg), std=0.02, seed=0).train()
    mesh = init_mesh(ParallelConfig(dp=world), cfg, "cpu")
    apply_fsdp(parallelize(model, mesh, tokens="sharded"), mesh)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    out = model(ids, return_router=True)
    n_moe = sum(layer.is_moe for layer in model.model.layers)
    assert n_moe >= 2 and len(out.router) == n_moe, (len(out.router), n_moe)
    out.logits.float().square().mean().backward()  # the hooked records still reach the backward


def test_fsdp_keeps_the_router_records():
    """FSDP2 rebuilds list arguments that hold grad-requiring tensors; a plain list of router records lost
    every MoE layer's record after the first (no expert load, no aux-free balancing under --fsdp)."""
    assert_passed(run_checks([("fsdp_keeps_router_records", fsdp_keeps_router_records)], world=2),
                  "fsdp_keeps_router_records")
