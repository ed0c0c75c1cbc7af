"""The device mesh: how many ranks replicate the data (dp), split the experts (ep) and split the
tensors (tp), validated against the model before any process group is touched.

Layout: world = dp x ep x tp, ``tp`` innermost (the ranks of one tensor-parallel group are neighbours,
so on GPUs they sit on one node and use NVLink), then ``ep``, then ``dp``. In inference every rank sees
the same tokens; in training the dp x ep ranks each take their own slice of the batch (the expert-
parallel ranks double as data-parallel ranks for the non-expert weights, as in DeepSpeed-MoE and
torchtitan), and the tp ranks of one group share a slice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ernie45.config import ModelConfig

log = logging.getLogger(__name__)

DIMS = ("dp", "ep", "tp")


class MeshError(ValueError):
    """A parallel layout that cannot hold this model or does not match the launched processes."""


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the three mesh dimensions; their product is the number of processes."""

    dp: int = 1
    """Data-parallel replicas (training: each takes its own slice of the batch)."""
    ep: int = 1
    """Expert-parallel ranks: each holds moe_num_experts / ep routed experts of every MoE layer."""
    tp: int = 1
    """Tensor-parallel ranks: attention heads, MLP widths, expert widths and the vocabulary are split."""

    def __post_init__(self) -> None:
        for name in DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MeshError(f"{name}={value!r} must be a positive integer (1 = not split)")

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp

    def validate(self, config: ModelConfig | None = None, world_size: int | None = None) -> None:
        """Raise MeshError naming the size, the model field and the fix when the layout is impossible."""
        if world_size is not None and world_size != self.world_size:
            raise MeshError(
                f"world size {world_size} != dp({self.dp}) x ep({self.ep}) x tp({self.tp}) = {self.world_size}; "
                f"launch {self.world_size} processes (torchrun --nproc-per-node {self.world_size}) or change the sizes"
            )
        if config is None:
            return
        tp, ep = self.tp, self.ep
        if config.num_attention_heads % tp:
            heads = config.num_attention_heads
            raise MeshError(f"tp={tp} does not divide num_attention_heads={heads}: every rank needs whole "
                            f"query heads; choose tp among {_divisors(heads)}")
        kv = config.num_key_value_heads
        if kv % tp and tp % kv:
            raise MeshError(f"num_key_value_heads={kv} cannot be spread over tp={tp} ranks: tp must divide the kv "
                            f"heads (split) or be a multiple of them (each kv head replicated on tp/{kv} ranks)")
        widths = []
        if config.has_dense_layers or config.num_nextn_predict_layers:
            widths.append(("intermediate_size", config.intermediate_size))
        if config.is_moe:
            widths.append(("moe_intermediate_size", config.moe_intermediate_size))
        for name, width in widths:
            if width % tp:
                raise MeshError(f"tp={tp} does not divide {name}={width}; choose tp among {_divisors(width)}")
        if ep > 1:
            if not config.is_moe:
                raise MeshError(f"ep={ep} needs a Mixture-of-Experts model; this {config.model_type} model has no "
                                "experts (use tp or dp instead)")
            e = config.moe_num_experts
            if e % ep:
                raise MeshError(f"{e} experts cannot be split evenly over ep={ep} ranks; choose ep among "
                                f"{_divisors(e)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:12]


class ParallelMesh:
    """A validated ``DeviceMesh`` with dims ("dp", "ep", "tp") and the groups the parallel modules use."""

    def __init__(self, device_mesh: DeviceMesh, sizes: ParallelConfig) -> None:
        self.device_mesh = device_mesh
        self.sizes = sizes
        self._data_mesh: DeviceMesh | None = None

    @property
    def tp(self) -> int:
        return self.sizes.tp

    @property
    def ep(self) -> int:
        return self.sizes.ep

    @property
    def dp(self) -> int:
        return self.sizes.dp

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.device_mesh.get_group(dim)

    def local_rank(self, dim: str) -> int:
        """This process's coordinate along ``dim``."""
        return self.device_mesh.get_local_rank(dim)

    def submesh(self, dim: str) -> DeviceMesh:
        return self.device_mesh[dim]

    def data_mesh(self) -> DeviceMesh:
        """The dp x ep ranks flattened into one dim: the ranks that see different training data."""
        if self._data_mesh is None:  # flatten once: the name may be registered only once per mesh
            self._data_mesh = self.device_mesh["dp", "ep"]._flatten("dp_ep")
        return self._data_mesh

    @property
    def device_type(self) -> str:
        return self.device_mesh.device_type

    def __repr__(self) -> str:
        return f"ParallelMesh(dp={self.dp}, ep={self.ep}, tp={self.tp}, rank={dist.get_rank()})"


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device_type: str | None = None) -> None:
    """Join the process group torchrun (or a test launcher) describes in the environment.

    NCCL on GPUs, gloo on CPUs. A no-op when the group already exists.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MeshError(f"torch.distributed is not initialised and {missing} are not set; launch with "
                        f"`torchrun --nproc-per-node N ...`")
    device_type = device_type or default_device_type()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def init_mesh(sizes: ParallelConfig, config: ModelConfig | None = None, device_type: str | None = None
              ) -> ParallelMesh:
    """Validate ``sizes`` against the model and the launched processes, then build the DeviceMesh.

    The process group must exist (``init_distributed``); every rank calls this with the same sizes.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    sizes.validate(config, world)
    if not dist.is_initialized():
        if sizes.world_size == 1:
            raise MeshError("a 1-process mesh needs no parallelism; use the model as it is, or launch with torchrun")
        raise MeshError("torch.distributed is not initialised; call init_distributed() first (under torchrun)")
    device_type = device_type or default_device_type()
    dm = init_device_mesh(device_type, (sizes.dp, sizes.ep, sizes.tp), mesh_dim_names=DIMS)
    log.info("mesh dp=%d ep=%d tp=%d on %s", sizes.dp, sizes.ep, sizes.tp, device_type)
    return ParallelMesh(dm, sizes)
