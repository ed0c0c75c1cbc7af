"""``ernie45 serve MODEL --tp 2 --ep 1``: the server on tp x ep ranks under torchrun.

When the command was not started by torchrun, it replaces itself with torchrun running the same command
line (``ernie45.parallel.launch.relaunch_with_torchrun``; a SIGTERM to the command then stops every rank).
Under torchrun every rank loads only its shard (``load_parallel``); rank 0 serves HTTP with the engine on a
``DistributedModelRunner``, the other ranks follow its steps (``worker_loop``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch.distributed as dist

from ernie45.config import ModelConfig
from ernie45.model.checkpoint import resolve_model_path
from ernie45.parallel.launch import load_parallel, relaunch_with_torchrun, under_torchrun
from ernie45.parallel.mesh import ParallelConfig

log = logging.getLogger(__name__)


def serve_parallel(model: str, sizes: ParallelConfig, dtype: str = "bfloat16", **serve_kwargs: Any) -> int:
    """``ernie45 serve`` on tp x ep ranks (call under torchrun on every rank)."""
    from ernie45.parallel.runner import DistributedModelRunner, worker_loop

    folder, parallel_model = load_parallel(model, sizes, dtype)
    if dist.get_rank() == 0:
        from ernie45.serve.app import serve
        from ernie45.tokenizer import load_tokenizer

        serve_kwargs.setdefault("served_model_name", model)
        # When uvicorn returns (Ctrl-C / SIGTERM) the engine's runner releases the workers at exit.
        serve(parallel_model, tokenizer=load_tokenizer(folder), runner=DistributedModelRunner, **serve_kwargs)
        return 0
    steps = worker_loop(parallel_model)
    log.info("rank %d: engine stopped after %d steps", dist.get_rank(), steps)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ernie45.serve.launch MODEL --tp 2 [--ep 1] [--port 8000] ...``: serve on tp x ep
    ranks (the same as ``ernie45 serve MODEL --tp 2``); starts torchrun itself when needed."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ernie45.serve.launch", description=main.__doc__)
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
        relaunch_with_torchrun(sizes.world_size, "ernie45.serve.launch", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ["RANK"] + " %(name)s: %(message)s")
    return serve_parallel(args.model, sizes, dtype=args.dtype, host=args.host, port=args.port,
                          kv_cache_memory=args.kv_cache_memory)


def serve_cli(args: Any) -> int:
    """``ernie45 serve MODEL --tp N --ep M`` (the argparse namespace of that verb)."""
    sizes = ParallelConfig(tp=args.tp, ep=args.ep)
    if getattr(args, "quant", None):
        raise ValueError("--quant with --tp/--ep is not supported: serve the unquantized checkpoint over several ranks")
    if not under_torchrun():
        sizes.validate(ModelConfig.from_json(resolve_model_path(args.model)))
        relaunch_with_torchrun(sizes.world_size, "ernie45.cli")  # the `ernie45 serve ...` command line again
    engine = {k: getattr(args, k, None) for k in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                                                   "max_model_len", "max_waiting", "block_size")}
    if getattr(args, "no_prefix_caching", False):
        engine["enable_prefix_caching"] = False
    return serve_parallel(args.model, sizes, dtype=args.dtype, host=args.host, port=args.port,
                          api_key=args.api_key or os.environ.get("ERNIE45_API_KEY"),
                          served_model_name=args.served_model_name or args.model,
                          max_body_bytes=args.max_body_bytes, **{k: v for k, v in engine.items() if v is not None})


if __name__ == "__main__":
    sys.exit(main())
