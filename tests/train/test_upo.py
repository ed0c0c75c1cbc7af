"""UPO trainer: the engine samples from the trainer's weights (full and LoRA), exact resume, metrics, recipe."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ernie45.train.data import IGNORE, pad_batch
from ernie45.train.recipe import TrainConfig
from ernie45.train.upo import UPOTrainer
from tests.train.conftest import tiny_model

TIMING = {"rollout_s", "rollout_tokens_per_s", "rollout_share", "step_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_prompts(tmp_path_factory.mktemp("upo"))


def write_prompts(folder) -> str:  # noqa: ANN001 - a pathlib.Path
    """Eight 'Repeat: word ->' prompts and a length reward beside them (also tests/parallel/test_upo_parallel.py)."""
    path = folder / "prompts.jsonl"
    words = ["river", "moon", "stone", "light", "night", "water", "heart", "world"]
    path.write_text("".join(json.dumps({"prompt": f"Repeat: {w} ->", "answer": w}) + "\n" for w in words))
    # a reward that varies within every group, so each step has a policy-gradient signal
    (path.parent / "length_reward.py").write_text("def chars(prompt, completion, record):\n"
                                                  "    return len(completion.strip()) / 10\n")
    return str(path)


def _cfg(tmp_path, prompts, tok_dir, **kw) -> TrainConfig:
    # a random tiny model never stops within 6 tokens: mask_truncated off, or nothing would train
    upo = {"group_size": 4, "max_new_tokens": 6, "kl_coef": 0.05, "dpo_coef": 0.2, "updates_per_step": 2,
           "mask_truncated": False,
           "rewards": [{"type": "exact"},
                       {"type": "regex", "pattern": "^[a-z ]+$", "fullmatch": True, "weight": 0.5},
                       {"type": "python", "function": os.path.join(os.path.dirname(prompts), "length_reward.py:chars"),
                        "weight": 0.1}]}
    upo.update(kw.pop("upo", {}))
    base = dict(task="upo", output_dir=str(tmp_path / "run"), model=tiny_model(), tokenizer=tok_dir, data=[prompts],
                seq_len=32, batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, save_every=2, plot=False, upo=upo,
                aux_free_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def _trainer_logps(tr: UPOTrainer, prompt_ids: list[int], completions) -> list[torch.Tensor]:
    items = [{"input_ids": torch.tensor((prompt_ids + c.token_ids)[:-1]),
              "labels": torch.tensor([IGNORE] * (len(prompt_ids) - 1) + c.token_ids)} for c in completions]
    batch = pad_batch(items, tr.pad_id)
    with torch.no_grad():
        lp = tr._logps(tr.model, batch)[0]
    return [lp[i, batch["labels"][i] != IGNORE] for i in range(len(completions))]


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_engine_samples_from_the_updated_weights(tmp_path, prompts, tok, tok_dir, lora):
    """After optimizer steps the engine's log-probabilities of its own samples equal the trainer's forward:
    the engine holds the trainer's tensors (LoRA: the wrapped modules), nothing is copied or saved."""
    kw = {"lora": lora, "aux_free_rate": 0.0} if lora else {}
    tr = UPOTrainer(_cfg(tmp_path, prompts, tok_dir, **kw), tokenizer=tok)
    ids = tr.dataset[0].ids
    before, _ = tr.rollout.generate([ids], 4, [7], max_new_tokens=6)
    lp_before = _trainer_logps(tr, ids, before[0])
    for got, c in zip(lp_before, before[0]):
        torch.testing.assert_close(got, torch.tensor(c.logprobs), atol=1e-4, rtol=0)
    tr.train_step()  # two optimizer steps (updates_per_step: 2)
    assert tr.model.training  # the rollout switched to eval() and back
    after, _ = tr.rollout.generate([ids], 4, [7], max_new_tokens=6)
    lp_after = _trainer_logps(tr, ids, after[0])
    for got, c in zip(lp_after, after[0]):
        torch.testing.assert_close(got, torch.tensor(c.logprobs), atol=1e-4, rtol=0)
    # the update really moved the policy: the old samples' log-probs changed by far more than the tolerance
    moved = _trainer_logps(tr, ids, before[0])
    assert max(float((a - b).abs().max()) for a, b in zip(moved, lp_before)) > 1e-2
    assert tr.step == 1
    if lora:
        assert all(not p.requires_grad for n, p in tr.model.named_parameters() if "lora" not in n
                   and not n.endswith(("_A", "_B")))


@pytest.mark.slow
def test_upo_resume_after_a_kill_gives_the_same_metrics(tmp_path, prompts, tok, tok_dir):
    full = _cfg(tmp_path / "a", prompts, tok_dir)
    hist = UPOTrainer(full, tokenizer=tok).train()
    cut = _cfg(tmp_path / "b", prompts, tok_dir)
    UPOTrainer(cut, tokenizer=tok).train(stop_after=3)  # "killed" after step 3; the checkpoint is step 2
    resumed = UPOTrainer(cut, tokenizer=tok)
    resumed.train(resume=True)
    assert resumed.step == 4

    def rows(path):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]

    a, b = rows(full.output_dir), rows(cut.output_dir)
    assert len(a) == 4 and a == b  # rewards, KL, clip fraction, lengths, losses: bit-identical
    row = hist[-1]
    for key in ("reward_mean", "reward_std", "reward_exact", "reward_regex", "kl", "clip_fraction", "completion_len",
                "accepted_len", "truncated_frac", "dpo_loss", "dpo_pairs", "pg_loss", "expert_imbalance",
                "rollout_tokens_per_s", "rollout_share", "engine_logp_diff"):
        assert key in row, key
    assert row["engine_logp_diff"] < 1e-4  # the sampler's log-probs are the trainer's
    assert 0 < row["rollout_share"] < 1
    # the second minibatch of each step is off-policy: its ratios move and some get clipped at this lr
    assert any(r["clip_fraction"] > 0 for r in hist)


