"""Rewards: the built-in verifiers, a recipe-named callable, the reward model, weighted combination, errors."""

from __future__ import annotations

import os

import pytest
import torch

from ernie45.config import ModelConfig
from ernie45.model.model import ErnieForCausalLM, init_weights
from ernie45.train import rewards as R
from tests.train.conftest import ROOT


def test_exact_numeric_regex_json():
    assert R.exact_match("  Paris \n", "Paris") == 1.0 and R.exact_match("paris", "Paris") == 0.0
    assert R.exact_match("paris", "Paris", casefold=True) == 1.0
    assert R.numeric_match("so the answer is 42.", 42) == 1.0
    assert R.numeric_match("first 7, finally 41.9", "42", tolerance=0.2) == 1.0
    assert R.numeric_match("41.5", 42, tolerance=0.2) == 0.0
    assert R.numeric_match("1,000,001", 1e6, rel_tolerance=1e-5) == 1.0
    assert R.numeric_match("no digits", 3) == 0.0
    assert R.regex_match("Answer: 12", R.re.compile(r"\d+")) == 1.0
    assert R.regex_match(" 12 ", R.re.compile(r"\d+"), fullmatch=True) == 1.0
    assert R.regex_match("12a", R.re.compile(r"\d+"), fullmatch=True) == 0.0
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert R.json_schema_match('{"n": 3}', schema) == 1.0
    assert R.json_schema_match('{"n": "3"}', schema) == 0.5  # JSON, wrong shape
    assert R.json_schema_match("{n: 3}", schema) == 0.0
    assert R.json_schema_match("[1, 2]", None) == 1.0


def test_combined_rewards_with_weights_and_a_python_callable(tmp_path):
    mod = tmp_path / "my_reward.py"
    mod.write_text("def length_penalty(prompt, completion, record, scale=1.0):\n"
                   "    return -scale * len(completion) / (1 + len(record['answer']))\n")
    rw = R.Rewards.from_config([
        {"type": "exact", "weight": 2.0},
        {"type": "python", "function": f"{mod}:length_penalty", "kwargs": {"scale": 0.5}, "weight": 0.1},
        {"type": "regex", "pattern": "^[a-z]+$", "fullmatch": True, "weight": 0.3},
        {"type": "python", "function": "scripts/make_upo_task.py:similarity".replace("scripts", f"{ROOT}/scripts")},
    ])
    assert rw.names == ["exact", "python", "regex", "python2"]
    total, parts = rw(["p", "p"], ["cat", "Dog!"], [{"answer": "cat"}, {"answer": "cat"}])
    pen = [-0.5 * 3 / 4, -0.5 * 4 / 4]
    import difflib

    sim2 = 0.5 * difflib.SequenceMatcher(None, "Dog!", "cat").ratio()
    want = [2.0 * 1 + 0.1 * pen[0] + 0.3 * 1 + 1.0, 0.0 + 0.1 * pen[1] + 0.0 + sim2]
    assert torch.allclose(total, torch.tensor(want), atol=1e-6)
    assert parts["exact"].tolist() == [1.0, 0.0] and parts["regex"].tolist() == [1.0, 0.0]
    # a dotted module path works too
    fn = R.load_callable("ernie45.train.rewards:exact_match")
    assert fn("a", "a") == 1.0


@pytest.mark.parametrize("raw, msg", [
    ({"type": "fuzzy"}, "type='fuzzy': choose one of"),
    ({"weight": 1}, "a mapping with 'type'"),
    ({"type": "regex"}, "needs 'pattern'"),
    ({"type": "regex", "pattern": "("}, "not a valid regex"),
    ({"type": "exact", "tolerance": 1}, r"unknown key\(s\) \['tolerance'\]"),
    ({"type": "python", "function": "no_colon"}, "give 'package.module:function'"),
    ({"type": "python", "function": "missing/file.py:f"}, "no such file"),
    ({"type": "python", "function": "ernie45.train.rewards:nope"}, "has no callable 'nope'"),
    ({"type": "model", "path": "/nonexistent"}, "no reward_head.safetensors"),
])
def test_reward_config_errors(raw, msg):
    with pytest.raises(ValueError, match=msg):
        R.Rewards.from_config([raw])


def test_reward_reading_a_missing_field_or_returning_junk_is_a_clear_error(tmp_path):
    rw = R.Rewards.from_config([{"type": "numeric", "field": "target"}])
    with pytest.raises(ValueError, match="reads field 'target'"):
        rw(["p"], ["1"], [{"answer": 1}])
    mod = tmp_path / "bad.py"
    mod.write_text("def f(p, c, r):\n    return float('nan')\n")
    rw = R.Rewards.from_config([{"type": "python", "function": f"{mod}:f"}])
    with pytest.raises(ValueError, match="a reward is a finite float"):
        rw(["p"], ["c"], [{}])


def test_reward_model_scores_last_token_hidden_state(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe").replace(vocab_size=128)
    lm = init_weights(ErnieForCausalLM(cfg), seed=0).eval()
    head = torch.nn.Linear(cfg.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5)
    folder = str(tmp_path / "rm")
    R.RewardModel(lm, head).save(folder)
    assert os.path.isfile(os.path.join(folder, R.HEAD_FILE))
    rm = R.RewardModel.from_pretrained(folder)
    seqs = [[5, 9, 17, 3], [7, 7], [1, 2, 3, 4, 5, 6]]
    got = rm.score(seqs)
    for s, g in zip(seqs, got):  # independent: one unpadded sequence at a time, fp64 head
        with torch.no_grad():
            h = lm(torch.tensor([s]), compute_logits=False).hidden_states[0, -1].double()
            want = float(h @ head.weight[0].double() + head.bias.double())
        assert abs(float(g) - want) < 1e-4
    # used as a reward with a weight
    rw = R.Rewards.from_config([{"type": "model", "path": folder, "weight": -2.0}])
    total, parts = rw(["a"] * 3, ["b"] * 3, [{}] * 3, sequences=seqs)
    torch.testing.assert_close(total, -2.0 * got)
    # a head of the wrong width is named
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 7)}, os.path.join(folder, R.HEAD_FILE))
    with pytest.raises(ValueError, match=r"must have shape \[1, 64\]"):
        R.RewardModel.from_pretrained(folder)
