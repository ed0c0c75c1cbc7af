"""The README's install (`pip install torch==2.13.0 -e .`) is enough for the verbs it documents.

The suite itself runs with the test extras (transformers, openai, httpx, ...), so an import of one of those from
`ernie45 serve` or `ernie45 train` would pass every other test. Here the verbs run in a fresh interpreter whose
imports are limited to what the default install brings: the standard library, ernie45, and the distributions
reachable from pyproject.toml's `dependencies` through their own requirements (extras left out). Any other
top-level import raises ModuleNotFoundError there, as it would on a user's machine.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = r"""
import importlib.abc, importlib.machinery, os, site, sys, sysconfig
ALLOWED = set(sys.argv.pop(1).split(","))
SITE = tuple(os.path.realpath(p) + os.sep for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                                     sysconfig.get_paths()["platlib"], site.getusersitepackages()})
class OnlyTheDefaultInstall(importlib.abc.MetaPathFinder):
    # hides installed packages (site-packages) outside the default install, as if absent: imports fail and
    # importlib.util.find_spec probes answer None; the standard library and PYTHONPATH stay visible
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        spec = self.inner.find_spec(name, path, target)
        if spec is not None and path is None and name not in ALLOWED:
            where = spec.origin or next(iter(spec.submodule_search_locations or []), None)
            if where and os.path.realpath(where).startswith(SITE):
                return None
        return spec
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [OnlyTheDefaultInstall(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
from ernie45.cli import main
sys.exit(main(sys.argv[1:]))
"""

def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _canon(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def default_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def allowed_modules() -> set[str]:
    """Top-level module names the default install puts in site-packages: the dependency closure's."""
    dists, todo = set(), [_req_name(r) for r in default_dependencies()]
    while todo:
        name = todo.pop()
        if name in dists:
            continue
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:  # a requirement for another platform (its marker is false here)
            continue
        dists.add(name)
        todo += [_req_name(r) for r in requires if "extra" not in r.partition(";")[2]]
    mods = {m for m, owners in md.packages_distributions().items() if any(_canon(d) in dists for d in owners)}
    return mods


def _verb(args: list[str], allowed: set[str], **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BLOCKER, ",".join(sorted(allowed)), *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=kw.get("cwd", ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_the_blocker_blocks_what_the_default_install_lacks() -> None:
    """The check can fail: the test extras are installed here, yet the blocker refuses them."""
    allowed = allowed_modules()
    assert {"torch", "safetensors", "sentencepiece", "yaml", "fastapi", "uvicorn", "matplotlib"} <= allowed
    assert not {"transformers", "openai", "httpx", "pytest"} & allowed
    code = BLOCKER.replace("from ernie45.cli import main\nsys.exit(main(sys.argv[1:]))", "import transformers")
    res = subprocess.run([sys.executable, "-c", code, ",".join(sorted(allowed))], capture_output=True, text=True)
    assert res.returncode != 0 and "No module named 'transformers'" in res.stderr, res.stderr


@pytest.mark.slow
def test_documented_verbs_run_on_the_default_install(tmp_path) -> None:
    from ernie45 import assets

    allowed = allowed_modules()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    server = _verb(["serve", "demo", "--port", str(free), "--kv-cache-memory", "64MB", "--dtype", "float32"],
                   allowed, background=True)
    try:
        # train pretrain, to the end: metrics, loss.png (matplotlib) and the exported model
        data = tmp_path / "text.jsonl"
        data.write_text("".join(json.dumps({"text": f"line {i} of a tiny corpus to pack"}) + "\n" for i in range(64)))
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"task: pretrain\noutput_dir: {tmp_path / 'run'}\ntokenizer: {assets.demo_path()}\n"
                          f"model: {{preset: tiny-moe, vocab_size: 6144}}\ndata: [{data}]\nseq_len: 32\n"
                          "batch_size: 2\nmax_steps: 2\nsave_every: 1\nwarmup_steps: 1\nplot: true\n")
        res = _verb(["train", "pretrain", "--config", str(recipe)], allowed)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "could not draw" not in res.stderr, res.stderr[-3000:]
        for f in ("metrics.jsonl", "loss.png", "final/config.json", "final/tokenizer.model"):
            assert (tmp_path / "run" / f).is_file(), f
        res = _verb(["generate", "demo", "Fortune favours", "--max-tokens", "4", "--temperature", "0",
                     "--kv-cache-memory", "16MB"], allowed)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
        res = _verb(["plan", "ernie-4.5-21b-a3b", "--weights", "int4", "--plot", str(tmp_path / "plan.png")], allowed)
        assert res.returncode == 0 and (tmp_path / "plan.png").is_file(), res.stderr[-3000:]
        # serve demo: answers a completion
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{free}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        body = json.dumps({"model": "demo", "prompt": "Fortune", "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{free}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["text"]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
