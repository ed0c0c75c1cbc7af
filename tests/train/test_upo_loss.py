"""UPO objective against hand computations in fp64 Python math: advantages, clipped ratio, k3 KL, DPO term."""

from __future__ import annotations

import math

import pytest
import torch

from ernie45.train import losses
from ernie45.train.upo import UPOConfig, best_worst_pairs, upo_loss

RWD = [{"type": "exact"}]


def test_group_advantages_by_hand():
    r = [[1.0, 0.0, 0.0, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2], [3.0, -1.0, 0.0, 0.0, 2.0]]
    got = losses.group_advantages(torch.tensor(r, dtype=torch.float64), eps=1e-4)
    for row, g in zip(r, got):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))  # Bessel, as TRL
        for x, a in zip(row, g):
            assert abs(float(a) - (x - mean) / (std + 1e-4)) < 1e-12
    assert torch.equal(got[1], torch.zeros(5, dtype=torch.float64))  # equal rewards: no signal
    plain = losses.group_advantages(torch.tensor(r, dtype=torch.float64), scale=False)
    assert abs(float(plain[2, 0]) - (3.0 - 0.8)) < 1e-12


def test_clipped_policy_loss_by_hand():
    logp = [[-1.0, -0.5, -2.0], [-0.1, -3.0, -1.0]]
    old = [[-1.3, -0.5, -1.6], [-0.6, -2.9, -1.0]]
    adv = [1.5, -2.0]
    mask = [[1, 1, 1], [1, 1, 0]]
    eps = 0.2
    want, clipped = 0.0, 0
    for i in range(2):
        for t in range(3):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a, b = rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i]
            want += -min(a, b)
            clipped += b < a
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got, n = losses.clipped_policy_loss(f64(logp), f64(old), f64(adv), torch.tensor(mask, dtype=torch.bool), eps)
    assert abs(float(got) - want) < 1e-12
    # by hand: (0,0) ρ=1.35, A>0 -> clipped; (0,2) ρ=0.67, A>0 -> raw term is the smaller; (1,0) ρ=1.65, A<0 ->
    # raw; (1,1) ρ=0.905 inside the band; (1,2) masked
    assert int(n) == clipped == 1
    lp = f64(logp).requires_grad_()
    loss, _ = losses.clipped_policy_loss(lp, f64(old), f64(adv), torch.tensor(mask, dtype=torch.bool), eps)
    loss.backward()
    assert float(lp.grad[0, 0]) == 0.0  # clipped branch: no gradient
    assert abs(float(lp.grad[0, 1]) + 1.5) < 1e-12  # ρ=1: d(-ρA)/dlogp = -A
    assert float(lp.grad[1, 2]) == 0.0  # masked


def test_clip_count_cases():
    # A > 0: clipped iff ρ > 1+ε; A < 0: clipped iff ρ < 1-ε
    eps = 0.2
    logp = torch.tensor([[math.log(1.3), math.log(1.1), math.log(0.7), math.log(1.3), math.log(1.25)]],
                        dtype=torch.float64)
    for adv, want in ((1.0, 3), (-1.0, 1)):
        # row holds ρ = 1.3, 1.1, 0.7, 1.3, 1.25 with one advantage
        _, n = losses.clipped_policy_loss(logp, torch.zeros_like(logp), torch.tensor([adv], dtype=torch.float64),
                                          torch.ones_like(logp, dtype=torch.bool), eps)
        assert int(n) == want


def test_k3_kl_by_hand():
    logp = [[-1.0, -2.0], [-0.3, -0.7]]
    ref = [[-1.5, -1.0], [-0.3, -2.0]]
    mask = [[1, 1], [1, 0]]
    want = sum(math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
               for i in range(2) for t in range(2) if mask[i][t])
    got = losses.k3_kl(torch.tensor(logp, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                       torch.tensor(mask, dtype=torch.bool))
    assert abs(float(got) - want) < 1e-12
    same = losses.k3_kl(torch.tensor(logp), torch.tensor(logp), torch.ones(2, 2, dtype=torch.bool))
    assert float(same) == 0.0


def test_best_worst_pairs():
    r = torch.tensor([[0.1, 0.9, 0.9, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.2, 0.0, 0.3]])
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    # group 0: first of the tied best; group 1: all equal -> none; group 2: the masked best is skipped
    assert best_worst_pairs(r, keep) == [(0, 1, 3), (2, 3, 2)]


def test_upo_loss_total_by_hand():
    """pg/N + β_kl·k3/N + λ·DPO(best, worst) with N = tokens of the minibatch."""
    cfg = UPOConfig(clip_eps=0.2, kl_coef=0.05, dpo_coef=0.3, dpo_beta=0.5, rewards=RWD)
    logp = [[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0], [-0.4, -0.4, -0.9]]
    old = [[-1.2, -0.5, -1.9], [-0.2, -2.5, -1.0], [-0.4, -0.6, -0.9]]
    ref = [[-1.1, -0.7, -2.2], [-0.3, -2.0, -1.5], [-0.5, -0.5, -0.5]]
    adv = [1.0, -1.0, 0.5]
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    pairs = [(0, 1)]
    num_tokens = 8 + 4  # the rest of the minibatch sits in another micro-batch
    num_pairs = 2
    pg = kl = 0.0
    for i in range(3):
        for t in range(3):
            if mask[i][t]:
                rho = math.exp(logp[i][t] - old[i][t])
                pg += -min(rho * adv[i], min(max(rho, 0.8), 1.2) * adv[i])
                d = ref[i][t] - logp[i][t]
                kl += math.exp(d) - d - 1
    seq = [sum(logp[i][t] for t in range(3) if mask[i][t]) for i in range(3)]
    rseq = [sum(ref[i][t] for t in range(3) if mask[i][t]) for i in range(3)]
    h = (seq[0] - rseq[0]) - (seq[1] - rseq[1])
    dpo = -math.log(1 / (1 + math.exp(-0.5 * h)))
    want = pg / num_tokens + 0.05 * kl / num_tokens + 0.3 * dpo * 1 / num_pairs
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got, stats = upo_loss(f64(logp), f64(old), f64(ref), f64(adv), torch.tensor(mask, dtype=torch.bool), pairs, cfg,
                          num_tokens, num_pairs)
    assert abs(float(got) - want) < 1e-12
    assert abs(stats["dpo_sum"] - dpo) < 1e-12 and abs(stats["kl_sum"] - kl) < 1e-12 and stats["tokens"] == 8
    # without the DPO weight the term is gone
    cfg0 = UPOConfig(clip_eps=0.2, kl_coef=0.05, dpo_coef=0.0, dpo_beta=0.5, rewards=RWD)
    got0, _ = upo_loss(f64(logp), f64(old), f64(ref), f64(adv), torch.tensor(mask, dtype=torch.bool), pairs, cfg0,
                       num_tokens, num_pairs)
    assert abs(float(got0) - (pg / num_tokens + 0.05 * kl / num_tokens)) < 1e-12


@pytest.mark.parametrize("raw, msg", [
    ({"group_size": 1, "rewards": RWD}, "at least 2 samples"),
    ({"clip_eps": 1.5, "rewards": RWD}, "clip_eps=1.5"),
    ({"kl_coef": -1, "rewards": RWD}, "kl_coef=-1"),
    ({}, "upo.rewards is empty"),
    ({"rewards": RWD, "gamma": 1}, r"unknown key\(s\) \['gamma'\]"),
])
def test_upo_config_errors(raw, msg):
    with pytest.raises(ValueError, match=msg):
        UPOConfig.from_dict(raw)
