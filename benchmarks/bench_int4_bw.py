"""Batch-1 decode matmuls against a plain streaming read of the same bytes: the fraction of the bandwidth they use.

The roofline of quantized decode is the DRAM read bandwidth, and on these VMs it drifts by up to 2x between
minutes, so a decode figure divided by a bandwidth measured around it carries that noise. Here each sweep of a
matmul over a weight pool far larger than the caches (``--gib``, default 1 GiB; L3 is 32 MiB) is paired with
a native streaming read (``kernels.stream_read``) of the very same buffers right before and right after it; the
ratio of the matmul's bytes per second to the faster of the two reads is taken per round, and the table gives the
median over rounds and the range. The weights (codes + scales + zeros, random: speed does not depend on values)
have the shapes of ERNIE-4.5-21B-A3B's decode step:

- ``experts``: one MoE layer's routed experts at batch 1 (``kernels.qmoe``: 6 of 64, gate_up [3072, 2560] and
  down [2560, 1536] each), successive calls taking the next 6 experts of the next layer's stacks;
- ``dense``: the dense layer's gate_up [24576, 2560] and down [2560, 12288] (``qgemm``), cycling through copies.

Cases: ours int4 (g128, asymmetric, bf16 scales: the ``int4`` preset) and int8 (per channel, symmetric: the
``int8`` preset, the control), and torch's own weight-only kernels on the same shapes for reference
(``aten._weight_int4pack_mm_for_cpu``, ``aten._weight_int8pack_mm``: the ``int4``/``int8`` layouts). Each round
also reads a 1 GiB fp32 buffer with ``torch.sum`` and with ``stream_read``: which of the two reads faster.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_int4_bw.py [--rounds 21] [--gib 1.0] [--isa avx2]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import median_range, write_result  # noqa: E402
from ernie45 import kernels  # noqa: E402

torch.set_num_threads(2)
H, I, E, TOPK = 2560, 1536, 64, 6  # noqa: E741 - hidden, expert width, experts, experts per token (ERNIE-4.5-21B-A3B)
DENSE = ((2 * 12288, H), (H, 12288))  # the dense layer's gate_up and down [N, K]
GROUP4 = 128


class Case:
    """A weight pool and one sweep of calls over it; ``reads``: the buffers a streaming read of the same bytes
    covers (each as often as the sweep reads it)."""

    def __init__(self, name: str, sweep: Callable[[], None], nbytes: int, reads: list[torch.Tensor]) -> None:
        self.name, self.sweep, self.nbytes, self.reads = name, sweep, nbytes, reads
        assert sum(t.numel() * t.element_size() for t in reads) == nbytes, name


def _rand_bytes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _scales(*shape: int, gen: torch.Generator, lo: float = 1e-3) -> torch.Tensor:
    return (lo + torch.rand(shape, generator=gen) * lo).bfloat16()


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def expert_case(bits: int, impl: str, gib: float, gen: torch.Generator) -> Case:
    """``impl`` ours: qmoe on span-layout stacks; torch: the aten kernel per selected expert (gate_up, then down)."""
    g_gu, g_dn = (GROUP4, GROUP4) if bits == 4 else (H, I)
    per_expert = (2 * I * H + H * I) * bits // 8
    per_expert += (2 * I * (H // g_gu) + H * (I // g_dn)) * 2 * (2 if bits == 4 else 1)
    layers = max(1, math.ceil(gib * 2**30 / (E * per_expert)))
    stacks = []
    for _ in range(layers):
        if impl == "ours":
            gu = _rand_bytes(E, 2 * I, H * bits // 8, gen=gen)
            dn = _rand_bytes(E, H, I * bits // 8, gen=gen)
            gs, ds = _scales(E, 2 * I, H // g_gu, gen=gen), _scales(E, H, I // g_dn, gen=gen)
            gz = _scales(E, 2 * I, H // g_gu, gen=gen) if bits == 4 else None
            dz = _scales(E, H, I // g_dn, gen=gen) if bits == 4 else None
            stacks.append(((gu, gs, gz, g_gu), (dn, ds, dz, g_dn)))
        elif bits == 4:  # aten int4: codes [N, K/2] in its byte order, scale_zeros [G, N, 2] bf16
            stacks.append((_rand_bytes(E, 2 * I, H // 2, gen=gen), _scales(E, H // g_gu, 2 * I, 2, gen=gen),
                           _rand_bytes(E, H, I // 2, gen=gen), _scales(E, I // g_dn, H, 2, gen=gen)))
        else:  # aten int8: int8 [N, K], bf16 scales [N]
            stacks.append((_rand_bytes(E, 2 * I, H, gen=gen).view(torch.int8), _scales(E, 2 * I, gen=gen),
                           _rand_bytes(E, H, I, gen=gen).view(torch.int8), _scales(E, H, gen=gen)))
    calls = E * TOPK // math.gcd(E, TOPK) // TOPK  # successive calls take the next TOPK experts: each equally often
    reps = calls * TOPK // E
    x = torch.randn(1, H, generator=gen).bfloat16() * 0.1
    act = torch.randn(1, I, generator=gen).bfloat16() * 0.1
    w = torch.full((1, TOPK), 1.0 / TOPK)
    sel = [torch.tensor([[(j * TOPK + i) % E for i in range(TOPK)]]) for j in range(calls)]

    if impl == "ours":
        def sweep() -> None:
            for gu, dn in stacks:
                for idx in sel:
                    kernels.qmoe(x, idx, w, bits, gu, dn)
        reads = [t for gu, dn in stacks for t in (*gu[:3], *dn[:3]) if t is not None] * reps
    else:
        mm = (lambda a, q, s: torch.ops.aten._weight_int4pack_mm_for_cpu(a, q, GROUP4, s)) if bits == 4 else \
            (lambda a, q, s: torch.ops.aten._weight_int8pack_mm(a, q, s))

        def sweep() -> None:
            for gq, gs, dq, ds in stacks:
                for idx in sel:
                    for e in idx[0].tolist():
                        mm(x, gq[e], gs[e])
                        mm(act, dq[e], ds[e])
        reads = [t for s in stacks for t in s] * reps
    name = f"experts int{bits} {'g128 asym' if bits == 4 else 'per-channel sym'} ({layers} layers of {E}), " + (
        "ours: qmoe" if impl == "ours" else f"torch: aten._weight_int{bits}pack_mm{'_for_cpu' if bits == 4 else ''}")
    return Case(name, sweep, _nbytes(*reads), reads)


def dense_case(bits: int, impl: str, gib: float, gen: torch.Generator) -> Case:
    pair = sum(n * k * bits // 8 + n * (k // (GROUP4 if bits == 4 else k)) * 2 * (2 if bits == 4 else 1)
               for n, k in DENSE)
    copies = max(1, math.ceil(gib * 2**30 / pair))
    weights = []
    for _ in range(copies):
        for n, k in DENSE:
            g = GROUP4 if bits == 4 else k
            if impl == "ours":
                weights.append((n, k, _rand_bytes(n, k * bits // 8, gen=gen), _scales(n, k // g, gen=gen),
                                _scales(n, k // g, gen=gen) if bits == 4 else None, g))
            elif bits == 4:
                weights.append((n, k, _rand_bytes(n, k // 2, gen=gen), _scales(k // g, n, 2, gen=gen), None, g))
            else:
                weights.append((n, k, _rand_bytes(n, k, gen=gen).view(torch.int8), _scales(n, gen=gen), None, g))
    xs = {k: torch.randn(1, k, generator=gen).bfloat16() * 0.1 for _, k in DENSE}
    if impl == "ours":
        kernels.qgemm(xs[H], weights[0][2], bits, weights[0][3], weights[0][4], weights[0][5])  # checked once

        def sweep() -> None:
            for n, k, q, s, z, g in weights:
                kernels.qgemm_ptrs(xs[k], n, q.data_ptr(), bits, s.data_ptr(), None if z is None else z.data_ptr(),
                                   1, g)
    elif bits == 4:
        def sweep() -> None:
            for _, k, q, s, _, g in weights:
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], q, g, s)
    else:
        def sweep() -> None:
            for _, k, q, s, _, _ in weights:
                torch.ops.aten._weight_int8pack_mm(xs[k], q, s)
    reads = [t for w in weights for t in w[2:5] if t is not None]
    name = f"dense int{bits} {'g128 asym' if bits == 4 else 'per-channel sym'} ({copies} x gate_up + down), " + (
        "ours: qgemm" if impl == "ours" else f"torch: aten._weight_int{bits}pack_mm{'_for_cpu' if bits == 4 else ''}")
    return Case(name, sweep, _nbytes(*reads), reads)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stream(reads: list[torch.Tensor]) -> None:
    for t in reads:
        kernels.stream_read(t)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21, help="paired rounds per case (odd: the median is a round)")
    ap.add_argument("--gib", type=float, default=1.0, help="weight pool per case, GiB (>> the 32 MiB L3)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="cases to run, by words of their name: int4 int8 experts dense ours torch")
    ap.add_argument("--isa", choices=kernels.ISAS, default=None, help="the kernel build (default: the active one)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the kernels use as many)")
    ap.add_argument("--name", default="int4-bw", help="results file: benchmarks/results/<date>-<name>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.isa:
        kernels.set_isa(args.isa)
    if not kernels.available():
        sys.exit(f"native kernels unavailable: {kernels.why_unavailable()}")
    gen = torch.Generator().manual_seed(0)
    specs = [(kind, bits, impl) for kind in ("experts", "dense") for bits in (4, 8) for impl in ("ours", "torch")]
    if args.only:  # per category (kind, bits, impl) named in --only, the case's must be one of those named
        cats = [("experts", "dense"), ("int4", "int8"), ("ours", "torch")]
        unknown = set(args.only) - {w for c in cats for w in c}
        if unknown:
            sys.exit(f"--only: unknown words {sorted(unknown)}; use {[w for c in cats for w in c]}")
        specs = [s for s in specs if all(not set(c) & set(args.only) or tag in args.only
                                         for c, tag in zip(cats, (s[0], f"int{s[1]}", s[2])))]
    loads = [load()]
    rows = ["| case | MB a sweep | GB/s | stream GB/s | of the stream read, paired rounds |", "|---|---|---|---|---|"]
    sums = {"torch.sum": [], "stream_read": []}
    ones = torch.ones(2**30 // 4)
    for kind, bits, impl in specs:
        case = (expert_case if kind == "experts" else dense_case)(bits, impl, args.gib, gen)
        case.sweep()  # warm: first-call costs out of the rounds
        stream(case.reads)
        mine, ceil, ratios = [], [], []
        for _ in range(args.rounds):
            before = _timed(lambda c=case: stream(c.reads))
            t = _timed(case.sweep)
            after = _timed(lambda c=case: stream(c.reads))
            mine.append(case.nbytes / t / 1e9)
            ceil.append(case.nbytes / min(before, after) / 1e9)
            ratios.append(min(before, after) / t)
            sums["torch.sum"].append(ones.numel() * 4 / _timed(ones.sum) / 1e9)
            sums["stream_read"].append(ones.numel() * 4 / _timed(lambda: kernels.stream_read(ones)) / 1e9)
        rows.append(f"| {case.name} | {case.nbytes / 1e6:.0f} | {median_range(mine, '{:.1f}')} | "
                    f"{median_range(ceil, '{:.1f}')} | {median_range(ratios, '{:.3f}')} |")
        print(rows[-1], flush=True)
        del case
    loads.append(load())
    rsum = [a / b for a, b in zip(sums["torch.sum"], sums["stream_read"])]
    text = (f"Kernel build: {kernels.active_isa()}, {args.threads} threads. Load average (1, 5, 15 min) before: "
            f"{loads[0]}; after: {loads[1]}.\n\n"
            f"Each round: a streaming read of the case's buffers (`kernels.stream_read`), one sweep of the case "
            f"over them, the streaming read again; GB/s = bytes of codes + scales + zeros per second; the paired "
            f"ratio is the sweep's GB/s over the faster of the two reads around it. Medians over {args.rounds} "
            f"rounds, the range in brackets.\n\n" + "\n".join(rows) + "\n\n"
            f"The ceiling's read: a 1 GiB fp32 buffer summed by `torch.sum` {median_range(sums['torch.sum'], '{:.1f}')}"
            f" GB/s, read by `stream_read` {median_range(sums['stream_read'], '{:.1f}')} GB/s; torch.sum / "
            f"stream_read paired {median_range(rsum, '{:.3f}')} (over all rounds of all cases).")
    print(f"\nwritten to {write_result(args.name, text)}")


if __name__ == "__main__":
    main()
