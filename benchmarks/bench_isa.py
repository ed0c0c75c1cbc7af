"""AVX-512 vs AVX2 builds of the native kernels vs torch's generic path (what a CPU without our kernels runs).

Decode-size matmuls on ERNIE-4.5-21B-A3B-sized weights: qgemm int4 / int8 (span layout, groups of 128 / per
channel) and bgemm, at batch 1 and 16. The torch peer is the quantized module's own torch forward
(``QuantLinear`` with the kernels off) and ``F.linear`` for bf16. Rounds alternate the three paths; each figure is
the median of the per-round paired ratios with their range.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_isa.py --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import median_range, paired_ratios, write_result  # noqa: E402
from ernie45 import kernels  # noqa: E402
from ernie45.accel.cpu import NATIVE  # noqa: E402
from ernie45.accel.swap import swap  # noqa: E402
from ernie45.quant import QuantLinear, TensorScheme  # noqa: E402

SHAPES = [(1536, 2560), (2560, 12288)]  # [N, K]: an expert's gate/up-sized and a dense down-sized weight


def _time(fn, x: torch.Tensor, reps: int) -> float:  # noqa: ANN001
    fn(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    for isa in kernels.ISAS:
        if kernels.isa_why_not(isa):
            raise SystemExit(f"the {isa} build cannot run here: {kernels.isa_why_not(isa)}")
    rows = ["| kernel | N x K | batch | avx512 ms | avx2 ms | torch ms | avx2 / avx512 time | torch / avx2 time |",
            "|---|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False).bfloat16()
        cases = []
        for name, scheme in [("qgemm int4 g128", TensorScheme(4, 128)),
                             ("qgemm int8 channel", TensorScheme(8, None, True))]:
            q = QuantLinear.from_linear(lin, scheme)
            swap(q, NATIVE)  # the cpu backend's module: the span layout's kernels
            with kernels.use_kernels(False):
                t = QuantLinear.from_linear(lin, scheme)  # the layout and forward without our kernels
            cases.append((name, q, t))
        w = lin.weight
        cases.append(("bgemm bf16", lambda x, w=w: kernels.bgemm(x, w), lambda x, w=w: F.linear(x, w)))
        for name, ours, peer in cases:
            for batch in (1, 16):
                x = torch.randn(batch, k).bfloat16()
                times: dict[str, list[float]] = {"avx512": [], "avx2": [], "torch": []}
                for _ in range(args.rounds):
                    for isa in kernels.ISAS:
                        with kernels.use_isa(isa):
                            times[isa].append(_time(ours, x, args.reps))
                    with kernels.use_kernels(False):
                        times["torch"].append(_time(peer, x, args.reps))
                med = {key: sorted(v)[len(v) // 2] * 1e3 for key, v in times.items()}
                r1 = paired_ratios(times["avx2"], times["avx512"], higher_is_better=True)
                r2 = paired_ratios(times["torch"], times["avx2"], higher_is_better=True)
                rows.append(f"| {name} | {n} x {k} | {batch} | {med['avx512']:.3f} | {med['avx2']:.3f} | "
                            f"{med['torch']:.3f} | {median_range(r1, unit='x')} | {median_range(r2, unit='x')} |")
                print(rows[-1], flush=True)
    text = ("Median ms per call over rounds; ratios: median of per-round paired ratios (range). "
            "`avx2 / avx512 time` > 1: the AVX2 build is slower; `torch / avx2 time` > 1: the AVX2 build beats "
            f"torch's generic path. {torch.get_num_threads()} threads.\n\n" + "\n".join(rows))
    print(write_result("isa", text))


if __name__ == "__main__":
    main()
