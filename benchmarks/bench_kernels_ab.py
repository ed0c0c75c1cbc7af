"""The matmul kernels of this checkout against the same kernels at an earlier git revision (A/B).

Builds ``ernie45/kernels`` as it was at ``--base`` (``git archive``, the same compiler flags as
``ernie45.kernels._build``) beside this checkout's build, checks that both give the same outputs (or prints the
largest difference), then times them alternately on the same inputs: ``qmoe`` (one MoE layer of the
ERNIE-4.5-21B-A3B shape, int4 g128 asymmetric: 64 experts [3072, 2560] + [2560, 1536], top-6 of T tokens) and the
same layer where every row picks the same experts, other ones each call (a verify step's routes: each call's weights
from DRAM), ``qgemm`` (a [3072, 2560] linear, int4 g128 and int2 g64 asymmetric, int8 per channel) and ``bgemm``
(bf16: the same linear, and the demo model's LM head [6144, 256]) and ``decode attention`` (T tokens of one sequence
over a paged cache of the 21B shape, 256 or 4096 positions, other blocks each call) for T rows each (``--only``: the
cases whose name holds one of the given words). The linears' weights fit in L3 here, so they measure the kernels'
compute (prefill, verify steps), not the DRAM streaming of batch-1 decode (``bench_int4_bw.py``); the MoE layer's
377 MB come from DRAM. Each case: ``--rounds`` pairs of calls, base then new; the figure is the median of the
per-pair speed-ups (base time / new time) with the range.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_kernels_ab.py --base f308ac4 [--rows 1 4 16 256]
        [--isa avx512 avx2] [--rounds 9] [--only bgemm] [--name kernels-ab] [--note "..."]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import kernels_at, median, median_range, write_result  # noqa: E402
from ernie45 import kernels  # noqa: E402

torch.set_num_threads(2)
E, H, I, TOPK, N_LIN = 64, 2560, 1536, 6, 3072  # noqa: E741 - experts, hidden, expert width, top-k, linear rows


def in_turn(choices: list) -> Callable[[ctypes.CDLL], object]:
    """A picker over inputs that must come from DRAM on every call: each library's first call (the outputs check)
    gets ``choices[0]``, the timed calls the others in turn over both libraries, so the two calls of a pair never
    share them (the second would find the first's in L3) and each library meets every one."""
    seen: set[int] = set()
    timed = [-1]

    def pick(lib: ctypes.CDLL) -> object:
        if id(lib) not in seen:
            seen.add(id(lib))
            return choices[0]
        timed[0] += 1
        return choices[1 + timed[0] % (len(choices) - 1)]
    return pick


def cases(rows: int, gen: torch.Generator) -> dict:
    def qw(e: int, n: int, k: int, bits: int, group: int) -> tuple:
        codes = torch.randint(0, 2**bits, (e, n, k), generator=gen, dtype=torch.uint8)
        return (kernels.to_span(codes, bits).contiguous(),
                (torch.rand(e, n, k // group, generator=gen) * 0.01 + 1e-3).bfloat16(),
                (torch.randn(e, n, k // group, generator=gen) * 0.01).bfloat16())

    gu, dn = qw(E, 2 * I, H, 4, 128), qw(E, H, I, 4, 128)
    x = torch.randn(rows, H, generator=gen).bfloat16()
    idx = torch.rand(rows, E, generator=gen).argsort(1)[:, :TOPK].contiguous()
    wts = torch.full((rows, TOPK), 1 / TOPK)
    group = {4: 128, 2: 64, 8: H}  # int8 per channel, symmetric (no zeros)
    lin = {b: qw(1, N_LIN, H, b, g) for b, g in group.items()}

    # A verify step's routes: every row picks the same experts (its tokens continue one text), other experts each
    # call, so they come from DRAM as in a decode step.
    shared = in_turn([torch.rand(E, generator=gen).argsort()[:TOPK].expand(rows, TOPK).contiguous()
                      for _ in range(8)])

    def moe_with(lib: ctypes.CDLL, route: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows, H)
        dn_bits = () if "ernie45_qmoe" in getattr(lib, "changed", ()) else (4,)  # down's own bits (since 2026-12-07)
        rc = lib.ernie45_qmoe(x.data_ptr(), 1, rows, H, I, TOPK, route.data_ptr(), wts.data_ptr(), E, 4, 1,
                              gu[0].data_ptr(), gu[1].data_ptr(), gu[2].data_ptr(), 128, dn[0].data_ptr(),
                              dn[1].data_ptr(), dn[2].data_ptr(), 128, *dn_bits, 1, out.data_ptr(), 2)
        assert rc == 0, rc
        return out

    def moe(lib: ctypes.CDLL) -> torch.Tensor:
        return moe_with(lib, idx)

    def moe_shared(lib: ctypes.CDLL) -> torch.Tensor:
        return moe_with(lib, shared(lib))

    def linear(bits: int):  # noqa: ANN202
        c, s, z = lin[bits]

        def run(lib: ctypes.CDLL) -> torch.Tensor:
            out = torch.empty(rows, N_LIN, dtype=torch.bfloat16)
            rc = lib.ernie45_qgemm(x.data_ptr(), 1, rows, H, N_LIN, c.data_ptr(), bits, s.data_ptr(),
                                   z.data_ptr() if bits != 8 else None, 1, group[bits], out.data_ptr(), 1, 2)
            assert rc == 0, rc
            return out
        return run

    def bf16(n: int, k: int):  # noqa: ANN202
        w = torch.randn(n, k, generator=gen).bfloat16()
        xb = x[:, :k].contiguous()

        def run(lib: ctypes.CDLL) -> torch.Tensor:
            out = torch.empty(rows, n, dtype=torch.bfloat16)
            rc = lib.ernie45_bgemm(xb.data_ptr(), rows, k, n, w.data_ptr(), out.data_ptr(), 1, 2)
            assert rc == 0, rc
            return out
        return run

    def attention(context: int):  # noqa: ANN202
        # The rows are the tokens of one sequence at positions context .. context + rows - 1 (a verify step), over a
        # paged cache of the 21B shape (kv heads 4, D 128, blocks of 16) drawn each call from a 48 MB pool, so the
        # cache comes from DRAM as in a decode step (other layers' weights evict it between a layer's steps).
        nq, kvh, d, p = 20, 4, 128, 16
        need = (context + rows + p - 1) // p
        pool = max(48 * 2**20 // (2 * p * kvh * d * 2), 2 * need)
        kc = torch.randn(pool, p, kvh, d, generator=gen).bfloat16()
        vc = torch.randn(pool, p, kvh, d, generator=gen).bfloat16()
        q = torch.randn(rows, nq, d, generator=gen).bfloat16()
        lens = torch.arange(context + 1, context + rows + 1)
        tables = in_turn([torch.randperm(pool, generator=gen)[:need].expand(rows, need).contiguous()
                          for _ in range(8)])

        def run(lib: ctypes.CDLL) -> torch.Tensor:
            tab = tables(lib)
            out = torch.empty(rows, nq, d)
            rc = lib.ernie45_decode_attn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), tab.data_ptr(), need,
                                         lens.data_ptr(), rows, nq, kvh, d, p, d ** -0.5, out.data_ptr(), 0, 2)
            assert rc == 0, rc
            return out
        return run, 2 * 2 * nq * d * int(lens.sum())

    return {"qmoe int4 g128 (64 experts, top-6)": (moe, 2 * rows * TOPK * 3 * H * I),
            "decode attention 20/4 heads D 128, 256 positions, cache from DRAM": attention(256),
            "decode attention 20/4 heads D 128, 4096 positions, cache from DRAM": attention(4096),
            "qmoe int4 g128 (64 experts, top-6), same experts for every row": (moe_shared, 2 * rows * TOPK * 3 * H * I),
            "qgemm int4 g128 [3072, 2560]": (linear(4), 2 * rows * N_LIN * H),
            "qgemm int8 per-channel [3072, 2560]": (linear(8), 2 * rows * N_LIN * H),
            "qgemm int2 g64 [3072, 2560]": (linear(2), 2 * rows * N_LIN * H),
            "bgemm bf16 [3072, 2560]": (bf16(N_LIN, H), 2 * rows * N_LIN * H),
            "bgemm bf16 [6144, 256] (the demo's LM head)": (bf16(6144, 256), 2 * rows * 6144 * 256)}


def timed(fn, lib) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn(lib)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. a commit before a change)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 256])
    ap.add_argument("--isa", nargs="+", default=[i for i in kernels.ISAS if not kernels.isa_why_not(i)])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", nargs="+", default=None, help="run the cases whose name holds one of these words")
    ap.add_argument("--name", default="kernels-ab", help="results file: benchmarks/results/<date>-<name>.md")
    ap.add_argument("--note", default="", help="a sentence for the results file (e.g. a layout change that makes "
                    "the base read this checkout's packed weights differently, so its outputs differ)")
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = [f"Base: `{args.base}`; new: this checkout ({head.strip()}, its working tree). {args.rounds} pairs of "
             "calls a case, base then new, after one untimed call each; speed-up = base time / new time per pair, "
             "median (range). GOP/s: 2 x multiply-adds of the weights actually used, at the median time.", "",
             "| ISA | case | rows | base ms | new ms | new GOP/s | speed-up | outputs |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for isa in args.isa:
            base, new = kernels_at(args.base, isa, work), kernels.library(isa)
            if "ernie45_qmoe" in base.changed:  # a base before the down stack's own bits (its 20th argument)
                at = list(new.ernie45_qmoe.argtypes)
                base.ernie45_qmoe.argtypes, base.ernie45_qmoe.restype = at[:19] + at[20:], new.ernie45_qmoe.restype
            if base.changed - {"ernie45_qmoe", "ernie45_qgemm_xblock", "QSet", "LayerPlan"}:  # the ones unused here
                raise SystemExit(f"{args.base}'s kernels have other signatures: {sorted(base.changed)}")
            for rows in args.rows:
                for name, (fn, ops) in cases(rows, torch.Generator().manual_seed(rows)).items():
                    if args.only and not any(w in name for w in args.only):
                        continue
                    a, b = fn(base), fn(new)
                    diff = (a.float() - b.float()).abs().max().item()
                    same = "identical" if diff == 0 else f"max diff {diff:.3g}"
                    tb, tn, r = [], [], []
                    for _ in range(args.rounds):
                        x, y = timed(fn, base), timed(fn, new)
                        tb.append(x), tn.append(y), r.append(x / y)
                    line = (f"| {isa} | {name} | {rows} | {1e3 * median(tb):.2f} | "
                            f"{1e3 * median(tn):.2f} | {ops / median(tn) / 1e9:.0f} | "
                            f"{median_range(r, unit='x')} | {same} |")
                    print(line, flush=True)
                    lines.append(line)
    if args.note:
        lines += ["", args.note]
    print(write_result(args.name, "\n".join(lines)))


if __name__ == "__main__":
    main()
