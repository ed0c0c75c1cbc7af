"""FP8 training numerics on CPU through the emulation (cast round trips with the same scales) against an
fp64 reference of quantize -> dequantize -> matmul; a wrong scale fails the same comparison."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights
from ernie45.train import fp8, losses

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def ref_qdq_rows(x: torch.Tensor, dtype: torch.dtype, scale_mult: float = 1.0) -> torch.Tensor:
    """fp64 reference: each row scaled so its amax is the format's max, rounded to ``dtype``, scaled back."""
    fmax = torch.finfo(dtype).max
    s = (x.double().abs().amax(-1, keepdim=True).clamp(min=1e-12) / fmax).float().double() * scale_mult
    return (x.double() / s).clamp(-fmax, fmax).to(dtype).double() * s


def ref_matmul(x, w, gx=E4, gw=E4):  # noqa: ANN001, ANN201
    return ref_qdq_rows(x, gx) @ ref_qdq_rows(w, gw).t()


def data(t: int = 48, k: int = 64, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: per-row scales matter
    x = torch.randn(t, k, generator=g) * torch.logspace(-3, 2, t)[:, None]
    return x, torch.randn(n, k, generator=g) * 0.05


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """fp32 accumulation of identical FP8 operands: relative 1e-5 of each row's scale."""
    tol = 1e-5 * want.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    return bool(((got.double() - want).abs() <= tol).all())


def test_rowwise_quantization_round_trip():
    x, _ = data()
    q, s = fp8.quantize_rowwise(x, E4)
    assert q.dtype == E4 and s.shape == (48, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((48,), 448.0))  # each row's amax -> e4m3 max
    rel = ((q.float() * s - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert 0 < rel <= 2**-4  # 3 mantissa bits: half an ulp of 1/8 at most, relative to the row max
    torch.testing.assert_close((q.double() * s.double()), ref_qdq_rows(x, E4), rtol=0, atol=0)


def test_fp8_matmul_forward_and_backward_equal_the_fp64_reference():
    x, w = data()
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = fp8.Fp8Matmul.apply(x, w, torch.float32, True)
    assert close(y, ref_matmul(x.detach(), w.detach()))
    assert not close(y, x.detach().double() @ w.detach().double().t())  # it really is FP8, not fp32
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(5)) * 1e-3
    y.backward(g)
    # dx = dy(e5m2 rows) . w^T(e4m3 per input column); dw = dy^T(e5m2 per output row) . x^T(e4m3 per column)
    dx = (ref_qdq_rows(g, E5) @ ref_qdq_rows(w.detach().t(), E4).t()).to(torch.bfloat16).double()
    dw = (ref_qdq_rows(g.t(), E5) @ ref_qdq_rows(x.detach().t(), E4).t()).to(torch.bfloat16).double()
    torch.testing.assert_close(x.grad.double(), dx, rtol=8e-3, atol=0)  # bf16 output rounding
    torch.testing.assert_close(w.grad.double(), dw, rtol=8e-3, atol=0)


@pytest.mark.parametrize("bug", ["dequant-scale-x2", "scale-x2-in-quantization-only", "scale-x1.5", "scale-halved"])
def test_a_wrong_scale_fails_the_reference_comparison(bug, monkeypatch):
    x, w = data()
    want = ref_matmul(x, w)
    real = fp8.quantize_rowwise

    def wrong(t, dtype):  # noqa: ANN001, ANN202
        q, s = real(t, dtype)
        if bug == "dequant-scale-x2":
            return q, s * 2
        fmax = torch.finfo(dtype).max
        mult = {"scale-x2-in-quantization-only": 2.0, "scale-x1.5": 1.5, "scale-halved": 0.5}[bug]
        q2 = (t.float() / (s * mult)).clamp(-fmax, fmax).to(dtype)
        return q2, s * (1.0 if bug == "scale-x2-in-quantization-only" else mult)

    assert close(fp8.Fp8Matmul.apply(x, w, torch.float32, True), want)
    monkeypatch.setattr(fp8, "quantize_rowwise", wrong)
    assert not close(fp8.Fp8Matmul.apply(x, w, torch.float32, True), want)


def test_torchao_linears_follow_the_tensorwise_recipe():
    """The attention / MLP linears (torchao Float8Linear, emulated): per-tensor e4m3 scales."""
    from torch import nn

    lin = nn.Sequential(nn.Linear(64, 32, bias=False))
    x, w = data()
    with torch.no_grad():
        lin[0].weight.copy_(w)
    assert fp8.enable_fp8(lin, emulate=True)["linears"] == 1

    def qdq_tensor(t: torch.Tensor, mult: float = 1.0) -> torch.Tensor:
        s = (448.0 / t.double().abs().max()).float().double() * mult
        return (t.double() * s).clamp(-448, 448).to(E4).double() / s

    y = lin(x).double()
    want = qdq_tensor(x) @ qdq_tensor(w).t()
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(y, want, rtol=0, atol=tol)
    assert (y - qdq_tensor(x, 1.5) @ qdq_tensor(w).t()).abs().max() > 100 * tol  # a wrong scale shows


@pytest.mark.slow
def test_fp8_model_trains_close_to_fp32():
    cfg = ModelConfig.from_name("tiny-moe")
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    curves = {}
    for name in ("fp32", "fp8"):
        model = init_weights(ErnieForCausalLM(cfg), std=0.05, seed=0).train()
        if name == "fp8":
            stats = fp8.enable_fp8(model, emulate=True)
            # q/k/v/o + dense MLP (3 layers) and the shared experts; the LM head stays full precision
            assert stats == {"linears": 3 * 4 + 3 + 2 * 3, "expert_blocks": 2}, stats
            assert type(model.lm_head).__name__ != "Float8Linear"
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(4):
            opt.zero_grad()
            loss = losses.masked_cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:])
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    assert curves["fp8"][-1] < curves["fp8"][0] - 0.1
    for a, b in zip(curves["fp8"], curves["fp32"]):
        assert abs(a - b) <= 0.02 * b, curves
    assert curves["fp8"] != curves["fp32"]


def test_fp8_without_fp8_hardware_is_one_clear_error():
    model = ErnieForCausalLM(ModelConfig.from_name("tiny-dense"))
    with pytest.raises(fp8.Fp8Unavailable, match=r"capability >= 8\.9.*precision: bf16"):
        fp8.enable_fp8(model)


def test_fp8_recipe_on_this_machine_fails_naming_the_requirement(tmp_path, tok, tok_dir, small_corpus):
    from ernie45.train.recipe import TrainConfig
    from ernie45.train.trainer import Trainer
    from tests.train.conftest import tiny_model

    cfg = TrainConfig(task="pretrain", output_dir=str(tmp_path), model=tiny_model(), data=[small_corpus],
                      seq_len=32, batch_size=2, max_steps=1, precision="fp8", plot=False, tokenizer=tok_dir)
    with pytest.raises(fp8.Fp8Unavailable, match=r"CUDA compute capability >= 8\.9"):
        Trainer(cfg, tokenizer=tok)
