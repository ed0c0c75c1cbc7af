"""Where a speculative step's time goes on the demo: wall time per part of ``LLMEngine.step`` (timers around the
runner's forward, the verification, the MTP passes, the LM head), per step, for plain decoding and k drafts.

    flock /tmp/ernie45-heavy.lock python benchmarks/spec_split.py [--ks 0 1 2 4] [--batch 1] [--threads 1]
        [--quant int8]

Prints one block per k; the parts overlap (``propose`` holds ``mtp1``, ``draft_pos`` and ``mtp_draft``; the LM head
runs inside the forwards).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from bench_spec import demo_prompts, run_demo  # noqa: E402 - benchmarks/ is the script's folder

from ernie45.engine.llm import LLMEngine


def split(k: int, batch: int, max_tokens: int,
          quant: str | None = None) -> tuple[float, int, dict[str, tuple[float, float]]]:
    """(tokens/s, steps, part -> (ms a step, calls a step)) of one run after a warm-up."""
    eng = LLMEngine("demo", kv_cache_memory="256MB", speculative_tokens=k, **({"quant": quant} if quant else {}))
    prompts = demo_prompts(batch)
    run_demo(eng, prompts, 8)
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(obj: object, name: str, key: str) -> None:
        f = getattr(obj, name)

        def g(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            r = f(*a, **kw)
            spent[key] += time.perf_counter() - t0
            calls[key] += 1
            return r
        setattr(obj, name, g)

    for obj, name, key in [(eng.scheduler, "schedule", "schedule"), (eng.runner, "execute", "forward (verify)"),
                           (eng, "_sample_speculative", "verify + append"), (eng, "_propose", "propose"),
                           (eng.runner, "mtp", "mtp1"), (eng.runner, "mtp_draft", "mtp_draft"),
                           (eng.runner, "draft_positions", "draft_pos"), (eng.sampler, "__call__", "sampler"),
                           (eng.model.lm_head, "forward", "lm_head")]:
        if hasattr(obj, name):
            timed(obj, name, key)
    steps = 0
    step = eng.step

    def counted():  # noqa: ANN202
        nonlocal steps
        steps += 1
        return step()
    eng.step = counted
    tok_s, _, _ = run_demo(eng, prompts, max_tokens)
    return tok_s, steps, {key: (1e3 * spent[key] / steps, calls[key] / steps) for key in spent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant", default=None, help="load the demo quantized with this preset (all layers native)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for k in args.ks:
        tok_s, steps, parts = split(k, args.batch, args.max_tokens, args.quant)
        print(f"k={k} batch {args.batch}: {tok_s:.0f} tok/s, {steps} steps, "
              f"{1e3 * args.batch * args.max_tokens / tok_s / steps:.2f} ms a step")
        for key, (ms, n) in parts.items():
            print(f"  {key:18s} {ms:6.3f} ms a step ({n:.1f} calls a step)")


if __name__ == "__main__":
    main()
