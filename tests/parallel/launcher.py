"""Run a function on N gloo ranks (torch.multiprocessing.spawn, free MASTER_PORT) and collect what each
rank returns. A check that fails on a rank is reported with its traceback, not lost in a child."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, checks: list[tuple[str, Callable]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # 2 cores shared by all ranks
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for name, fn in checks:
        try:
            fn(rank, world)
            results[name] = {"ok": True, "msg": ""}
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = {"ok": False, "msg": traceback.format_exc()}
        with open(path, "w") as f:  # after every check: a later hang does not lose earlier results
            json.dump(results, f)
        try:
            dist.barrier()
        except RuntimeError:  # a rank died or is stuck in a collective: the rest cannot run
            results[name]["msg"] += "\n(ranks out of step after this check; later checks skipped)"
            with open(path, "w") as f:
                json.dump(results, f)
            return
    dist.destroy_process_group()


def run_checks(checks: list[tuple[str, Callable]], world: int) -> dict[str, dict[int, dict]]:
    """Run every (name, fn(rank, world)) in order on ``world`` ranks; {name: {rank: {ok, msg}}}."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, free_port(), checks, out), nprocs=world, join=True)
        per_rank = {}
        for r in range(world):
            path = os.path.join(out, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    per_rank[r] = json.load(f)
            else:
                per_rank[r] = {}
    return {name: {r: per_rank[r].get(name, {"ok": False, "msg": "not run"}) for r in per_rank}
            for name, _ in checks}


def assert_passed(results: dict[str, dict[int, dict]], name: str) -> None:
    failed = {r: v["msg"] for r, v in results[name].items() if not v["ok"]}
    assert not failed, "\n".join(f"rank {r}:\n{msg}" for r, msg in failed.items())
