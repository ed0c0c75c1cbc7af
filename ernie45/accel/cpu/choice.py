"""Which implementation runs each CPU kernel family, per row-count bucket: chosen by measuring on this CPU.

The native kernels (``ernie45.kernels``) stream a weight once for a few rows; torch's CPU ops (oneDNN, which runs
AMX tiles on CPUs that have them, and aten's quantized ops) win once there are enough rows to reuse each weight
load. Where the crossover lies depends on the CPU (AMX or not, cache sizes, core count), so it is measured: at
acceleration time each family below is timed both ways on a weight of the 21B-A3B's shape at every bucket of rows,
and the faster one is recorded. The result is cached per CPU model, flags, thread count, torch version and kernel
source under ``$ERNIE45_CACHE`` (default ``~/.cache/ernie45/calibration``), so the calibration (a few seconds) runs
once per machine; ``ernie45 info --backend`` shows the table and where it came from.

Where the CPU runs more than one build of the kernels (AVX-512 and AVX2: ``kernels.ISAS``), the faster build at
one row is measured first and made active (``$ERNIE45_ISA`` forces one instead). AMX tiles are reached through
torch's side: oneDNN runs bf16 and int8 matmuls on them on CPUs that have them (it requests the Linux tile permission
itself), so on such a CPU the measurement decides per bucket between our AVX-512 kernels and oneDNN's AMX path.

Families (the module that consults each):

- ``blinear``: bf16 linears (``NativeLinear``, the bf16 experts' per-expert matmuls): ``kernels.bgemm`` or
  ``F.linear`` (oneDNN);
- ``bexperts``: a MoE layer's bf16 experts (``NativeExperts``): ``kernels.bmoe`` in one call or the per-expert loop;
- ``qlinear8`` / ``qlinear4``: span-layout quantized linears at 8 bits and at 2/4/6 bits (``NativeQuantLinear``,
  ``NativeQWeight``, the fused q/k/v and gate/up): ``kernels.qgemm`` (activations in int8, VNNI dot products: this
  is also the int8-compute path for quantized prefill where it wins) or dequantize + GEMM;
- ``qexperts``: a MoE layer's quantized experts (``NativeQuantExperts``): ``kernels.qmoe`` or the per-expert loop;
- ``small``: the per-layer elementwise ops (RMSNorm, RoPE, router): one native call each or torch's ops.

``ERNIE45_CALIBRATION``: ``auto`` (default: the cached table, else measure once), ``measure`` (measure again),
``defaults`` (no measurement: the thresholds measured on the first machine, native up to 16 rows everywhere; the
test suite uses it so results do not depend on the machine's timing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ernie45 import kernels
from ernie45.utils import atomic_write_text

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Row-count buckets: a call with r rows takes the choice of the first bucket >= r; above the last, the last's."""
FAMILIES = ("blinear", "bexperts", "qlinear8", "qlinear4", "qexperts", "small")
VERSION = 1
"""Bumped when what is measured changes: older cache files are ignored."""
MARGIN = 0.95
"""torch replaces the native kernel only where it is at least 5% faster (timing noise must not flip a choice)."""
DEFAULT_MAX_ROWS = 16
"""The defaults: native up to 16 rows in every family (measured on the AMD EPYC Zen 4 this started on)."""


def _bucket(rows: int) -> int:
    i = (rows - 1).bit_length()
    return i if i < len(BUCKETS) else len(BUCKETS) - 1


