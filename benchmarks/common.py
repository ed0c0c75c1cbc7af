"""Shared benchmark helpers: machine description, timing, real-shape random checkpoints, result files."""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zlib
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


def median(xs: list) -> object:
    """The middle element of the sorted values (the upper middle for an even count): always a measured value, so a
    median round's figures (or a tuple of them) stay together. Run an odd number of rounds."""
    return sorted(xs)[len(xs) // 2]


def paired_ratios(ours: list[float], peer: list[float], higher_is_better: bool = True) -> list[float]:
    """Per round, ours against the peer's segment run back to back with it (> 1: ours better). The machine's memory
    bandwidth drifts over minutes, so only these same-round ratios compare; the best round of each side would
    favour the side that follows the bandwidth more."""
    if len(ours) != len(peer):
        raise ValueError(f"{len(ours)} rounds of ours against {len(peer)} of the peer: pair them round by round")
    return [a / b if higher_is_better else b / a for a, b in zip(ours, peer)]


def median_range(xs: list[float], fmt: str = "{:.2f}", unit: str = "") -> str:
    """``median (min-max)`` of a list of figures, e.g. ``1.84x (1.67-2.01)``; just the value for one round."""
    m = fmt.format(median(xs)) + unit
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


@torch.no_grad()
def fill_random(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Fill every weight with slices of one random pool: speed does not depend on the values, and a real
    random init of several GB takes minutes. Norms get 1, the router's correction bias 0."""
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)) * std
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or name.endswith("inv_freq"):
            continue
        if name.endswith("e_score_correction_bias"):
            p.zero_()
        elif "norm" in name:
            p.fill_(1.0)
        else:
            flat = p.view(-1)
            for i in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - i)
                off = (i // 7 + zlib.crc32(name.encode())) % (pool.numel() - n + 1)  # vary between tensors
                flat[i:i + n].copy_(pool[off:off + n].to(p.dtype))
    return model


def random_model(config, dtype: torch.dtype, seed: int = 0):  # noqa: ANN001, ANN201
    """A model of any size with random weights, built on the meta device and filled by ``fill_random``."""
    from ernie45.model.checkpoint import build_empty

    return fill_random(build_empty(config, dtype), seed=seed).eval()


def dram_bandwidth(gib: float = 1.0) -> float:
    """Read bandwidth in bytes/s: best of 5 sums over a buffer far larger than the 32 MiB L3."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def write_result(name: str, text: str) -> str:
    """Write ``benchmarks/results/<date>-<name>.md`` and return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{_dt.date.today().isoformat()}-{name}.md")
    header = f"# {name}\n\n- machine: {machine()}\n- commit: {commit()}\n- command: `{command()}`\n\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + text + "\n")
    return path


def kernels_at(rev: str, isa: str, workdir: str) -> ctypes.CDLL:
    """The native kernels as they were at git revision ``rev``, compiled for ``isa`` with this checkout's flags
    (``git archive`` of ``ernie45/kernels`` into ``workdir``); every function of this checkout's header gets this
    checkout's ctypes signature, so the library can stand in for the active one (``kernels._lib``) when the
    structs and signatures did not change between the two; those whose prototype differs at ``rev`` are left
    unset and named in ``lib.changed`` (the caller gives them the revision's signature), with the structs whose
    size differs (then the revision's ``ernie45_decode_layer`` cannot read this checkout's plans)."""
    from ernie45 import kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(workdir, rev)
    os.makedirs(src, exist_ok=True)
    archive = subprocess.run(["git", "-C", root, "archive", rev, "ernie45/kernels"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    so = os.path.join(workdir, f"{rev}-{isa}.so")
    cc = os.environ.get("CC") or "gcc"
    args = ["-O3", *kernels.ISA_CFLAGS[isa], "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
    subprocess.run([cc, *args, "-o", so, os.path.join(src, "ernie45/kernels/cpu_kernels.c"), "-lm"], check=True)
    lib, ref = ctypes.CDLL(so), kernels.library(isa)

    def prototypes(text: str) -> dict[str, str]:
        return {n: " ".join(a.split()) for n, a in re.findall(r"\b(ernie45_\w+)\s*\(([^;{]*)\)\s*;", text)}

    ours = prototypes(kernels.HEADER.read_text())
    theirs = prototypes(open(os.path.join(src, "ernie45/kernels/ernie45_kernels.h"), encoding="utf-8").read())
    lib.changed = {n for n in ours if n in theirs and theirs[n] != ours[n]}  # the caller sets these signatures
    lib.ernie45_sizeof.argtypes, lib.ernie45_sizeof.restype = [ctypes.c_char_p], ctypes.c_int64
    lib.changed |= {s for s in ("QSet", "LayerPlan")
                    if lib.ernie45_sizeof(s.encode()) != ref.ernie45_sizeof(s.encode())}
    for name in sorted(ours):
        if hasattr(lib, name) and name not in lib.changed:
            getattr(lib, name).argtypes = getattr(ref, name).argtypes
            getattr(lib, name).restype = getattr(ref, name).restype
    return lib
