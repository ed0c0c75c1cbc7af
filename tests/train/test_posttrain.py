"""Post-training behaviour: SFT learns replies and not prompts; DPO widens the implicit reward margin;
aux-loss-free balancing evens out expert load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ernie45 import ModelConfig, init_weights
from ernie45.model.model import ErnieForCausalLM
from ernie45.train import balance
from ernie45.train.data import IGNORE, BatchSampler, SFTDataset, pad_batch
from ernie45.train.losses import sequence_logprobs
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer
from tests.train.conftest import DPO_DEMO, tiny_model


def _chats(path, n=8):
    """Chats whose prompts are random-looking words and whose replies are fixed short phrases."""
    g = torch.Generator().manual_seed(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "paper", "light", "north", "quiet"]
    rows = []
    for i in range(n):
        prompt = " ".join(words[j] for j in torch.randint(0, len(words), (12,), generator=g).tolist())
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": ["yes", "no"][i % 2]}]})
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _span_losses(model, ds, tok):
    """Mean token loss on the assistant spans (the labels) and on the prompt tokens (everything else)."""
    items = [ds[i] for i in range(len(ds))]
    batch = pad_batch(items, 0)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    inp = batch["input_ids"]
    prompt_labels = torch.full_like(inp, IGNORE)
    prompt_labels[:, :-1] = inp[:, 1:]
    shifted_mask = batch["attention_mask"][:, 1:].bool() & (batch["labels"][:, :-1] == IGNORE)
    prompt_labels[:, :-1][~shifted_mask] = IGNORE
    reply_lp, reply_n = sequence_logprobs(logits, batch["labels"])
    prompt_lp, prompt_n = sequence_logprobs(logits, prompt_labels)
    return float(-reply_lp.sum() / reply_n.sum()), float(-prompt_lp.sum() / prompt_n.sum())


def test_sft_learns_replies_not_prompts(tmp_path, tok, tok_dir):
    """Would fail if the prompt were trained on: a control run whose labels also cover the prompt shows
    how far the prompt loss falls then; with SFT masking it must fall far less."""
    data = _chats(tmp_path / "chats.jsonl")
    ds = SFTDataset.from_file(data, tok, 64)

    def run(train_prompt: bool):
        cfg = TrainConfig(task="sft", output_dir=str(tmp_path / f"run{train_prompt}"), tokenizer=tok_dir,
                          model=tiny_model(), data=[data], seq_len=64, batch_size=4, max_steps=20, lr=3e-3,
                          warmup_steps=2, save_every=20, plot=False, weight_decay=0.0)
        tr = Trainer(cfg, tokenizer=tok)
        if train_prompt:  # the bug this test guards against: every next token is a target
            tr.dataset.examples = [{"input_ids": ex["input_ids"],
                                    "labels": torch.cat([ex["input_ids"][1:], ex["labels"][-1:]])}
                                   for ex in tr.dataset.examples]
        tr.model.eval()
        before = _span_losses(tr.model, ds, tok)
        tr.model.train()
        tr.train()
        tr.model.eval()
        return before, _span_losses(tr.model, ds, tok)

    (reply0, prompt0), (reply1, prompt1) = run(False)
    _, (_, prompt_ctl) = run(True)
    assert reply1 < 0.5 * reply0, (reply0, reply1)  # replies are learned
    assert prompt0 - prompt1 < 0.5 * (prompt0 - prompt_ctl), (prompt0, prompt1, prompt_ctl)  # prompts are not


def _base_dir(tmp_path, tok_dir):
    from ernie45 import save_model

    base_dir = tmp_path / "base"
    save_model(init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe").replace(vocab_size=1024)), seed=0),
               base_dir)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (base_dir / f).write_bytes((open(f"{tok_dir}/{f}", "rb")).read())
    return base_dir


def _reply_logps(model, tr, indices, mean: bool):
    """log p(reply | prompt) of chosen and rejected for these examples, by hand: fp32 log-softmax, gathered at the
    labelled positions, summed (or averaged per token) over each reply. Returns (chosen_B, rejected_B)."""
    out = []
    for key in ("chosen", "rejected"):
        vals = []
        for i in indices:
            ex = tr.dataset[i]
            ids, labels = ex[f"{key}_input_ids"], ex[f"{key}_labels"]
            with torch.no_grad():
                logp = model(ids[None]).logits[0].double().log_softmax(-1)
            keep = labels != IGNORE
            lp = logp[keep].gather(-1, labels[keep][:, None]).sum()
            vals.append(lp / keep.sum() if mean else lp)
        out.append(torch.stack(vals))
    return out


def test_dpo_margin_grows_on_toy_preferences(tmp_path, tok, tok_dir):
    base_dir = _base_dir(tmp_path, tok_dir)
    for loss in ("sigmoid", "simpo"):
        cfg = TrainConfig(task="dpo", output_dir=str(tmp_path / loss), init_from=str(base_dir), data=[DPO_DEMO],
                          seq_len=64, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=1, save_every=12,
                          plot=False, dpo_loss=loss, dpo_beta=0.5, weight_decay=0.0)
        tr = Trainer(cfg, tokenizer=tok)
        first = BatchSampler(len(tr.dataset), cfg.batch_size, seed=cfg.seed).next_indices()
        if loss == "sigmoid":  # policy == reference at the first step: margin 0, loss log 2
            want_margin, want_loss = 0.0, math.log(2)
        else:  # reference-free: beta * (mean log p chosen - mean log p rejected), loss -log sigmoid(margin - gamma)
            c, r = _reply_logps(tr.model, tr, first, mean=True)
            m = cfg.simpo_beta * (c - r)
            want_margin, want_loss = float(m.mean()), float(-torch.nn.functional.logsigmoid(m - cfg.simpo_gamma).mean())
        hist = tr.train()
        assert hist[0]["reward_margin"] == pytest.approx(want_margin, abs=1e-4)
        assert hist[0]["loss"] == pytest.approx(want_loss, rel=1e-4)
        assert hist[-1]["reward_margin"] > hist[0]["reward_margin"] + 0.5, [h["reward_margin"] for h in hist]
        assert hist[-1]["reward_accuracy"] == 1.0
        assert hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.slow
def test_ipo_through_the_trainer_regresses_the_margin_to_its_target(tmp_path, tok, tok_dir):
    """IPO (Azar et al. 2023) through the trainer, checked by hand: at the first step policy == reference, so
    h = 0 and the loss is (0 - 1/(2 beta))^2 exactly; training then moves the per-token-mean log-ratio margin h of
    the training pairs towards 1/(2 beta) (computed here from the final policy and the frozen reference, not from
    the trainer's metrics) and stops there, where sigmoid DPO keeps widening it."""
    base_dir = _base_dir(tmp_path, tok_dir)
    beta = 0.5
    cfg = TrainConfig(task="dpo", output_dir=str(tmp_path / "ipo"), init_from=str(base_dir), data=[DPO_DEMO],
                      seq_len=64, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=1, save_every=12,
                      plot=False, dpo_loss="ipo", dpo_beta=beta, weight_decay=0.0)
    tr = Trainer(cfg, tokenizer=tok)
    hist = tr.train()
    assert hist[0]["loss"] == pytest.approx(1 / (2 * beta) ** 2, rel=1e-6)
    assert hist[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    everything = list(range(len(tr.dataset)))
    pc, pr = _reply_logps(tr.model.eval(), tr, everything, mean=True)
    rc, rr = _reply_logps(tr.reference, tr, everything, mean=True)
    h = (pc - rc) - (pr - rr)
    target = 1 / (2 * beta)
    ipo_loss = float(((h - target) ** 2).mean())
    assert ipo_loss < 0.1 * hist[0]["loss"], (ipo_loss, h)  # the loss over all pairs fell 10x from (1/2b)^2
    assert abs(float(h.mean()) - target) < 0.1 * target and float((h - target).abs().max()) < 0.3 * target, h
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]


def test_aux_free_bias_update_evens_out_a_skewed_router():
    """The update rule alone: a router skewed towards experts 0 and 1 routes a fixed token set; after each
    round the bias moves against the load. Imbalance must fall from ~3 to near 1 (and stay there); with the
    sign flipped it would rise to the maximum E/K = 4."""
    cfg = ModelConfig.from_name("tiny-moe")
    model = init_weights(ErnieForCausalLM(cfg), seed=0)
    moes = balance.moe_modules(model)
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(cfg.hidden_size, generator=g), dim=0)
    x = torch.randn(512, cfg.hidden_size, generator=g) + 2.0 * u  # tokens share a direction u
    with torch.no_grad():
        for moe in moes:
            moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * 0.05)
            moe.gate.weight[:2] += 0.5 * u  # experts 0 and 1 score higher for every token
    trace = []
    for _ in range(150):
        router = [moe.gate(x)[::2] for moe in moes]  # (probs_TE, idx_TK) per layer
        load = balance.expert_load([(p, i) for p, i in router], cfg.moe_num_experts)
        trace.append(balance.imbalance(load))
        balance.update_correction_bias(model, load, rate=3e-3)
    assert trace[0] > 2.0, trace[0]
    assert max(trace[-20:]) < 1.3, trace[-20:]
    assert (moes[0].gate.e_score_correction_bias[:2] < 0).all()  # the favoured experts were pushed down


def test_balancing_figures_are_logged_per_step(tmp_path, tok, tok_dir, small_corpus):
    cfg = TrainConfig(task="pretrain", output_dir=str(tmp_path / "r"), tokenizer=tok_dir, model=tiny_model(),
                      data=[small_corpus], seq_len=32, batch_size=4, max_steps=3, save_every=3, plot=False,
                      aux_free_rate=1e-3, aux_loss_coef=0.01)
    hist = Trainer(cfg, tokenizer=tok).train()
    assert all(1.0 <= h["expert_imbalance"] <= 4.0 and h["aux_loss"] >= 1.0 - 1e-6 for h in hist)
