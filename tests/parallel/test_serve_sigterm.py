"""`ernie45 serve MODEL --tp 2` stops every rank on SIGTERM (what systemd, docker and Kubernetes send).

The command re-runs itself under torchrun; it used to wait on torchrun as a child, so a SIGTERM killed only
the launcher and left torchrun and both ranks serving on the port. Now the command becomes torchrun (exec),
and torchrun stops its ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from ernie45 import ErnieForCausalLM, init_weights, save_model
from tests.parallel import dist_checks as dc
from tests.parallel.launcher import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_S, STOP_S = 120, 60  # bounds: start-up of 2 ranks on 2 shared cores; torchrun's own kill timeout is 30 s


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every live process on the machine (from /proc)."""
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            tree.setdefault(int(fields[1]), []).append(int(d))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_to_serve_tp2_stops_every_rank_and_frees_the_port(tmp_path):
    save_model(init_weights(ErnieForCausalLM(dc.TP_CONFIGS["moe-kv1-tied"]), std=0.1, seed=11), tmp_path)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ernie45.cli", "serve", str(tmp_path), "--tp", "2", "--port", str(port), "--dtype",
         "float32", "--kv-cache-memory", "4MB"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        ranks = [p for p in _descendants(proc.pid) if _rank_of(p) is not None]
        assert sorted(_rank_of(p) for p in ranks) == [0, 1], "expected two rank processes under the command"
        proc.send_signal(signal.SIGTERM)  # the command's own pid, as a process manager does
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command did not exit within {STOP_S} s of SIGTERM")
        deadline = time.monotonic() + 10  # torchrun waits for its ranks; allow init a moment to reap them
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in ranks if _alive(p)]
        assert not left, f"rank processes {left} still running after SIGTERM"
        groups = [pg for pg in {proc.pid, *ranks} if _any_in_group(pg)]
        assert not groups, f"process groups {groups} still have members"
        assert _port_free(port), f"port {port} is still taken"
    finally:
        for p in [proc.pid, *ranks]:  # never leave a server behind, whatever failed above
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=STOP_S)


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\x00") if b"=" in kv)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env and b"LOCAL_RANK" in env else None


def _any_in_group(pgid: int) -> bool:
    """A live (non-zombie) process whose process group is ``pgid``."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False
