"""A short version of the copy task the README's learning claim is about (benchmarks/results/2026-12-05-upo-cli.md:
two digits, held-out greedy 0/20 -> 20/20 in 1000 steps): the same chat prompts, format-only warm-up, reward and
recipes, one digit instead of two and 30 UPO steps, so it fits the suite; the reward must rise clearly above its
starting level."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer
from ernie45.train.upo import UPOTrainer
from tests.train.conftest import ROOT


@pytest.mark.slow
def test_short_upo_run_raises_the_reward(tmp_path):
    """Warm-up SFT (random answers: the format, not the task), then UPO from recipes/upo_copy.yaml (its lr, 3e-4)
    on "Copy: 7". Reward of the first 10 steps 0.10 (chance: 0.1), of the last 10 0.30 in our run. With the
    advantage's sign flipped (a broken loss) it falls instead (0.05 -> 0.00): the threshold fails it. (At lr 1e-3
    the demo retrained on the larger corpus collapses onto one constant digit: 0.25 on the batch's one match.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the budget is one core (and 2 threads on a busy 2-core machine crawl: OpenMP waits)
    try:
        first, last, rewards = _short_copy_run(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert first < 0.2 and last > first + 0.12, (first, last, [round(r, 3) for r in rewards])


def _short_copy_run(tmp_path) -> tuple[float, float, list[float]]:
    t = _task()
    t.write_digits_chat(str(tmp_path), "copy", 1, 2, 0)  # 8 training prompts "Copy: d", 2 held out
    warm = TrainConfig.from_yaml(os.path.join(ROOT, "recipes", "upo_copy_warmup.yaml"),
                                 output_dir=str(tmp_path / "warm"))
    warm.data, warm.max_steps, warm.lr, warm.plot = [str(tmp_path / "warmup.jsonl")], 20, 1e-3, False
    Trainer(warm).train()
    cfg = TrainConfig.from_yaml(os.path.join(ROOT, "recipes", "upo_copy.yaml"), output_dir=str(tmp_path / "run"))
    cfg.init_from, cfg.data = str(tmp_path / "warm" / "final"), [str(tmp_path / "train.jsonl")]
    cfg.upo["rewards"][0]["function"] = os.path.join(ROOT, "scripts", "make_upo_task.py:digit_match")
    cfg.upo["group_size"] = 16
    cfg.max_steps, cfg.plot = 30, False
    tr = UPOTrainer(cfg)
    rewards = [tr.train_step()["reward_mean"] for _ in range(cfg.max_steps)]
    return sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10, rewards


def _task():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import make_upo_task
    finally:
        sys.path.pop(0)
    return make_upo_task


def test_digit_task_and_its_reward_by_hand(tmp_path):
    t = _task()
    rec = {"answer": "37"}
    assert t.digit_match("", "37", rec) == 1.0
    assert t.digit_match("", " 3 ", rec) == 0.5          # one of two positions
    assert t.digit_match("", "374", rec) == 2 / 3        # an extra character costs its share
    assert t.digit_match("", "73", rec) == 0.0 and t.digit_match("", "", rec) == 0.0
    train, held = t.make_digits("copy", 2, 20, 0)
    assert len(train) == 80 and len(held) == 20
    assert not {r["answer"] for r in train} & {r["answer"] for r in held}
    assert held[0]["prompt"] == f"Copy: {held[0]['answer']}\nAnswer: "
    rev = t.make_digits("reverse", 3, 100, 0)[0][0]
    assert rev["answer"] == rev["prompt"].split(": ")[1].split("\n")[0][::-1]
    # no constant answer beats chance: each scores exactly 1/10 per digit over all 100 strings
    rows = train + held
    for const in ("44", "50", "00"):
        assert abs(sum(t.digit_match("", const, r) for r in rows) / len(rows) - 0.1) < 1e-12
    t.write_digits_chat(str(tmp_path), "copy", 2, 20, 0)
    warm = [json.loads(line) for line in (tmp_path / "warmup.jsonl").read_text().splitlines()]
    agree = sum(w["messages"][1]["content"] == r["answer"] for w, r in zip(warm, train))
    assert len(warm) == 80 and agree <= 3  # the warm-up answers are random: format only, not the task
    with pytest.raises(ValueError, match="--op"):
        t.make_digits("sort", 2, 20, 0)
