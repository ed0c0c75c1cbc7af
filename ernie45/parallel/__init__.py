"""Multi-process ERNIE 4.5 with torch.distributed: tensor, expert and fully-sharded data parallelism.

Applied from outside to a built model (the model files do not change)::

    init_distributed()                                   # under torchrun: NCCL on GPUs, gloo on CPUs
    mesh = init_mesh(ParallelConfig(tp=2, ep=2), model.config)
    parallelize(model, mesh)                             # or sharded_load(path, mesh) to read slices only
"""

from __future__ import annotations

from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel.expert_parallel import TokenLayout, apply_ep
from ernie45.parallel.mesh import MeshError, ParallelConfig, ParallelMesh, init_distributed, init_mesh
from ernie45.parallel.tensor_parallel import apply_tp, local_kv_heads

__all__ = [
    "MeshError", "ParallelConfig", "ParallelMesh", "apply_ep", "apply_tp", "init_distributed", "init_mesh",
    "local_kv_heads", "parallelize",
]


def parallelize(model: ErnieForCausalLM, mesh: ParallelMesh, tokens: TokenLayout = "replicated"
                ) -> ErnieForCausalLM:
    """Apply tp then ep to ``model`` in place for this rank of ``mesh``; returns the model.

    tokens: "replicated" for inference (all ranks run the same tokens), "sharded" for training
    (each dp x ep rank runs its own micro-batch; tp must then be 1).
    """
    mesh.sizes.validate(model.config)
    if tokens == "sharded" and mesh.tp > 1:
        raise MeshError("training with tp > 1 is not supported; use ep and fsdp (dp) for training")
    tp_rank = mesh.local_rank("tp")
    apply_tp(model, tp_rank, mesh.tp, mesh.group("tp"))
    if model.config.is_moe:
        apply_ep(model, mesh.local_rank("ep"), mesh.ep, mesh.group("ep"), tp_rank, mesh.tp, mesh.group("tp"),
                 tokens=tokens)
    model.parallel_mesh = mesh  # the multi-rank runner and trainer read the layout from here
    return model
