"""Decode matmuls alone: ernie45's native CPU kernels against torch's ops on the same weights.

One MoE expert projection of the real ERNIE-4.5-21B-A3B shape (gate_up: 2560 -> 3072), cycling through 64
experts so the weights come from DRAM (64 x 15.7 MB bf16 >> 32 MiB L3), as in MoE decode. For M = 1 .. 32
rows: milliseconds per matmul and the weight bytes per second it streams, for

- bf16: ``ernie45.kernels.bgemm`` vs ``F.linear`` (oneDNN);
- int8 per-channel: ``qgemm`` (span layout) vs ``aten._weight_int8pack_mm``;
- int4 g128: ``qgemm`` vs ``aten._weight_int4pack_mm_for_cpu``;
- int2 g64: ``qgemm`` vs dequantize + ``F.linear`` (torch has no 2-bit op).

The crossover rows decide ``kernels.BF16_MAX_ROWS`` and ``quant.modules.KERNEL_MAX_ROWS``.

    python benchmarks/bench_kernels.py [--rows 1 2 4 8 16 32] [--experts 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import machine, median, median_range, paired_ratios, write_result  # noqa: E402
from ernie45 import kernels  # noqa: E402
from ernie45.quant import math as qm  # noqa: E402

torch.set_num_threads(2)
N, K = 3072, 2560


def sweep_ms(fn, experts: int) -> float:  # noqa: ANN001
    """One sweep over all experts: milliseconds per call."""
    t0 = time.perf_counter()
    for e in range(experts):
        fn(e)
    return (time.perf_counter() - t0) / experts * 1e3


def paired_sweeps(ours, peer, experts: int, rounds: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """``rounds`` sweeps of each, alternating ours then the peer (after one warm-up sweep each), so that the
    machine's bandwidth drift hits both sides of a pair alike."""
    sweep_ms(ours, experts), sweep_ms(peer, experts)
    t_ours, t_peer = [], []
    for _ in range(rounds):
        t_ours.append(sweep_ms(ours, experts))
        t_peer.append(sweep_ms(peer, experts))
    return t_ours, t_peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--only", nargs="+", default=None, help="weights to run: bf16 int8 int4 int2")
    ap.add_argument("--rounds", type=int, default=7, help="alternating sweeps of each side (odd: a median round)")
    args = ap.parse_args()
    if not kernels.available():
        sys.exit(f"native kernels unavailable: {kernels.why_unavailable()}")
    e = args.experts
    g = torch.Generator().manual_seed(0)
    wb = (torch.randn(e, N, K, generator=g) * 0.02).bfloat16()
    variants = {}
    variants["bf16"] = (N * K * 2, lambda x, i: kernels.bgemm(x, wb[i]), lambda x, i: F.linear(x, wb[i]))
    c8 = torch.randint(0, 256, (e, N, K), dtype=torch.uint8, generator=g)
    s8 = (torch.rand(e, N, 1, generator=g) * 1e-3).bfloat16()
    q8 = (c8.to(torch.int16) - 128).to(torch.int8)
    c8 = kernels.to_span(c8, 8)  # per-channel scales: the same order in the span layout's tiles
    variants["int8 per-channel"] = (N * K + N * 2, lambda x, i: kernels.qgemm(x, c8[i], 8, s8[i], None, K),
                                    lambda x, i: torch.ops.aten._weight_int8pack_mm(x, q8[i], s8[i, :, 0]))
    c4 = torch.randint(0, 16, (e, N, K), dtype=torch.uint8, generator=g)
    s4 = (torch.rand(e, N, K // 128, generator=g) * 1e-2).bfloat16()
    z4 = (torch.rand(e, N, K // 128, generator=g) * 1e-3).bfloat16()
    span4 = kernels.to_span(c4, 4)
    s4, z4 = kernels.span_scales(s4, 4), kernels.span_scales(z4, 4)  # the kernel's order (aten's below: portable)
    aten4 = qm.to_int4_kernel_layout(c4)
    sz4 = qm.int4_scale_zeros(kernels.from_span_scales(s4, 4), kernels.from_span_scales(z4, 4))
    del c4  # span4 and aten4 hold the codes
    variants["int4 g128 asym"] = (N * K // 2 + N * K // 128 * 4,
                                  lambda x, i: kernels.qgemm(x, span4[i], 4, s4[i], z4[i], 128),
                                  lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, aten4[i], 128, sz4[i]))
    c2 = torch.randint(0, 4, (e, N, K), dtype=torch.uint8, generator=g)
    s2 = (torch.rand(e, N, K // 64, generator=g) * 1e-2).bfloat16()
    z2 = (torch.rand(e, N, K // 64, generator=g) * 1e-3).bfloat16()
    span2 = kernels.to_span(c2, 2)
    t2, tz2 = kernels.span_scales(s2, 2), kernels.span_scales(z2, 2)  # the kernel's order (the peer's: portable)
    packed2 = qm.pack(c2, 2)
    del c2
    variants["int2 g64 asym"] = (N * K // 4 + N * K // 64 * 4,
                                 lambda x, i: kernels.qgemm(x, span2[i], 2, t2[i], tz2[i], 64),
                                 lambda x, i: F.linear(x, qm.dequantize_mid(qm.unpack(packed2[i], 2), s2[i], z2[i],
                                                                           2, dtype=torch.bfloat16)))
    peer_name = {"bf16": "F.linear (oneDNN)", "int8 per-channel": "aten._weight_int8pack_mm",
                 "int4 g128 asym": "aten._weight_int4pack_mm_for_cpu", "int2 g64 asym": "dequantize + F.linear"}
    rows = ["| weight | rows | ours ms | ours GB/s | torch op | torch ms | torch GB/s | torch / ours |",
            "|---|---|---|---|---|---|---|---|"]
    for name, (nbytes, ours, peer) in variants.items():
        if args.only and name.split()[0] not in args.only:
            continue
        for m in args.rows:
            x = torch.randn(m, K, generator=g).bfloat16()
            a, b = ours(x, 0).float(), peer(x, 0).float()  # the same weight: agree up to the int8 activations
            if (a - b).abs().max() > 0.05 * b.abs().max():
                sys.exit(f"{name}, {m} rows: ours and {peer_name[name]} disagree ({(a - b).abs().max():.3g} against "
                         f"outputs up to {b.abs().max():.3g}): the benchmark packs a weight wrongly")
            t_ours, t_peer = paired_sweeps(lambda i, x=x, f=ours: f(x, i), lambda i, x=x, f=peer: f(x, i), e,
                                           3 if name.startswith("int2") else args.rounds)
            ratio = median_range(paired_ratios(t_ours, t_peer, higher_is_better=False), unit="x")
            line = (f"| {name} | {m} | {median_range(t_ours, '{:.3f}')} | {nbytes / median(t_ours) / 1e6:.1f} | "
                    f"{peer_name[name]} | {median_range(t_peer, '{:.3f}')} | {nbytes / median(t_peer) / 1e6:.1f} | "
                    f"{ratio} |")
            print(line, flush=True)
            rows.append(line)
    text = (f"Weights: {e} experts of [{N}, {K}] (an ERNIE-4.5-21B-A3B gate_up projection), cycled so every call "
            f"reads DRAM; {args.rounds} sweeps of each side alternating (3 for int2, whose peer is slow). "
            f"ms: the median sweep's, the range in brackets; GB/s = weight bytes (codes + scales/zeros) per second "
            f"at the median; "
            f"torch / ours: the median over the pairs of back-to-back sweeps, the range in brackets.\n"
            f"Machine: {machine()}.\n\n" + "\n".join(rows))
    print(f"\nwritten to {write_result('kernels', text)}")


if __name__ == "__main__":
    main()
