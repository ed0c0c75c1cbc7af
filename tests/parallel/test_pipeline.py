"""Pipeline parallelism (torch.distributed.pipelining) on 2 and 4 gloo processes against one process on
the same global batch: losses, first-step gradients, parameters after AdamW, MoE balancing per stage,
stage-sharded HF loading and a checkpoint that resumes on another layout."""

from __future__ import annotations

import functools

import pytest
import torch

from ernie45 import save_model
from ernie45.parallel.mesh import MeshError
from ernie45.parallel.pipeline import PipelineConfig, layer_costs, split_layers
from tests.parallel import pipeline_checks as pc
from tests.parallel.dist_checks import build
from tests.parallel.launcher import assert_passed, run_checks


# ------------------------------------------------------------------------------------- bookkeeping
def test_split_balances_parameters_with_embeddings_on_the_ends():
    import itertools

    cfg = pc.PP_MOE.replace(num_hidden_layers=8, vocab_size=4096)
    costs, ends = layer_costs(cfg), cfg.vocab_size * cfg.hidden_size

    def worst(bounds: list[range], costs: list[float], ends: float) -> float:
        return max(sum(costs[i] for i in r) + ends * ((k == 0) + (k == len(bounds) - 1)) for k, r in enumerate(bounds))

    measured = [1.0, 1.0, 1.0, 1.0, 1.0, 20.0, 1.0, 1.0]  # seconds: ends scaled by the parameter share
    for c, e, given in ((costs, ends, None), (measured, ends * sum(measured) / sum(costs), measured)):
        for stages in (2, 3):  # the optimum of every contiguous split (brute force)
            bounds = split_layers(cfg, stages, given)
            assert bounds[0].start == 0 and bounds[-1].stop == 8 and all(len(r) for r in bounds)
            splits = [[range(a, b) for a, b in zip((0, *cut), (*cut, 8))]
                      for cut in itertools.combinations(range(1, 8), stages - 1)]
            assert worst(bounds, c, e) == pytest.approx(min(worst(b, c, e) for b in splits))
    # a heavy vocabulary pushes layers off the end stages
    heavy = cfg.replace(vocab_size=60000)
    b4 = split_layers(heavy, 4)
    assert len(b4[0]) == len(b4[-1]) == 1 and sum(len(r) for r in b4[1:-1]) == 6, b4
    assert sum(layer_costs(cfg)) > 0


def test_schedule_config_errors_name_the_fix():
    with pytest.raises(MeshError, match="microbatches=1 < pp=2"):
        PipelineConfig(pp=2, microbatches=1)
    with pytest.raises(MeshError, match="virtual >= 2"):
        PipelineConfig(pp=2, schedule="interleaved-1f1b")
    with pytest.raises(MeshError, match="schedule='x'"):
        PipelineConfig(schedule="x")
    with pytest.raises(MeshError, match="at least one decoder layer"):
        split_layers(pc.PP_MOE, 5)
    assert PipelineConfig(pp=2, microbatches=6).bubble_theory() == pytest.approx(1 / 7)
    assert PipelineConfig(pp=2, microbatches=4, schedule="zbv").stage_ids(0) == [0, 3]
    assert PipelineConfig(pp=2, microbatches=4, schedule="interleaved-1f1b", virtual=2).stage_ids(1) == [1, 3]


# ------------------------------------------------------------------------------------- multiprocess
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pp")
    save_model(build(pc.PP_MOE), root / "hf", max_shard_size="100KB")
    return {"hf": str(root / "hf"), "dcp": str(root / "dcp")}


@pytest.fixture(scope="module")
def two_ranks(folders) -> dict:
    return run_checks([
        ("pp2_1f1b", pc.pp2_1f1b),
        ("pp2_balancing", pc.pp2_balancing),
        ("pp2_interleaved", pc.pp2_interleaved),
        ("pp2_zero_bubble", pc.pp2_zero_bubble),
        ("pp2_stage_load", functools.partial(pc.pp2_stage_load, path=folders["hf"])),
        ("pp2_save", functools.partial(pc.pp2_save, folder=folders["dcp"])),
        ("pp2_memory", pc.pp2_memory),
    ], world=2)


@pytest.fixture(scope="module")
def four_ranks(folders, two_ranks) -> dict:
    return run_checks([
        ("pp2_ep2_fsdp", pc.pp2_ep2_fsdp),
        ("pp2_ep2_resume", functools.partial(pc.pp2_ep2_resume, folder=folders["dcp"])),
    ], world=4)


@pytest.mark.multiprocess
def test_pp2_1f1b_equals_single_process(two_ranks):
    assert_passed(two_ranks, "pp2_1f1b")


@pytest.mark.multiprocess
def test_pp2_router_balancing_per_stage(two_ranks):
    assert_passed(two_ranks, "pp2_balancing")


@pytest.mark.multiprocess
def test_pp2_interleaved_1f1b_equals_single_process(two_ranks):
    assert_passed(two_ranks, "pp2_interleaved")


@pytest.mark.multiprocess
def test_pp2_zero_bubble_v_equals_single_process(two_ranks):
    assert_passed(two_ranks, "pp2_zero_bubble")


@pytest.mark.multiprocess
def test_pp2_stage_reads_only_its_layers_from_hf(two_ranks):
    assert_passed(two_ranks, "pp2_stage_load")


@pytest.mark.multiprocess
def test_pp2_peak_memory_per_rank_as_planned(two_ranks):
    assert_passed(two_ranks, "pp2_memory")


@pytest.mark.multiprocess
def test_pp2_x_ep2_fsdp_equals_single_process(four_ranks):
    assert_passed(four_ranks, "pp2_ep2_fsdp")


@pytest.mark.multiprocess
def test_pp2_checkpoint_resumes_on_pp2_x_ep2(two_ranks, four_ranks):
    assert_passed(two_ranks, "pp2_save")
    assert_passed(four_ranks, "pp2_ep2_resume")


@pytest.mark.multiprocess
def test_pp2_checkpoint_exports_the_full_model(two_ranks, folders):
    from ernie45.parallel.dist_checkpoint import load_full_model

    assert_passed(two_ranks, "pp2_save")
    got = load_full_model(folders["dcp"])
    _, _, want = pc.reference(2, 2)
    for name, p in got.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
