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
