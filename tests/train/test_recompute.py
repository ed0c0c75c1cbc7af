"""Fine-grained recomputation: every choice gives the same loss and gradients as none, keeps the
parameter names, and measurably trades memory (AllocationMeter) in the expected order."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights
from ernie45.train import losses
from ernie45.train.recipe import TrainConfig
from ernie45.train.recompute import AllocationMeter, apply_recompute, parse_recompute, recomputed_modules

# attention and experts of similar size, a shared expert (mlp), a dense first layer
CFG = ModelConfig.from_name("tiny-moe").replace(hidden_size=128, num_attention_heads=4, head_dim=32,
                                                moe_intermediate_size=64)
CHOICES = ["none", "attention", "experts", "mlp", ["attention", "experts"], "full"]


def run(choice, b: int = 2, t: int = 128) -> tuple[float, dict[str, torch.Tensor], AllocationMeter, int]:
    model = init_weights(ErnieForCausalLM(CFG), std=0.05, seed=0).train()
    apply_recompute(model, choice)
    ids = torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    with AllocationMeter(exclude=params + list(model.buffers())) as meter:
        loss = losses.masked_cross_entropy(model(ids).logits, ids, reduction="sum")
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return float(loss.detach()), grads, meter, sum(p.numel() * 4 for p in {id(p): p for p in params}.values())


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple]:
    return {str(c): run(c) for c in CHOICES}


@pytest.mark.slow
def test_every_choice_gives_the_same_loss_and_gradients(runs):
    loss0, grads0, _, _ = runs["none"]
    for name, (loss, grads, _, _) in runs.items():
        assert loss == pytest.approx(loss0, rel=1e-6), name
        for n, g in grads.items():
            torch.testing.assert_close(g, grads0[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n, c=name: f"{c} {n}: {m}")


@pytest.mark.slow
def test_memory_falls_in_the_expected_order(runs):
    peak = {k: v[2].peak for k, v in runs.items()}
    for name, (_, _, meter, grad_bytes) in runs.items():
        assert meter.live == grad_bytes, name  # after backward only the gradients are left: the meter is exact
    both = str(["attention", "experts"])
    assert peak["none"] > peak["attention"] > peak[both] > peak["full"], peak
    assert peak["none"] > peak["experts"] > peak[both] and peak["none"] > peak["mlp"], peak
    assert peak["full"] < 0.8 * peak["none"], peak


def test_swaps_only_the_chosen_modules_and_keeps_names():
    model = init_weights(ErnieForCausalLM(CFG), std=0.05, seed=0)
    names = list(model.state_dict())
    apply_recompute(model, ["attention", "experts"])
    swapped = recomputed_modules(model)
    assert swapped == ["model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.1.mlp.experts",
                       "model.layers.2.self_attn", "model.layers.2.mlp.experts"]
    assert list(model.state_dict()) == names
    apply_recompute(model, ["attention"])  # applying again does not nest
    assert recomputed_modules(model) == swapped
    with torch.no_grad():  # eval / no-grad: plain forward
        model.eval()(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("value,match", [("bogus", "unknown choice"), (["none", "full"], "cannot be combined"),
                                         (["full", "attention"], "use it alone")])
def test_bad_choice_is_one_clear_error(value, match):
    with pytest.raises(ValueError, match=match):
        parse_recompute(value)
    with pytest.raises(ValueError, match=match):
        TrainConfig(data=["x"], model={"preset": "tiny-moe"}, tokenizer="t", recompute=value)


@pytest.mark.slow
def test_planner_predicts_the_measured_peak_of_each_choice(runs):
    """ernie45.tools.train_plan: saved activations (+ one recomputed module) + gradients, against the
    peak the meter measured, within -30% / +40% (the planner errs high for no recomputation: it adds every
    gradient to every activation and the head's gradient temporaries, which never all coexist)."""
    from ernie45.tools.train_plan import stage_activation_bytes

    for name, (_, _, meter, grad_bytes) in runs.items():
        choice = parse_recompute(eval(name) if name.startswith("[") else name)  # noqa: S307 - our own str(list)
        predicted = stage_activation_bytes(CFG, range(CFG.num_hidden_layers), 2 * 128, 4, choice) + grad_bytes
        assert 0.7 * meter.peak <= predicted <= 1.4 * meter.peak, (name, predicted, meter.peak)
