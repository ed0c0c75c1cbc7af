"""Calibrated (GPTQ) against round-to-nearest quantization on held-out text, as a user would run it.

The bundled demo model (``ernie45.load_model("demo")``, bf16), the README's call
``quantize_model(model, QuantConfig.from_name("int2", method="gptq"), calibration=ids)``, and its own corpus
(``data/corpus/*.jsonl``) split by document (``quality.split_documents``, seed 0): calibration ids from one
half, evaluation (``--eval-tokens`` tokens in sequences of 128) from documents of the other half that the
calibration never saw. Metric: mean next-token KL(bf16 model || quantized) over every evaluated position
(``quality.compare``). Every arm of a table stores the same bits per weight (same formats, same group sizes,
same bf16 scale and zero per group); only the way codes and grids are chosen differs.

- ``sizes``: int2 and int4 presets; RTN (min/max grid), MSE (``method="mse"``: a data-free clipping search
  plus least-squares refit of each group's grid, i.e. RTN with a scale search), and GPTQ with 512 / 2,048 /
  8,192 calibration tokens.
- ``ablation`` (int2, 2,048 calibration tokens): the GPTQ pipeline as it was before 2026-12-04 (routed experts
  only, Hessians from the float model, min/max grid, no expert prior) and each change added in turn, plus
  "calibrated RTN": the same searched and refitted grids with a diagonal Hessian, i.e. no error feedback.
  The earlier pipeline is reproduced with the current code's switches (``_variant``).

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_gptq.py [--parts sizes ablation] [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob
import os
import sys
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ernie45  # noqa: E402
import ernie45.quant.gptq as gptq  # noqa: E402
import ernie45.quant.quantize as quantize_mod  # noqa: E402
from benchmarks.common import commit, machine  # noqa: E402
from ernie45.assets import demo_path  # noqa: E402
from ernie45.quant import QuantConfig, quantize_model  # noqa: E402
from ernie45.quant.quality import compare, split_documents  # noqa: E402
from ernie45.quant.scheme import TensorScheme  # noqa: E402
from ernie45.tokenizer import Tokenizer  # noqa: E402
from ernie45.train.data import read_texts  # noqa: E402


def corpus() -> list[str]:
    return [t for p in sorted(glob.glob(os.path.join(ROOT, "data", "corpus", "*.jsonl"))) for t in read_texts(p)]


@contextlib.contextmanager
def _variant(prior: float | None = None, sequential: bool = True, diagonal: bool = False,
             **gptq_kw: object) -> Iterator[None]:
    """Run quantize_model with GPTQ switched as asked: ``gptq_kw`` for ``quantize_gptq`` (search, refit,
    act_order, damp), the expert prior, ``sequential=False`` (every Hessian from the full-precision model:
    nothing quantized is written back during calibration) and ``diagonal`` (the Hessian's off-diagonal
    dropped: grids searched and refitted as GPTQ's, no error feedback)."""
    old = quantize_mod.quantize_gptq, gptq.PRIOR_TOKENS, gptq.calibrate
    base = functools.partial(old[0], **gptq_kw)

    def quantize_one(w, h, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        return base(w, torch.diag(torch.diag(h)) if diagonal and h is not None else h, *args, **kw)

    def calibrate(model, names, ids, quantize, finish, **kw):  # noqa: ANN001, ANN003, ANN202
        return old[2](model, names, ids, lambda n, p, m, h, wb: quantize(n, p, m, h, wb and sequential),
                      finish, **kw)

    quantize_mod.quantize_gptq = quantize_one
    gptq.PRIOR_TOKENS = old[1] if prior is None else prior
    gptq.calibrate = calibrate
    try:
        yield
    finally:
        quantize_mod.quantize_gptq, gptq.PRIOR_TOKENS, gptq.calibrate = old


def measure(model: torch.nn.Module, config: QuantConfig, calib: torch.Tensor | None, held: torch.Tensor
            ) -> tuple[float, float, float]:
    """(KL, perplexity, seconds to quantize) of ``config`` against the unquantized model."""
    t0 = time.perf_counter()
    q = quantize_model(copy.deepcopy(model), config, progress=False, calibration=calib)
    dt = time.perf_counter() - t0
    r = compare(model, q, held)
    return r["kl"], r["ppl"], dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["sizes", "ablation"], choices=["sizes", "ablation"])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(demo_path())
    texts = corpus()
    model = ernie45.load_model("demo")
    splits = {n: split_documents(texts, tok, n, args.eval_tokens) for n in sorted({*args.sizes, 2048})}
    held = splits[2048][1]
    assert all(torch.equal(h, held) for _, h in splits.values())  # one evaluation set for every arm
    base = compare(model, model, held)
    print(f"# bench_gptq\n\n- machine: {machine()}\n- commit: {commit()}\n- command: `{' '.join(sys.argv)}`\n"
          f"- demo model bf16, {len(texts)} corpus documents, evaluation {held.numel()} tokens "
          f"({held.shape[0]} x {held.shape[1]}), unquantized perplexity {base['ppl']:.2f}\n")
    if "sizes" in args.parts:
        print("| preset | method | calibration tokens | KL (nats) | KL RTN / KL | ppl | quantize s |")
        print("|---|---|---|---|---|---|---|")
        for preset in ("int2", "int4"):
            rtn = measure(model, QuantConfig.from_name(preset), None, held)
            mse = measure(model, QuantConfig.from_name(preset, method="mse"), None, held)
            rows = [("RTN", "-", rtn), ("MSE (data-free scale search)", "-", mse)]
            for n in args.sizes:
                rows.append(("GPTQ", str(n), measure(model, QuantConfig.from_name(preset, method="gptq"),
                                                     splits[n][0], held)))
            for method, n, (kl, ppl, dt) in rows:
                print(f"| {preset} | {method} | {n} | {kl:.5f} | {rtn[0] / kl:.2f} | {ppl:.2f} | {dt:.1f} |",
                      flush=True)
    if "ablation" in args.parts:
        calib = splits[2048][0]
        preset = QuantConfig.from_name("int2", method="gptq")
        experts_only = QuantConfig(preset.experts, TensorScheme(4, 128), preset.head, name="int2")
        old = dict(search=False, refit=False, prior=0.0, sequential=False)
        arms = [
            ("RTN (plain min/max grid)", QuantConfig.from_name("int2"), None, {}),
            ("MSE: data-free scale search + refit", QuantConfig.from_name("int2", method="mse"), None, {}),
            ("calibrated RTN: GPTQ's search + refit, diagonal H (no error feedback)", preset, calib,
             dict(diagonal=True)),
            ("a. GPTQ before: routed experts only, float Hessians, min/max grid, no prior", experts_only,
             calib, old),
            ("b. a + dense int4 linears (attention, shared experts, layer 0 MLP) calibrated", preset, calib,
             old),
            ("c. b + sequential (Hessians of the quantized model's activations)", preset, calib,
             {**old, "sequential": True}),
            ("d. c + expert Hessians shrunk to the layer mean (prior 64 tokens)", preset, calib,
             dict(search=False, refit=False)),
            ("e. d + H-diagonal-weighted clipping search", preset, calib, dict(refit=False)),
            ("f. e + least-squares grid refit = current default", preset, calib, {}),
            ("f without sequential", preset, calib, dict(sequential=False)),
            ("f without the expert prior", preset, calib, dict(prior=0.0)),
            ("f with prior 256 tokens", preset, calib, dict(prior=256.0)),
            ("f with act-order (static groups)", preset, calib, dict(act_order=True)),
            ("f with damp 0.1", preset, calib, dict(damp=0.1)),
        ]
        print("\n| int2 arm (2,048 calibration tokens) | KL (nats) | KL RTN / KL | ppl | quantize s |")
        print("|---|---|---|---|---|")
        rtn_kl = None
        for label, config, ids, switches in arms:
            with _variant(**switches):
                kl, ppl, dt = measure(model, config, ids, held)
            rtn_kl = rtn_kl or kl
            print(f"| {label} | {kl:.5f} | {rtn_kl / kl:.2f} | {ppl:.2f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
