"""Starting ranks: run a command under torchrun, or join the torchrun group and load this rank's shard.

The verbs that run on several ranks keep their own glue (``ernie45.serve.launch``, ``ernie45.train.cli``);
this module is what they share.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import resolve_model_path
from ernie45.parallel.mesh import ParallelConfig, default_device_type, init_distributed, init_mesh

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, module: str | None, argv: list[str] | None = None) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node nproc -m module argv`` (argv defaults
    to this process's arguments). ``module=None``: argv starts with its own ``-m``."""
    argv = sys.argv[1:] if argv is None else argv
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *(["-m", module] if module else []), *argv]


def relaunch_with_torchrun(nproc: int, module: str | None, argv: list[str] | None = None) -> NoReturn:
    """Replace this process with torchrun running ``torchrun_command(nproc, module, argv)`` on this machine.

    The command keeps its pid, so the SIGTERM that systemd, docker or Kubernetes sends (or a SIGINT) reaches
    torchrun itself, which stops every rank (SIGTERM, then SIGKILL after its timeout) before it exits with
    their status. A launcher that waited on a child instead would die alone and leave the ranks serving.
    """
    cmd = torchrun_command(nproc, module, argv)
    log.info("starting %d ranks: %s", nproc, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def load_parallel(model: str, sizes: ParallelConfig, dtype: str | torch.dtype = "bfloat16"):  # noqa: ANN201
    """Join the torchrun group, validate the mesh and load this rank's shard of ``model``; returns
    (checkpoint folder, model)."""
    from ernie45.parallel.sharded_load import sharded_load

    folder = resolve_model_path(model)
    config = ModelConfig.from_json(folder)
    sizes.validate(config, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group: a clear error
    device_type = default_device_type()
    init_distributed(device_type)
    mesh = init_mesh(sizes, config, device_type)
    device = f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"
    return folder, sharded_load(folder, mesh, dtype=dtype, device=device)
