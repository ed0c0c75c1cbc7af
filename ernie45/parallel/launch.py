"""Entry points for the CLI: run a verb on tp x ep processes under torchrun, or start torchrun itself.

``ernie45 serve MODEL --tp 2``: when the process was not started by torchrun, it re-runs the same
command under ``python -m torch.distributed.run --nproc-per-node tp*ep`` (same machine). Under torchrun
every rank loads only its shard (``sharded_load``); rank 0 serves HTTP with the engine, the other
ranks follow its steps (``worker_loop``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import resolve_model_path
from ernie45.parallel.mesh import ParallelConfig, default_device_type, init_distributed, init_mesh

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc: int, argv: list[str] | None = None, module: str | None = "ernie45.cli") -> int:
    """Run ``python -m module argv`` (default: this ``ernie45`` command line) on ``nproc`` local
    processes with torchrun; returns its exit code. ``module=None``: argv starts with its own ``-m``."""
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *(["-m", module] if module else []), *argv]
    log.info("starting %d ranks: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)


def load_parallel(model: str, sizes: ParallelConfig, dtype: str | torch.dtype = "bfloat16"):  # noqa: ANN201
    """Join the torchrun group, validate the mesh and load this rank's shard of ``model``."""
    from ernie45.parallel.sharded_load import sharded_load

    folder = resolve_model_path(model)
    config = ModelConfig.from_json(folder)
    sizes.validate(config, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group: a clear error
    device_type = default_device_type()
    init_distributed(device_type)
    mesh = init_mesh(sizes, config, device_type)
    device = f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"
    return folder, sharded_load(folder, mesh, dtype=dtype, device=device)


def serve_parallel(model: str, sizes: ParallelConfig, dtype: str = "bfloat16", **serve_kwargs: Any) -> int:
    """``ernie45 serve`` on tp x ep ranks (call under torchrun on every rank)."""
    from ernie45.parallel.runner import worker_loop

    folder, parallel_model = load_parallel(model, sizes, dtype)
    if dist.get_rank() == 0:
        from ernie45.serve.app import serve
        from ernie45.tokenizer import load_tokenizer

        serve_kwargs.setdefault("served_model_name", model)
        # When uvicorn returns (Ctrl-C / SIGTERM) the engine's runner releases the workers at exit.
        serve(parallel_model, tokenizer=load_tokenizer(folder), **serve_kwargs)
        return 0
    steps = worker_loop(parallel_model)
    log.info("rank %d: engine stopped after %d steps", dist.get_rank(), steps)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ernie45.parallel.launch MODEL --tp 2 [--ep 1] [--port 8000] ...``: serve on tp x ep
    ranks (the same as ``ernie45 serve MODEL --tp 2``); starts torchrun itself when needed."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ernie45.parallel.launch", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-memory", default=None)
    args = p.parse_args(argv)
    sizes = ParallelConfig(tp=args.tp, ep=args.ep)
    if not under_torchrun():
        sizes.validate(ModelConfig.from_json(resolve_model_path(args.model)))
        return relaunch_with_torchrun(sizes.world_size, ["-m", "ernie45.parallel.launch", *(argv or sys.argv[1:])],
                                      module=None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ["RANK"] + " %(name)s: %(message)s")
    return serve_parallel(args.model, sizes, dtype=args.dtype, host=args.host, port=args.port,
                          kv_cache_memory=args.kv_cache_memory)


if __name__ == "__main__":
    sys.exit(main())


def serve_cli(args: Any) -> int:
    """``ernie45 serve MODEL --tp N --ep M`` (the argparse namespace of that verb)."""
    sizes = ParallelConfig(tp=args.tp, ep=args.ep)
    if getattr(args, "quant", None):
        raise ValueError("--quant with --tp/--ep is not supported: serve the unquantized checkpoint over several ranks")
    if not under_torchrun():
        sizes.validate(ModelConfig.from_json(resolve_model_path(args.model)))
        return relaunch_with_torchrun(sizes.world_size)
    engine = {k: getattr(args, k, None) for k in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                                                   "max_model_len", "max_waiting", "block_size")}
    if getattr(args, "no_prefix_caching", False):
        engine["enable_prefix_caching"] = False
    return serve_parallel(args.model, sizes, dtype=args.dtype, host=args.host, port=args.port,
                          api_key=args.api_key or os.environ.get("ERNIE45_API_KEY"),
                          served_model_name=args.served_model_name or args.model,
                          max_body_bytes=args.max_body_bytes, **{k: v for k, v in engine.items() if v is not None})
