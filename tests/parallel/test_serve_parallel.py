"""`ernie45 serve` on 2 ranks under torchrun: the OpenAI endpoint returns the single-process engine's
greedy tokens, and stopping the server releases the worker rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ernie45 import LLM, ErnieForCausalLM, SamplingParams, init_weights, save_model
from tests.parallel import dist_checks as dc
from tests.parallel.launcher import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_tp2_under_torchrun_matches_single_process(tmp_path):
    cfg = dc.TP_CONFIGS["moe-kv1-tied"]
    save_model(init_weights(ErnieForCausalLM(cfg), std=0.1, seed=11), tmp_path)
    prompt = dc.ids_for(cfg, b=1, t=9, seed=2)[0].tolist()
    want = LLM(str(tmp_path), dtype="float32", kv_cache_memory="4MB").generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "ernie45.serve.launch", str(tmp_path), "--tp", "2", "--port", str(port), "--dtype", "float32",
         "--kv-cache-memory", "4MB"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": str(tmp_path), "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert [int(t.removeprefix("token_id:")) for t in tokens] == want
    finally:
        # Ctrl-C on the serving rank: uvicorn shuts down, the engine releases the worker at exit, and
        # torchrun sees both ranks finish (a signal to torchrun itself would SIGTERM every rank at once).
        rank0 = _rank0_pid(proc.pid)
        if rank0 is not None:
            os.kill(rank0, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:  # pragma: no cover - reported below
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail("torchrun did not exit after SIGINT:\n" + out[-3000:])
    assert "engine stopped after" in out, out[-3000:]



def _rank0_pid(torchrun_pid: int) -> int | None:
    """The child of torchrun whose environment says RANK=0."""
    try:
        with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"RANK=0" in f.read().split(b"\x00"):
                    return pid
        except OSError:
            continue
    return None
