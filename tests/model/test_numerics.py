"""Details that a parity test could miss if the reference were wrong the same way: checked against
hand-written plain-torch formulas from the spec."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights
from ernie45.model.layers import RMSNorm, RotaryEmbedding, apply_rope
from ernie45.model.moe import MoE


def test_rope_rotates_adjacent_pairs_not_halves():
    d = 8
    rope = RotaryEmbedding(d, theta=500000.0)
    x = torch.randn(3, d)
    pos = torch.tensor([0, 5, 17])
    cos, sin = rope(pos)
    got = apply_rope(x, cos, sin)
    # Spec §2.5 written out by hand: pair (2i, 2i+1) rotated by p / θ^(2i/d).
    want = torch.empty_like(x)
    for r, p in enumerate(pos.tolist()):
        for i in range(d // 2):
            a = p / 500000.0 ** (2 * i / d)
            c, s = math.cos(a), math.sin(a)
            want[r, 2 * i] = x[r, 2 * i] * c - x[r, 2 * i + 1] * s
            want[r, 2 * i + 1] = x[r, 2 * i + 1] * c + x[r, 2 * i] * s
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The NeoX half-split layout gives a different answer: this test would catch it.
    half = d // 2
    neox = torch.cat([x[:, :half] * cos - x[:, half:] * sin, x[:, half:] * cos + x[:, :half] * sin], -1)
    assert (neox - want).abs().max() > 1e-2


def test_rope_in_fp32_for_bf16_inputs():
    rope = RotaryEmbedding(128, 500000.0)
    x = torch.randn(4, 128).to(torch.bfloat16)
    cos, sin = rope(torch.tensor([100000, 100001, 131070, 131071]))
    got = apply_rope(x, cos, sin)
    assert got.dtype == torch.bfloat16
    want = apply_rope(x.float(), cos, sin).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_rmsnorm_casts_before_weight():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(2, 16).to(torch.bfloat16)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), want)


def _moe(seed=0, shared=1) -> MoE:
    cfg = ModelConfig.from_name("tiny-moe").replace(moe_num_shared_experts=shared)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        moe.gate.weight.mul_(8.0)
    return moe


def _reference_moe(moe: MoE, x: torch.Tensor, bias_in_weights: bool = False) -> torch.Tensor:
    """Spec §2.7 token by token in plain torch."""
    probs = F.softmax(x.float() @ moe.gate.weight.float().T, dim=-1)
    biased = probs + moe.gate.e_score_correction_bias
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        idx = biased[t].topk(moe.gate.top_k).indices
        w = (biased if bias_in_weights else probs)[t, idx]
        w = w / w.sum().clamp(min=1e-12)
        for j, e in enumerate(idx.tolist()):
            gu = moe.experts.gate_up_proj[e] @ x[t]
            g, u = gu.chunk(2)
            out[t] += w[j] * (moe.experts.down_proj[e] @ (F.silu(g) * u))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


def test_correction_bias_picks_experts_but_never_weighs_them():
    moe = _moe()
    x = torch.randn(32, 64)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.rand(8) * 0.5)
        probs = F.softmax(x @ moe.gate.weight.T, -1)
        # the bias must change the chosen set for some tokens, or this test proves nothing
        unbiased_pick = probs.topk(2).indices.sort().values
        biased_pick = (probs + moe.gate.e_score_correction_bias).topk(2).indices.sort().values
        assert (unbiased_pick != biased_pick).any()
        got = moe(x[None])[0]
        want = _reference_moe(moe, x)
        leaked = _reference_moe(moe, x, bias_in_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - leaked).abs().max() > 1e-2  # a leak of the bias into the weights would be seen


def test_moe_reads_only_selected_experts():
    moe = _moe(shared=0)
    x = torch.randn(1, 64)  # a decode step: one token
    with torch.no_grad():
        chosen = set(moe.gate(x)[2][0].tolist())
        for e in range(8):
            if e not in chosen:  # poison every expert that was not picked
                moe.experts.gate_up_proj[e].fill_(float("nan"))
                moe.experts.down_proj[e].fill_(float("nan"))
        y = moe(x[None])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], _reference_moe(moe, x), rtol=1e-4, atol=1e-4)


def test_router_stays_fp32_under_dtype_casts():
    model = init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe")), seed=0).to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_batch_rows_are_independent():
    model = init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-moe")), std=0.2, seed=0).eval()
    ids = torch.randint(0, 512, (3, 9))
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_logits_indices_select_rows():
    model = init_weights(ErnieForCausalLM(ModelConfig.from_name("tiny-dense")), std=0.2, seed=0).eval()
    ids = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        full = model(ids).logits.reshape(10, -1)
        picked = model(ids, logits_indices=torch.tensor([4, 9])).logits
    torch.testing.assert_close(picked, full[[4, 9]])
