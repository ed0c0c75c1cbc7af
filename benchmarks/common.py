"""Shared benchmark helpers: machine description, timing, real-shape random checkpoints, result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads{mem}{gpu}; torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def timeit(fn: Callable[[], object], warmup: int = 1, repeat: int = 3) -> float:
    """Median wall seconds of ``fn`` after warm-up runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_model(config, dtype: torch.dtype, seed: int = 0):
    """A model of any size filled with scaled random weights, without the slow default init."""
    from ernie45.model.checkpoint import build_empty

    model = build_empty(config, dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            else:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) / p.shape[-1] ** 0.5).to(p.dtype))
    return model.eval()


def write_result(name: str, text: str) -> str:
    """Write ``benchmarks/results/<date>-<name>.md`` and return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{_dt.date.today().isoformat()}-{name}.md")
    header = f"# {name}\n\n- machine: {machine()}\n- commit: {commit()}\n- command: `{command()}`\n\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + text + "\n")
    return path
