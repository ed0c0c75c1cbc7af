"""The small native decode ops (RMSNorm, RoPE, router, KV write, argmax): against the torch code they replace and
fp64 references, and their dispatch (decode-size bf16 inference only)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig, kernels
from ernie45.accel import accelerate
from ernie45.accel.cpu import NATIVE
from ernie45.accel.swap import swap
from ernie45.model.layers import RMSNorm, RotaryEmbedding, apply_rope
from ernie45.model.moe import Router

pytestmark = pytest.mark.native  # run, fail when this machine could build them and did not, skip otherwise


def _count(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    calls: list = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_rms_norm_rounds_as_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(2560, eps=1e-5)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    norm = norm.bfloat16()
    swap(norm, NATIVE)  # the cpu backend's NativeRMSNorm
    x = (torch.randn(7, 2560) * torch.logspace(-3, 2, 7)[:, None]).bfloat16()  # rows of very different scales
    calls = _count(monkeypatch, "rms_norm")
    with torch.no_grad():
        fast = norm(x)
        with kernels.use_kernels(False):
            ref = norm(x)
    assert len(calls) == 1
    # Same roundings; only the order of the fp32 sum of squares differs, which may move a value by one bf16 ulp.
    diff = (fast.float() - ref.float()).abs()
    assert (diff > 0).float().mean() < 1e-3 and bool((diff <= ref.float().abs() * 2**-7).all())
    x64 = x.double()
    exact = norm.weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(fast.double(), exact, rtol=2**-7, atol=0)
    assert torch.equal(norm(x[2:3]), fast[2:3])  # a row does not depend on its batch
    norm.weight.requires_grad_(True)
    norm(x)  # autograd through the weight: torch
    with torch.no_grad():
        norm(torch.randn(kernels.SMALL_MAX_ROWS + 1, 2560).bfloat16())  # prefill sizes: torch
        norm.float()(x.float())
    assert len(calls) == 1


def test_rope_in_place_is_bit_identical_to_apply_rope() -> None:
    rot = RotaryEmbedding(128, 500000.0)
    cos, sin = rot(torch.tensor([0, 7, 1000, 131071]))
    q = torch.randn(4, 20, 128).bfloat16()
    ref = apply_rope(q, cos[:, None], sin[:, None])
    out = kernels.rope_(q.clone(), cos, sin)
    assert torch.equal(out, ref)
    # and it is a rotation: fp64 of the same pairs
    qe, qo = q.double()[..., 0::2], q.double()[..., 1::2]
    c, s = cos.double()[:, None], sin.double()[:, None]
    exact = torch.stack((qe * c - qo * s, qo * c + qe * s), -1).flatten(-2)
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous bf16"):
        kernels.rope_(q.transpose(0, 1), cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_matches_the_module(dtype: torch.dtype) -> None:
    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b")
    torch.manual_seed(0)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.05)
    r.e_score_correction_bias.normal_(0, 0.02)  # moves the selection away from plain top-k of probs
    x = torch.randn(9, cfg.hidden_size).to(dtype)
    with kernels.use_kernels(False):
        p_ref, w_ref, i_ref = r(x)
    p, w, i = kernels.router(x, r.weight, r.e_score_correction_bias, r.top_k, r.norm_min)
    assert torch.equal(i, i_ref) and w.dtype == w_ref.dtype == dtype
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.float(), w_ref.float(), rtol=2**-8 if dtype == torch.bfloat16 else 1e-5, atol=0)
    # fp64 reference of the whole rule
    p64 = (x.double() @ r.weight.double().t()).softmax(-1)
    sel = (p64 + r.e_score_correction_bias.double()).topk(r.top_k, -1).indices
    assert torch.equal(i, sel)
    w64 = p64.gather(-1, sel)
    torch.testing.assert_close(w.double(), w64 / w64.sum(-1, keepdim=True), rtol=2**-7, atol=0)


def test_router_dispatch_and_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig.from_name("tiny-moe")
    r = Router(cfg)  # zero weight: every prob equal; the bias alone orders, and the lower index wins a tie
    swap(r, NATIVE)
    r.e_score_correction_bias[3] = 1.0
    calls = _count(monkeypatch, "router")
    x = torch.randn(2, cfg.hidden_size).bfloat16()
    with torch.no_grad():
        _, w, idx = r(x)
    assert len(calls) == 1
    k = cfg.moe_k
    assert idx[0].tolist() == [3] + [e for e in range(cfg.moe_num_experts) if e != 3][:k - 1]
    torch.testing.assert_close(w.float(), torch.full((2, k), 1 / k), rtol=2**-8, atol=0)
    r.weight.requires_grad_(True)
    r(x)  # training: torch
    assert len(calls) == 1


def test_kv_write_equals_index_copy() -> None:
    kc, vc = torch.zeros(6, 4, 2, 16).bfloat16(), torch.zeros(6, 4, 2, 16).bfloat16()
    k, v = torch.randn(3, 2, 16).bfloat16(), torch.randn(3, 2, 16).bfloat16()
    slots = torch.tensor([5, 0, 23])
    kernels.kv_write(k, v, kc, vc, slots)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    kr.view(-1, 2, 16).index_copy_(0, slots, k)
    vr.view(-1, 2, 16).index_copy_(0, slots, v)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    with pytest.raises(IndexError, match="outside the cache's 24 slots"):
        kernels.kv_write(k, v, kc, vc, torch.tensor([5, 0, 24]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_is_torchs(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 103424 + 5).to(dtype)   # V not a multiple of 16: the tail loop
    x[1, 17] = x[1, 40000] = x[1, 103428] = 50.0  # ties: the first wins
    x[2] = float("-inf")
    x[3, 99] = float("nan")
    x[3, 5] = 100.0
    x[4, 103426] = 60.0                           # the maximum in the tail
    x[5, 16 * 7 + 3] = x[5, 16 * 9 + 3] = 70.0    # a tie within one lane
    x[5, 16 * 8] = 70.0                           # and in another lane, between them
    assert kernels.argmax(x).tolist() == x.argmax(-1).tolist() == [int(x[0].argmax()), 17, 0, 99, 103426, 115]


def test_engine_greedy_sampling_takes_the_argmax_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy batch samples with one native argmax over the logits as they are; a batch that wants logprobs or
    penalties takes the full sampler. Both give the tokens of the fp32 argmax."""
    from ernie45.accel.cpu import argmax
    from ernie45.engine.sampler import Sampler
    from ernie45.engine.sampling_params import SamplingParams
    from ernie45.engine.sequence import Sequence

    calls = _count(monkeypatch, "argmax")
    logits = torch.randn(3, 1000).bfloat16()
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4)) for i in range(3)]
    tokens, lps = Sampler(argmax)(logits, seqs)
    assert len(calls) == 1 and tokens == logits.float().argmax(-1).tolist() and lps == [None] * 3
    seqs[1] = Sequence("lp", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, logprobs=2))
    tokens, lps = Sampler(argmax)(logits, seqs)
    assert len(calls) == 1 and tokens == logits.float().argmax(-1).tolist() and lps[1] is not None
    seqs[1] = seqs[0]
    tokens, _ = Sampler(argmax)(logits.half(), seqs)  # fp16 logits (an fp16 model on CPU): the torch path
    assert len(calls) == 1 and tokens == logits.half().float().argmax(-1).tolist()


def test_decode_forward_with_small_ops_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 tiny MoE model at decode size: the layer ops run natively (norms, RoPE, router) and the logits stay
    within bf16 rounding of the all-torch forward."""
    from ernie45.model.model import ErnieForCausalLM, init_weights

    cfg = ModelConfig.from_name("tiny-moe")
    model = accelerate(init_weights(ErnieForCausalLM(cfg), std=0.05, seed=0).bfloat16().eval(), "cpu")
    counts = {n: _count(monkeypatch, n) for n in ("rms_norm", "router")}
    ids = torch.randint(3, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids).logits.float()
        with kernels.use_kernels(False):
            ref = model(ids).logits.float()
    assert len(counts["rms_norm"]) == 2 * cfg.num_hidden_layers + 1 and len(counts["router"]) >= 1
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
