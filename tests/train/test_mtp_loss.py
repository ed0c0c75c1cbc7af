"""ERNIE's MTP loss in the trainer: the MTP block learns to predict token t+2; it leaves the main model alone when
only the block trains; a model without a block gets a clear error or a fresh block."""

from __future__ import annotations

import pytest
import torch

from ernie45.train.data import IGNORE
from ernie45.train.losses import masked_cross_entropy
from ernie45.train.recipe import TrainConfig
from ernie45.train.trainer import Trainer


def _cfg(tmp_path, data, **kw) -> TrainConfig:
    base = dict(task="pretrain", init_from="demo", data=[data], seq_len=32, batch_size=4, max_steps=6, lr=3e-3,
                warmup_steps=0, output_dir=str(tmp_path / "run"), plot=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def corpus(tmp_path):
    import json
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"the river runs to the sea number {i} and back again"}) + "\n"
                         for i in range(40)))
    return str(p)


@pytest.mark.slow
def test_mtp_block_trains_on_a_frozen_model(tmp_path, corpus):
    no_mtp = dict(init_from=None, tokenizer="demo", model={"preset": "tiny-moe", "vocab_size": 6144})
    cfg = _cfg(tmp_path, corpus, add_mtp=True, mtp_loss_coef=1.0, train_only=["model.mtp_"], lr=1e-2, max_steps=8,
               **no_mtp)
    tr = Trainer(cfg)
    assert tr.model.has_mtp
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    batch = [tr.dataset[i] for i in range(4)]
    from ernie45.train.data import pad_batch
    b = pad_batch(batch, tr.pad_id)

    def mtp_loss() -> float:  # the definition, independently: logits of pair t scored against labels[t + 1]
        with torch.no_grad():
            out = tr.model(b["input_ids"], attention_mask=b["attention_mask"])
            logits = tr.model.mtp_logits(out.hidden_states[:, :-1], b["input_ids"][:, 1:])
            return float(masked_cross_entropy(logits, b["labels"][:, 1:]))

    start = mtp_loss()
    rows = [tr.train_step() for _ in range(cfg.max_steps)]
    assert all("mtp_loss" in r for r in rows)
    assert mtp_loss() < 0.9 * start  # the block learns the t+2 statistics of the corpus
    for n, p in tr.model.named_parameters():
        if n.startswith("model.mtp_"):
            continue
        assert torch.equal(p.detach(), before[n]), f"{n} changed though only the MTP block trains"
    assert IGNORE == -100


def test_soft_cross_entropy_matches_the_definition():
    from ernie45.train.losses import soft_cross_entropy
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[1, IGNORE, 2], [3, 4, IGNORE]])
    want = sum(-(target[b, t].double().softmax(-1) * logits[b, t].double().log_softmax(-1)).sum()
               for b in range(2) for t in range(3) if labels[b, t] != IGNORE)
    assert abs(float(soft_cross_entropy(logits, target, labels)) - float(want)) < 1e-5


def test_mtp_settings_are_checked(tmp_path, corpus):
    no_mtp = dict(init_from=None, tokenizer="demo", model={"preset": "tiny-moe", "vocab_size": 6144})
    with pytest.raises(ValueError, match="add_mtp"):
        Trainer(_cfg(tmp_path, corpus, mtp_loss_coef=0.3, **no_mtp))
    with pytest.raises(ValueError, match="mtp_loss_coef"):
        Trainer(_cfg(tmp_path, corpus, add_mtp=True, mtp_distill=True))
    with pytest.raises(ValueError, match="train_only"):
        Trainer(_cfg(tmp_path, corpus, train_only=["model.nothing_"]))
