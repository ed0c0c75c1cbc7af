"""Tensor, expert and FSDP parallelism on 2 and 4 gloo processes against the single-process model.

One spawn per world size (process start-up dominates on 2 cores); each test reports one named check.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, save_model
from ernie45.model.checkpoint import build_empty
from tests.parallel import dist_checks as dc
from tests.parallel.launcher import assert_passed, run_checks

pytestmark = pytest.mark.multiprocess

# A checkpoint of a few hundred MB (bf16), MoE-heavy like the real models.
BIG = ModelConfig.from_name("tiny-moe").replace(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
    num_key_value_heads=4, head_dim=64, moe_num_experts=48, moe_k=4, moe_intermediate_size=512,
    moe_num_shared_experts=1, moe_layer_start_index=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parallel-ckpt")
    big = build_empty(BIG, torch.bfloat16)
    init_weights(big, std=0.05, seed=0)
    save_model(big, root / "big", max_shard_size="100MB")  # several shards, tensors split across files
    del big
    small = init_weights(ErnieForCausalLM(dc.EP_CONFIGS["moe-noshared-interval"]), std=0.1, seed=3)
    save_model(small, root / "small", max_shard_size="200KB")
    return {"big": str(root / "big"), "small": str(root / "small"), "dcp": str(root / "dcp"),
            "big_bytes": BIG.num_params() * 2}


@pytest.fixture(scope="module")
def two_ranks(checkpoints) -> dict:
    checks = [
        ("sharded_load_memory", functools.partial(dc.sharded_load_memory, path=checkpoints["big"],
                                                  full_bytes=checkpoints["big_bytes"])),
        ("tp2_logits", dc.tp2_logits),
        ("ep2_logits", dc.ep2_logits),
        ("shards_differ", dc.shards_differ),
        ("mesh_world_mismatch", dc.mesh_world_mismatch),
        ("ep2_training", dc.ep2_training),
        ("ep2_fsdp_training", dc.ep2_fsdp_training),
        ("dp2_fsdp_dense_training", dc.dp2_fsdp_dense_training),
        ("sharded_load_ep", functools.partial(dc.sharded_load_ep, path=checkpoints["small"])),
        ("engine_tp2", dc.engine_tp2),
        ("engine_ep2", dc.engine_ep2),
        ("dcp_save_ep2", functools.partial(dc.dcp_save_ep2, folder=checkpoints["dcp"])),
    ]
    return run_checks(checks, world=2)


@pytest.fixture(scope="module")
def four_ranks(checkpoints, two_ranks) -> dict:
    checks = [
        ("dcp_resume_dp2_ep2", functools.partial(dc.dcp_resume_dp2_ep2, folder=checkpoints["dcp"])),
        ("tp2_ep2_logits", dc.tp2_ep2_logits),
        ("dp2_ep2_training", dc.dp2_ep2_training),
        ("engine_tp2_ep2", dc.engine_tp2_ep2),
        ("sharded_load_ep", functools.partial(dc.sharded_load_ep, path=checkpoints["small"])),
    ]
    return run_checks(checks, world=4)


def test_sharded_load_peak_memory_is_the_local_share(two_ranks):
    assert_passed(two_ranks, "sharded_load_memory")


def test_tp2_logits_and_greedy_equal_single_process(two_ranks):
    assert_passed(two_ranks, "tp2_logits")


def test_ep2_logits_and_greedy_equal_single_process(two_ranks):
    assert_passed(two_ranks, "ep2_logits")


def test_shards_hold_only_their_slice(two_ranks):
    assert_passed(two_ranks, "shards_differ")


def test_world_size_mismatch_is_a_clear_error(two_ranks):
    assert_passed(two_ranks, "mesh_world_mismatch")


def test_ep2_training_equals_single_process(two_ranks):
    assert_passed(two_ranks, "ep2_training")


def test_ep2_fsdp_training_equals_single_process(two_ranks):
    assert_passed(two_ranks, "ep2_fsdp_training")


def test_dp2_fsdp_dense_training_equals_single_process(two_ranks):
    assert_passed(two_ranks, "dp2_fsdp_dense_training")


def test_sharded_load_ep_matches_parallelized_full_load(two_ranks):
    assert_passed(two_ranks, "sharded_load_ep")


def test_tp2_x_ep2_logits_and_greedy_equal_single_process(four_ranks):
    assert_passed(four_ranks, "tp2_ep2_logits")


def test_dp2_x_ep2_fsdp_training_equals_single_process(four_ranks):
    assert_passed(four_ranks, "dp2_ep2_training")


def test_sharded_load_tp2_x_ep2(four_ranks):
    assert_passed(four_ranks, "sharded_load_ep")


def test_engine_tp2_greedy_equals_single_process_engine(two_ranks):
    assert_passed(two_ranks, "engine_tp2")


def test_engine_ep2_greedy_equals_single_process_engine(two_ranks):
    assert_passed(two_ranks, "engine_ep2")


def test_engine_tp2_x_ep2_greedy_equals_single_process_engine(four_ranks):
    assert_passed(four_ranks, "engine_tp2_ep2")


def test_training_checkpoint_from_2_ranks_resumes_on_4(four_ranks, two_ranks):
    assert_passed(two_ranks, "dcp_save_ep2")
    assert_passed(four_ranks, "dcp_resume_dp2_ep2")


def test_training_checkpoint_exports_to_hf(two_ranks, checkpoints, tmp_path):
    from ernie45 import load_model
    from ernie45.parallel.dist_checkpoint import export_hf

    assert_passed(two_ranks, "dcp_save_ep2")
    export_hf(checkpoints["dcp"], str(tmp_path), dtype=torch.float32)
    got = load_model(tmp_path, dtype=torch.float32)
    _, want = dc._reference_training(dc.TINY_MOE, 2, 1e-2)
    for name, p in got.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