@dataclass
class Choice:
    """Per family, whether the native kernel runs at each bucket of :data:`BUCKETS`, and where that came from."""

    native: dict[str, tuple[bool, ...]]
    source: str
    """``defaults``, ``measured`` or ``cache``."""
    timings: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Per family, per bucket measured: {"rows", "native_us", "torch_us"}."""
    cpu: str = ""
    path: str = ""
    isa: str | None = None
    """The kernel build measured fastest (``kernels.ISAS``: AVX-512 or AVX2) and made active; None: the default."""
    isa_us: dict[str, float] = field(default_factory=dict)
    """Per build this CPU runs: the summed one-row time of the quantized, bf16 and MoE kernels."""
    """The cache file (measured or read)."""

    def table(self) -> list[str]:
        """One line per family: the rows where each implementation runs, with the measured times."""
        lines = []
        if self.isa_us:
            lines.append("      isa  " + ", ".join(f"{k} {v:.1f} us" for k, v in self.isa_us.items())
                         + f" (one row of qlinear4 + blinear + qexperts): {self.isa}")
        for fam in FAMILIES:
            flags = self.native.get(fam)
            if flags is None:
                continue
            runs = " ".join(f"{b}:{'N' if f else 't'}" for b, f in zip(BUCKETS, flags))
            lines.append(f"{fam:>9}  {runs}")
            for t in self.timings.get(fam, []):
                lines.append(f"{'':>9}    rows {t['rows']:>3}: native {t['native_us']:9.1f} us, torch "
                             f"{t['torch_us']:9.1f} us")
        return lines


DEFAULTS = Choice({f: tuple(b <= DEFAULT_MAX_ROWS for b in BUCKETS) for f in FAMILIES}, "defaults")

_current: Choice = DEFAULTS
_tables: dict[str, tuple[bool, ...]] = dict(DEFAULTS.native)


def native(family: str, rows: int) -> bool:
    """Whether the native kernel of ``family`` runs a call of ``rows`` rows (a few hundred nanoseconds)."""
    return rows > 0 and _tables[family][_bucket(rows)]


def qfamily(bits: int) -> str:
    """The quantized-linear family of a weight's bits (8-bit codes need no unpacking; 2/4/6 share the unpack)."""
    return "qlinear8" if bits == 8 else "qlinear4"


def current() -> Choice:
    return _current


def set_choice(choice: Choice) -> None:
    global _current, _tables
    _current, _tables = choice, {**DEFAULTS.native, **choice.native}


@contextlib.contextmanager
def using(choice: Choice | dict[str, tuple[bool, ...]]) -> Iterator[None]:
    """Run a block with another table (tests force one implementation with it)."""
    old = _current
    set_choice(choice if isinstance(choice, Choice) else Choice(dict(choice), "given"))
    try:
        yield
    finally:
        set_choice(old)


def everywhere(flag: bool) -> dict[str, tuple[bool, ...]]:
    """A table with the native kernels at every bucket (True) or nowhere (False)."""
    return {f: (flag,) * len(BUCKETS) for f in FAMILIES}


# ------------------------------------------------------------------------------------------- the cache
def _cache_path() -> Path:
    root = os.environ.get("ERNIE45_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ernie45")
    model, flags = kernels._cpu_info()
    parts = [str(VERSION), model, " ".join(sorted(flags)), torch.__version__, str(torch.get_num_threads()),
             *(p.read_text() for p in (kernels.SOURCE, kernels.HEADER, *kernels.PARTS))]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(root) / "calibration" / f"cpu-{key}.json"


