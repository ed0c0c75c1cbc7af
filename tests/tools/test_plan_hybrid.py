"""The hybrid-placement planner (ernie45.tools.hybrid) against hand arithmetic and the memory planner."""

from __future__ import annotations

import pytest

from ernie45.cli import main
from ernie45.config import ModelConfig
from ernie45.tools.formats import parse_weight_format
from ernie45.tools.hybrid import (
    PlacementPlanError,
    estimate_placements,
    parse_bandwidth,
    recommend_placement,
)
from ernie45.tools.plan import GPU_CONTEXT_BYTES, plan_memory
from ernie45.tools.weights import weight_bytes

BIG = "ernie-4.5-300b-a47b"


def test_small_config_by_hand():
    cfg = ModelConfig.from_name("tiny-moe")  # MoE layers 1 and 2: E=8, k=2, H=64, I=32
    plan = estimate_placements(cfg, weights="bf16", context=64, gpu="h100", ram="1GB", host_bandwidth="50GB/s")
    per_layer = 8 * (2 * 32 * 64 + 64 * 32) * 2  # gate_up [8, 64, 64] + down [8, 64, 32], bf16
    wb = weight_bytes(cfg, parse_weight_format("bf16"))
    rest = wb.total_bytes - 2 * per_layer
    assert wb.by_kind["experts"] == 2 * per_layer
    assert [p.gpu_expert_bytes for p in plan.placements] == [0, per_layer, 2 * per_layer]
    assert [p.host_expert_bytes for p in plan.placements] == [2 * per_layer, per_layer, 0]
    assert [p.gpu_weights_bytes for p in plan.placements] == [rest, rest + per_layer, rest + 2 * per_layer]
    cpu = plan.by_n(0)
    assert cpu.host_read_bytes_per_token == 2 * per_layer * 2 // 8  # top-2 of 8 experts, both MoE layers
    embed = cfg.vocab_size * cfg.hidden_size * 2
    kv_read = cfg.kv_bytes_per_token(2) * 64
    assert cpu.gpu_read_bytes_per_token == rest - embed + cfg.hidden_size * 2 + kv_read
    assert cpu.tok_s_batch1 == pytest.approx(1 / (cpu.gpu_read_bytes_per_token / 3.35e12 + per_layer / 2 / 50e9))
    gpu = plan.by_n(2)
    assert gpu.host_read_bytes_per_token == 0 and gpu.pinned_bytes == 0 and gpu.host_load_peak_bytes == 0
    assert gpu.gpu_bytes == rest + 2 * per_layer + gpu.kv_cache_bytes + gpu.activation_bytes + GPU_CONTEXT_BYTES
    assert cpu.pinned_bytes == 64 * (2 * 64 * 2 + 2 * (8 + 2))  # one 64-token step: x, y, ids, weights


def test_300b_int2_all_on_h200_matches_memory_planner():
    plan = estimate_placements(BIG, weights="int2", gpu="h200", ram="128GB")
    best = recommend_placement(plan, "auto")
    mem = plan_memory(BIG, weights="int2")
    assert best.gpu_experts == best.moe_layers and best.name == "all on GPU"
    assert best.gpu_weights_bytes == mem.weights_bytes
    assert abs(best.gpu_bytes - mem.total_bytes) <= 0.03 * mem.total_bytes
    # every placement holds the same weights in all, split between the two sides
    assert {p.gpu_weights_bytes + p.host_expert_bytes for p in plan.placements} == {mem.weights_bytes}
    # roofline at batch 1 on the H200: all active bytes over 4.8 TB/s
    assert best.tok_s_batch1 == pytest.approx(4.8e12 / best.gpu_read_bytes_per_token)
    assert plan.by_n(0).tok_s_batch1 < best.tok_s_batch1


def test_auto_picks_largest_n_that_fits_a_48gb_gpu():
    plan = estimate_placements(BIG, weights="int2", gpu="48GB", gpu_bandwidth="1TB/s", ram="128GB")
    best = recommend_placement(plan)
    n = best.gpu_experts
    assert 0 < n < best.moe_layers
    assert plan.by_n(n).gpu_bytes <= plan.gpu_usable_bytes < plan.by_n(n + 1).gpu_bytes
    assert plan.by_n(n).tok_s_batch1 > plan.by_n(0).tok_s_batch1  # each GPU layer moves bytes to the faster side


def test_refusals_are_clear():
    plan = estimate_placements(BIG, weights="int2", gpu="24GB", gpu_bandwidth="1TB/s", ram="32GB")
    with pytest.raises(PlacementPlanError, match="no placement fits.*host RAM needs"):
        recommend_placement(plan)
    plan = estimate_placements(BIG, weights="int2", gpu="24GB", gpu_bandwidth="1TB/s", ram="256GB")
    with pytest.raises(PlacementPlanError, match="all on GPU does not fit: the GPU part needs"):
        recommend_placement(plan, "gpu")
    with pytest.raises(PlacementPlanError, match="exceeds the model's 51 MoE layers"):
        recommend_placement(plan, 60)
    with pytest.raises(PlacementPlanError, match="placement='host'"):
        recommend_placement(plan, "host")
    with pytest.raises(PlacementPlanError, match="no HBM bandwidth known"):
        estimate_placements(BIG, weights="int2", gpu="24GB")
    with pytest.raises(PlacementPlanError, match="dense model"):
        estimate_placements("tiny-dense", gpu="h100")
    with pytest.raises(PlacementPlanError, match="'fast'"):
        parse_bandwidth("fast")
    assert parse_bandwidth("60GB/s") == 60e9 and parse_bandwidth("4.8TB/s") == 4.8e12


def test_cli(capsys):
    assert main(["plan", BIG, "--weights", "int2", "--gpu", "H200", "--ram", "128GB", "--placement", "auto"]) == 0
    out = capsys.readouterr().out
    assert "recommended: all on GPU" in out and "experts_on=cpu" in out
    assert main(["plan", BIG, "--weights", "int2", "--gpu", "24GB", "--gpu-bandwidth", "1TB/s", "--ram", "32GB"]) == 2
    assert "no placement fits" in capsys.readouterr().err


def test_300b_wint2_weights_are_the_readme_figure():
    """Baidu's WINT2 layout: 93.8 GB of weights (README, the memory planner's figure), all of it on the H200."""
    plan = estimate_placements(BIG, weights="wint2", gpu="h200", ram="128GB")
    best = recommend_placement(plan)
    assert best.name == "all on GPU"
    assert best.gpu_weights_bytes == pytest.approx(93.8e9, rel=1e-3)
    assert best.gpu_weights_bytes == plan_memory(BIG, weights="wint2").weights_bytes
