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


# ------------------------------------------------------------------------------------------ the recursive MTP loss
def _tiny_mtp_model(seed: int = 0):
    from ernie45 import ModelConfig
    from ernie45.model.model import ErnieForCausalLM, init_weights
    cfg = ModelConfig.from_name("tiny-moe").replace(num_nextn_predict_layers=1)
    return init_weights(ErnieForCausalLM(cfg), std=0.1, seed=seed).eval()


def _chain_reference(model, hidden_BTH, ids_BT, depth):  # noqa: ANN001, ANN202
    """Each chain's depth-d draft computed alone, the way the engine makes it: one causal row holding the depth-1
    pairs 0..t (positions 0..t), then the chain's own depths 2..d (positions t+1 .. t+d-1). No mask involved."""
    b, t, _ = hidden_BTH.shape
    out = [torch.empty(b, t - d, model.config.vocab_size) for d in range(1, depth + 1)]
    for c in range(t - 1):
        row_h = [hidden_BTH[:, :c + 1]]
        row_ids = [ids_BT[:, 1:c + 2]]
        prev = None
        for d in range(1, depth + 1):
            if c > t - d - 1:
                break
            if d > 1:
                row_h.append(prev)
                row_ids.append(ids_BT[:, c + d:c + d + 1])
            hh, ii = torch.cat(row_h, 1), torch.cat(row_ids, 1)
            pos = torch.arange(hh.shape[1])[None].expand(b, -1)
            prev = model.mtp_hidden(hh, ii, pos)[:, -1:]  # [B, 1, H]: this chain's depth-d output
            out[d - 1][:, c] = model.lm_head(prev)[:, 0]
    return out


def test_recursive_mtp_logits_match_each_chain_computed_alone():
    from ernie45.train.trainer import mtp_depth_logits
    model = _tiny_mtp_model()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, model.config.hidden_size, generator=g)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        got = mtp_depth_logits(model, h, ids, 3)
        want = _chain_reference(model, h, ids, 3)
        one = model.mtp_logits(h[:, :-1], ids[:, 1:])
    assert [tuple(x.shape) for x in got] == [(2, 8, model.config.vocab_size), (2, 7, model.config.vocab_size),
                                             (2, 6, model.config.vocab_size)]
    torch.testing.assert_close(got[0], one, rtol=1e-5, atol=1e-5)  # depth 1 is ERNIE's one-step MTP
    for g_d, w_d in zip(got, want):
        torch.testing.assert_close(g_d, w_d, rtol=1e-4, atol=1e-4)
    # the later depths depend on the earlier ones' outputs (a depth-2 row is not depth 1 shifted)
    assert not torch.allclose(got[1], got[0][:, 1:], atol=1e-3)


def test_trainer_mtp_depth_loss_is_the_mean_over_depths(tmp_path, corpus):
    """The trainer's recorded MTP loss with mtp_depth=2 and distillation: the mean over depths of the soft
    cross-entropy against the model's own distribution one position further each depth, summed over labels."""
    from ernie45.train.data import pad_batch
    no_mtp = dict(init_from=None, tokenizer="demo", model={"preset": "tiny-moe", "vocab_size": 6144})
    cfg = _cfg(tmp_path, corpus, add_mtp=True, mtp_loss_coef=1.0, mtp_distill=True, mtp_depth=2,
               train_only=["model.mtp_"], seq_len=16, **no_mtp)
    tr = Trainer(cfg)
    items = [tr.dataset[i] for i in range(2)]
    b = pad_batch(items, tr.pad_id)
    with torch.no_grad():
        out = tr.model(b["input_ids"], attention_mask=b["attention_mask"])
        ref = _chain_reference(tr.model, out.hidden_states, b["input_ids"], 2)
        want = 0.0
        for d, logits in enumerate(ref, 1):
            for i in range(2):
                for t in range(logits.shape[1]):
                    if b["labels"][i, t + d] == IGNORE:
                        continue
                    p = out.logits[i, t + d].double().softmax(-1)
                    want += float(-(p * logits[i, t].double().log_softmax(-1)).sum())
        want /= 2
    rec = tr.micro_step(items, 1.0)
    assert abs(rec["mtp_loss_sum"] - want) < 1e-3 * abs(want)
    with pytest.raises(ValueError, match="mtp_depth"):
        _cfg(tmp_path, corpus, mtp_depth=2)
    with pytest.raises(ValueError, match="mtp_depth"):
        _cfg(tmp_path, corpus, mtp_loss_coef=1.0, mtp_depth=0)