def test_truncated_completions_are_left_out_of_the_loss(tmp_path, prompts, tok, tok_dir):
    """max_new_tokens=1 with no stop: every completion is truncated, so nothing enters the loss."""
    cfg = _cfg(tmp_path, prompts, tok_dir, upo={"max_new_tokens": 1, "updates_per_step": 1, "dpo_coef": 0.0,
                                                "mask_truncated": True}, max_steps=1, weight_decay=0.0)
    tr = UPOTrainer(cfg, tokenizer=tok)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    row = tr.train_step()
    assert row["truncated_frac"] == 1.0 and row["tokens"] == 0 and row["accepted_len"] == 0
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0
    # with masking off the same completions do train
    cfg2 = _cfg(tmp_path / "b", prompts, tok_dir, upo={"max_new_tokens": 1, "updates_per_step": 1, "dpo_coef": 0.0,
                                                      "mask_truncated": False}, max_steps=1)
    row2 = UPOTrainer(cfg2, tokenizer=tok).train_step()
    assert row2["tokens"] == 16
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters() if "correction_bias" not in n)


def test_upo_recipe_errors(tmp_path, prompts, tok_dir):
    with pytest.raises(ValueError, match="split evenly"):
        _cfg(tmp_path, prompts, tok_dir, batch_size=3)
    with pytest.raises(ValueError, match="the upo mapping is for task: upo"):
        TrainConfig(task="sft", data=["x"], model=tiny_model(), tokenizer=tok_dir, upo={"rewards": []})
    with pytest.raises(ValueError, match="upo.rewards is empty"):
        _cfg(tmp_path, prompts, tok_dir, upo={"rewards": []})


def test_cli_takes_several_ranks_for_upo_and_refuses_what_it_cannot_run(tmp_path, prompts, tok_dir):
    """--ep/--fsdp pass the pre-launch check (the run itself: tests/parallel/test_upo_parallel.py); LoRA on ranks,
    a batch that does not split over the ranks and minibatches, and --pp are refused before any process starts."""
    import argparse

    from ernie45.train.cli import cmd_train
    from ernie45.train.distributed import check_layout

    raw = {"task": "upo", "output_dir": str(tmp_path / "run"), "tokenizer": tok_dir, "model": tiny_model(),
           "data": [prompts], "batch_size": 4, "upo": {"rewards": [{"type": "exact"}], "updates_per_step": 2}}
    assert check_layout(TrainConfig(**raw), 2, 1) == 2
    assert check_layout(TrainConfig(**raw), 1, 2) == 2
    with pytest.raises(ValueError, match="with LoRA is not supported; drop --ep/--fsdp or the lora block"):
        check_layout(TrainConfig(**raw, lora={"r": 4}), 2, 1)
    with pytest.raises(ValueError, match=r"batch_size=4 prompts must split evenly into upo.updates_per_step=2 x 4 "
                                         r"data ranks x grad_accum=1 = 8 parts"):
        check_layout(TrainConfig(**raw), 2, 4)
    recipe = tmp_path / "upo.yaml"
    recipe.write_text(json.dumps(raw))
    args = argparse.Namespace(config=str(recipe), output_dir=None, max_steps=None, task="upo", ep=1, fsdp=1, pp=2,
                              resume=False)
    with pytest.raises(ValueError, match="not on pipeline stages; drop --pp"):
        cmd_train(args)
    args.task = "sft"
    with pytest.raises(ValueError, match="is a 'upo' recipe"):
        cmd_train(args)


def test_rollout_stops_on_the_chat_end_token(tmp_path, prompts, tok_dir, tok):
    """A chat answer ends with <|end_of_sentence|>, which is not the checkpoint's EOS: rollouts must stop on
    every stop id of the tokenizer (before the fix they ran on to max_new_tokens)."""
    end = tok.token_to_id("<|end_of_sentence|>")
    tr = UPOTrainer(_cfg(tmp_path, prompts, tok_dir))
    assert end in tr.rollout.stop_token_ids and end != tr.model.config.eos_token_id

    def favour_end(module, args, logits):  # noqa: ANN001, ANN202 - the end token becomes the certain choice
        logits = logits.clone()
        logits[..., end] += 1e4
        return logits

    tr.model.lm_head.register_forward_hook(favour_end)
    groups, _ = tr.rollout.generate([tr.dataset[0].ids], 2, [0], max_new_tokens=6)
    for c in groups[0]:
        assert c.token_ids == [end] and c.finish_reason == "stop"