def _read(path: Path) -> Choice | None:
    try:
        data = json.loads(path.read_text())
        native_ = {f: tuple(bool(x) for x in data["native"][f]) for f in FAMILIES}
        if any(len(v) != len(BUCKETS) for v in native_.values()) or data.get("buckets") != list(BUCKETS):
            return None
        isa = data.get("isa")
        return Choice(native_, "cache", data.get("timings", {}), data.get("cpu", ""), str(path),
                      isa if isa in kernels.ISAS else None, data.get("isa_us", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure(mode: str | None = None) -> Choice:
    """The table for this process, decided once: ``mode`` (default ``$ERNIE45_CALIBRATION`` or ``auto``) as in the
    module docstring. Another process measuring at the same time (ranks starting together) is waited for."""
    mode = mode or os.environ.get("ERNIE45_CALIBRATION", "auto")
    if mode not in ("auto", "measure", "defaults"):
        raise ValueError(f"ERNIE45_CALIBRATION={mode!r}: use auto, measure or defaults")
    if mode == "defaults" or not kernels.available():
        set_choice(DEFAULTS)
        return DEFAULTS
    if mode == "auto" and _current.source in ("cache", "measured"):
        return _current
    path = _cache_path()
    got = _read(path) if mode == "auto" else None
    if got is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process measures; the others then read its file
            got = _read(path) if mode == "auto" else None
            if got is None:
                got = calibrate()
                got.path = str(path)
                atomic_write_text(path, json.dumps({"version": VERSION, "cpu": got.cpu, "buckets": list(BUCKETS),
                                                    "native": got.native, "timings": got.timings, "isa": got.isa,
                                                    "isa_us": got.isa_us}, indent=1))
    if got.isa and not os.environ.get("ERNIE45_ISA") and not kernels.isa_why_not(got.isa):
        kernels.set_isa(got.isa)
    set_choice(got)
    log.info("CPU kernel choice (%s, %s):\n%s", got.source, got.path, "\n".join(got.table()))
    return got


# ------------------------------------------------------------------------------------------- measuring
def _median_us(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median time of each function in microseconds, the functions alternating (drift hits all alike)."""
    for fn in fns.values():
        fn()  # warm: first touch of the weight, oneDNN's primitive cache
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _random_quant(mod: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random codes and small scales in a quantized module's buffers (no quantization pass: it is timing)."""
    with torch.no_grad():
        for name, b in mod.named_buffers():
            if b.dtype in (torch.uint8, torch.int8):
                b.view(torch.uint8).copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen))
            elif name.endswith("scales"):
                b.fill_(1e-3)
            else:
                b.fill_(1e-4)
    return mod


H, I_DENSE, I_EXPERT, EXPERTS, TOP_K = 2560, 3072, 1536, 8, 2
"""The calibration shapes: the 21B-A3B's hidden size, a 3072-row weight (its experts' gate/up), its expert width;
8 experts of which 2 per token (the share of experts a token reads, at a size that keeps this to seconds)."""


def _families(gen: torch.Generator) -> dict[str, tuple[Callable[[int], Callable], Callable[[int], Callable]]]:
    """Per family: (native(rows) -> fn, torch(rows) -> fn) building the timed calls."""
    from ernie45.accel.cpu.quant import kernel_args
    from ernie45.model.layers import RMSNorm
    from ernie45.model.moe import Experts
    from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight
    from ernie45.quant.scheme import BASE

    def x(rows: int, k: int = H) -> torch.Tensor:
        return (torch.randn(rows, k, generator=gen) * 0.5).bfloat16()

    w = (torch.randn(I_DENSE, H, generator=gen) * 0.02).bfloat16()
    q8 = _random_quant(QuantLinear(H, I_DENSE, BASE[8]), gen)
    q4 = _random_quant(QuantLinear(H, I_DENSE, BASE[4]), gen)
    qx = _random_quant(QuantExperts(EXPERTS, H, I_EXPERT, BASE[4]), gen)
    bx = Experts(EXPERTS, H, I_EXPERT).bfloat16()
    with torch.no_grad():
        bx.gate_up_proj.normal_(0, 0.02, generator=gen)
        bx.down_proj.normal_(0, 0.02, generator=gen)
    norm = RMSNorm(H).bfloat16()

    def route(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.rand(rows, EXPERTS, generator=gen).argsort(dim=1)[:, :TOP_K]
        return idx, torch.full((rows, TOP_K), 1.0 / TOP_K, dtype=torch.bfloat16)

    def qlin(q: QuantLinear) -> tuple[Callable, Callable]:
        def nat(r: int) -> Callable:
            a, c, s, z, _ = (x(r), *kernel_args(q))
            return lambda: kernels.qgemm(a, c, q.bits, s, z, q.group)
        def ref(r: int) -> Callable:
            a = x(r)
            return lambda: QWeight.matmul(q, a)
        return nat, ref

    def qexp_native(r: int) -> Callable:
        a, (idx, wt) = x(r), route(r)
        gu, dn = kernel_args(qx.gate_up_proj), kernel_args(qx.down_proj)
        return lambda: kernels.qmoe(a, idx, wt, 4, gu, dn)

    def qexp_torch(r: int) -> Callable:
        a, (idx, wt) = x(r), route(r)
        return lambda: QuantExperts.forward(qx, a, idx, wt)

    def bexp_native(r: int) -> Callable:
        a, (idx, wt) = x(r), route(r)
        return lambda: kernels.bmoe(a, idx, wt, bx.gate_up_proj.data, bx.down_proj.data)

    def bexp_torch(r: int) -> Callable:
        a, (idx, wt) = x(r), route(r)
        return lambda: Experts.forward(bx, a, idx, wt)

    def on_x(fn: Callable[[torch.Tensor], object]) -> Callable[[int], Callable]:
        def build(r: int) -> Callable:
            a = x(r)
            return lambda: fn(a)
        return build

    return {
        "blinear": (on_x(lambda a: kernels.bgemm(a, w)), on_x(lambda a: F.linear(a, w))),
        "bexperts": (bexp_native, bexp_torch),
        "qlinear8": qlin(q8),
        "qlinear4": qlin(q4),
        "qexperts": (qexp_native, qexp_torch),
        "small": (on_x(lambda a: kernels.rms_norm(a, norm.weight, norm.eps)),
                  on_x(lambda a: RMSNorm.forward(norm, a))),
    }


def _measure(nat: Callable[[int], Callable], ref: Callable[[int], Callable], buckets: tuple[int, ...],
             reps: int) -> tuple[list[bool], list[dict[str, float]]]:
    """One family's flags per bucket and the measurements behind them. Two rules keep this to seconds: once the
    native kernel wins by a factor r, the next log2(r) buckets are taken as won without measuring (the native time
    at most doubles when the rows double: each weight load serves the same rows of x; torch's does not shrink), and
    after torch has won two buckets in a row the larger ones go to torch (the native kernels only lose ground as
    rows grow). A bucket whose measured verdict differs from both measured neighbours is measured twice more and
    decided by the majority (a stall of the machine must not carve a hole into a family)."""
    n = len(buckets)
    flags: list[bool | None] = [None] * n
    seen: dict[int, dict[str, float]] = {}

    def measure(i: int) -> bool:
        r = buckets[i]
        t = _median_us({"native": nat(r), "torch": ref(r)}, reps)
        seen[i] = {"rows": r, "native_us": round(t["native"], 1), "torch_us": round(t["torch"], 1)}
        return not t["torch"] < MARGIN * t["native"]

    i, lost = 0, 0
    while i < n:
        if lost >= 2:
            flags[i] = False
            i += 1
            continue
        flags[i] = win = measure(i)
        lost = 0 if win else lost + 1
        ratio = seen[i]["torch_us"] / max(seen[i]["native_us"], 1e-3)
        skip = int(math.log2(ratio * MARGIN)) if win and ratio * MARGIN >= 2 else 0
        for j in range(i + 1, min(n, i + 1 + skip)):
            flags[j] = True
        i += 1 + skip
    measured = sorted(seen)
    for a, i, b in zip(measured, measured[1:], measured[2:]):
        if flags[a] == flags[b] != flags[i]:
            votes = [flags[i], measure(i), measure(i)]
            flags[i] = votes.count(True) >= 2
    return [bool(f) for f in flags], [seen[i] for i in measured]


def calibrate(reps: int = 5, families: tuple[str, ...] = FAMILIES) -> Choice:
    """Measure every family (native against torch, alternating, median of ``reps``) at the buckets :func:`_measure`
    needs and return the table."""
    print(f"ernie45: measuring the CPU kernels against torch on this CPU (once per machine, seconds; "
          f"{torch.get_num_threads()} threads)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    builders = _families(gen)
    native_: dict[str, tuple[bool, ...]] = {}
    timings: dict[str, list[dict[str, float]]] = {}
    isa, isa_us = None, {}
    runs = [i for i in kernels.ISAS if not kernels.isa_why_not(i)]
    if len(runs) > 1 and not os.environ.get("ERNIE45_ISA"):  # several builds run here: the faster one
        with torch.inference_mode():
            calls = {i: [builders[f][0](1) for f in ("qlinear4", "blinear", "qexperts")] for i in runs}

            def under(i: str, fns: list) -> Callable:
                def run() -> None:
                    with kernels.use_isa(i):
                        for fn in fns:
                            fn()
                return run
            isa_us = {k: round(v, 1) for k, v in _median_us({i: under(i, calls[i]) for i in runs}, reps).items()}
        isa = min(isa_us, key=isa_us.get)
        kernels.set_isa(isa)
    with torch.inference_mode():
        for fam in families:
            flags, timings[fam] = _measure(*builders[fam], BUCKETS, reps)
            native_[fam] = tuple(flags)
    for fam in FAMILIES:  # families not measured keep the defaults
        native_.setdefault(fam, DEFAULTS.native[fam])
    log.info("CPU kernel calibration took %.1f s", time.perf_counter() - t0)
    return Choice(native_, "measured", timings, kernels._cpu_info()[0], isa=isa, isa_us=isa_us)
