"""Losses against hand-computed values and gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ernie45.train.data import IGNORE
from ernie45.train.losses import dpo_loss, load_balancing_loss, masked_cross_entropy, sequence_logprobs, simpo_loss


def test_masked_cross_entropy_ignores_masked_positions():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, IGNORE, 4, IGNORE], [IGNORE, IGNORE, 7, 8, 9]])
    keep = labels != IGNORE
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(masked_cross_entropy(logits, labels), expected)
    torch.testing.assert_close(masked_cross_entropy(logits, labels, "sum"), expected * keep.sum())
    # changing logits at ignored positions changes nothing
    logits2 = logits.clone()
    logits2[0, 2] += 100
    logits2[1, 0] -= 50
    torch.testing.assert_close(masked_cross_entropy(logits2, labels), expected)


def test_sequence_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[0, IGNORE, 2]])
    lp, n = sequence_logprobs(logits, labels)
    torch.testing.assert_close(lp, torch.tensor([math.log(0.5) + math.log(0.6)]))
    assert n.tolist() == [2]


def test_dpo_sigmoid_loss_and_gradient_by_hand():
    beta = 0.5
    pc = torch.tensor([-2.0, -1.0], requires_grad=True)
    pr = torch.tensor([-3.0, -0.5], requires_grad=True)
    rc, rr = torch.tensor([-2.5, -1.0]), torch.tensor([-2.5, -1.0])
    loss, c, r = dpo_loss(pc, pr, rc, rr, beta=beta)
    # h = (pc - rc) - (pr - rr) = [0.5 - (-0.5), 0 - 0.5] = [1.0, -0.5]
    h = [1.0, -0.5]
    expected = sum(-math.log(1 / (1 + math.exp(-beta * x))) for x in h) / 2
    assert abs(loss.item() - expected) < 1e-6
    torch.testing.assert_close(c, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(r, torch.tensor([-0.25, 0.25]))
    loss.backward()
    # dL/dpc_i = -beta * sigmoid(-beta h_i) / B ; dL/dpr_i = +beta * sigmoid(-beta h_i) / B
    sig = [1 / (1 + math.exp(beta * x)) for x in h]
    torch.testing.assert_close(pc.grad, torch.tensor([-beta * s / 2 for s in sig]))
    torch.testing.assert_close(pr.grad, torch.tensor([beta * s / 2 for s in sig]))


def test_ipo_and_simpo_by_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    rc, rr = torch.tensor([-1.5]), torch.tensor([-1.5])
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert abs(loss.item() - (1.0 - 1 / (2 * 0.25)) ** 2) < 1e-6  # h = 0.5 + 0.5 = 1
    loss, c, r = simpo_loss(pc, pr, beta=2.0, gamma=0.5)
    assert abs(loss.item() - math.log(1 + math.exp(-(2.0 * 1.0 - 0.5)))) < 1e-6
    torch.testing.assert_close(c - r, torch.tensor([2.0]))


def test_label_smoothing_is_symmetric_mix():
    pc, pr, rc, rr = torch.tensor([0.3]), torch.tensor([-0.2]), torch.tensor([0.0]), torch.tensor([0.0])
    l0, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0)
    l1, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=1.0)
    assert abs(l0.item() + math.log(1 / (1 + math.exp(-0.5)))) < 1e-6
    assert abs(l1.item() + math.log(1 / (1 + math.exp(0.5)))) < 1e-6


def test_load_balancing_loss_uniform_is_one_and_skew_is_higher():
    t, e = 8, 4
    probs = torch.full((t, e), 1 / e)
    idx = torch.tensor([[i % e, (i + 1) % e] for i in range(t)])  # every expert gets t*k/e
    assert abs(load_balancing_loss([(probs, idx)], e).item() - 1.0) < 1e-6
    skew_p = torch.tensor([[0.7, 0.2, 0.05, 0.05]]).repeat(t, 1)
    skew_i = torch.tensor([[0, 1]]).repeat(t, 1)
    # f = [0.5, 0.5, 0, 0]; P = [0.7, 0.2, .05, .05]; E * sum f P = 4 * 0.45 = 1.8
    assert abs(load_balancing_loss([(skew_p, skew_i)], e).item() - 1.8) < 1e-6
    # padding tokens left out
    mask = torch.tensor([1] * 4 + [0] * 4)
    mixed_p = torch.cat([skew_p[:4], probs[4:]])
    mixed_i = torch.cat([skew_i[:4], idx[4:]])
    assert abs(load_balancing_loss([(mixed_p, mixed_i)], e, mask).item() - 1.8) < 1e-6


def test_load_balancing_gradient_flows_to_router_probs():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    load_balancing_loss([(probs, idx)], 4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
