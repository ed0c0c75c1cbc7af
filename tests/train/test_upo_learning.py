"""A short UPO run on the bundled demo model: the addition task of recipes/upo.yaml, reward must go up."""

from __future__ import annotations

import json
import os

import pytest

from ernie45.train.recipe import TrainConfig
from ernie45.train.upo import UPOTrainer
from tests.train.conftest import ROOT


@pytest.mark.slow
def test_short_upo_run_raises_the_reward(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from make_upo_task import make_add
    finally:
        sys.path.pop(0)
    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_add(4)))
    cfg = TrainConfig.from_yaml(os.path.join(ROOT, "recipes", "upo.yaml"), output_dir=str(tmp_path / "run"))
    cfg.data = [str(data)]
    cfg.upo["rewards"][1]["function"] = os.path.join(ROOT, "scripts", "make_upo_task.py:closeness")
    cfg.lr, cfg.max_steps, cfg.plot = 1e-3, 24, False
    tr = UPOTrainer(cfg)
    rows = [tr.train_step() for _ in range(cfg.max_steps)]
    first = sum(r["reward_mean"] for r in rows[:6]) / 6
    last = sum(r["reward_mean"] for r in rows[-6:]) / 6
    assert last > first + 0.1, (first, last, [round(r["reward_mean"], 3) for r in rows])


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
