"""Every impossible layout is a MeshError naming the sizes, the model field and the fix (no process group)."""

from __future__ import annotations

import pytest
import torch

from ernie45 import ModelConfig
from ernie45.parallel import MeshError, ParallelConfig, init_mesh
from ernie45.parallel.shard import ShardSpec

BIG = ModelConfig.from_name("ernie-4.5-300b-a47b")
MID = ModelConfig.from_name("ernie-4.5-21b-a3b")
DENSE = ModelConfig.from_name("ernie-4.5-0.3b")


@pytest.mark.parametrize("sizes, config, world, message", [
    (ParallelConfig(ep=7), BIG, 7, r"64 experts cannot be split evenly over ep=7 ranks; choose ep among \[1, 2, 4, 8"),
    (ParallelConfig(tp=3), MID.replace(num_attention_heads=24, moe_intermediate_size=1539,
                                       intermediate_size=12288), 3,
     r"num_key_value_heads=4 cannot be spread over tp=3 ranks"),
    (ParallelConfig(tp=2), BIG, 4, r"world size 4 != dp\(1\) x ep\(1\) x tp\(2\) = 2; launch 2 processes"),
    (ParallelConfig(tp=3), DENSE, 3, r"tp=3 does not divide num_attention_heads=16"),
    (ParallelConfig(tp=8), MID, 8, r"tp=8 does not divide num_attention_heads=20"),
    (ParallelConfig(ep=2), DENSE, 2, r"ep=2 needs a Mixture-of-Experts model"),
    (ParallelConfig(tp=2), MID.replace(moe_intermediate_size=1535), 2, r"tp=2 does not divide moe_intermediate_size"),
    (ParallelConfig(tp=4), DENSE.replace(intermediate_size=3070), 4, r"tp=4 does not divide intermediate_size=3070"),
])
def test_impossible_meshes_are_clear_errors(sizes, config, world, message):
    with pytest.raises(MeshError, match=message):
        sizes.validate(config, world)


@pytest.mark.parametrize("field, value", [("tp", 0), ("ep", -1), ("dp", 1.5), ("tp", True)])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(MeshError, match=f"{field}={value!r} must be a positive integer"):
        ParallelConfig(**{field: value})


def test_possible_meshes_pass():
    ParallelConfig(tp=8, ep=8).validate(BIG, 64)  # 8 kv heads split, 64 experts over 8
    ParallelConfig(tp=16).validate(BIG.replace(num_attention_heads=64), 16)  # 8 kv heads replicated x2
    ParallelConfig(tp=4, ep=4, dp=2).validate(MID, 32)  # 4 kv heads, 64 experts


def test_init_mesh_without_launcher_is_a_clear_error():
    # No process group: this process is a world of one, so a 2-rank mesh is a world-size error.
    with pytest.raises(MeshError, match=r"world size 1 != dp\(1\) x ep\(1\) x tp\(2\) = 2; launch 2 processes"):
        init_mesh(ParallelConfig(tp=2), BIG)
    with pytest.raises(MeshError, match="1-process mesh needs no parallelism"):
        init_mesh(ParallelConfig(), BIG)


def test_shard_spec_halves_take_the_same_rows_of_gate_and_up():
    full = torch.arange(2 * 8 * 3).reshape(2, 8, 3)  # [E, 2I, H], I = 4
    spec = ShardSpec.split((2, 8, 3), 0, 1, 2).then(1, 1, 2, halves=True)
    assert spec.local_shape == (1, 4, 3)
    torch.testing.assert_close(spec.take(full), torch.cat([full[1:, 2:4], full[1:, 6:8]], dim=1))


@pytest.mark.parametrize("ep, fsdp, message", [
    (3, 1, "8 experts cannot be split evenly over ep=3"),
    (2, 3, "--ep 2 does not divide --fsdp 3"),
    (0, 2, "--ep 0 --fsdp 2: both must be >= 1"),
    (2, 8, "batch_size=4 must be divisible by the 8 data ranks"),
])
def test_train_layout_errors_before_launch(ep, fsdp, message):
    from ernie45.train.distributed import check_layout
    from ernie45.train.recipe import TrainConfig

    cfg = TrainConfig(data=["x"], model={"preset": "tiny-moe"}, tokenizer="t", batch_size=4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_layout(cfg, ep, fsdp)
    assert check_layout(cfg, 2, 4) == 4
