"""Cost of structured output per decode step: constrained (llguidance token mask) vs unconstrained.

    python benchmarks/bench_structured.py [--model demo] [--rounds 5] [--steps 40]

For batch 1 and 8 on the same engine, rounds alternate unconstrained and constrained runs (temperature 1,
seeded). The constraint is a JSON schema (an array of exactly 60 integers, so every sequence decodes for
the whole measured window). Per step: the engine step's wall time (median over the decode steps where all
sequences are running), and the time inside the logits-processor hook (mask computation + application).
Reports the median of the paired per-round ratios and their range. Writes
benchmarks/results/2026-12-04-structured.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 60,
          "maxItems": 60}


def run(engine, batch: int, constrained: bool, steps: int, seed: int, hook_times: list
        ) -> tuple[float, float, float]:
    """(median step ms, median hook ms, fastest step ms) over `steps` decode steps with `batch` running."""
    from ernie45.engine.sampling_params import SamplingParams

    tok = engine.tokenizer
    prompt = tok.encode("The numbers are")
    for i in range(batch):
        p = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=seed * 100 + i, ignore_eos=True,
                           structured={"json": SCHEMA} if constrained else None)
        engine.add_request(f"r{seed}-{constrained}-{i}", prompt, p)
    step_ms, hook_ms = [], []
    while engine.has_unfinished_requests():
        hook_times.clear()
        decoding = len(engine.scheduler.running) == batch and not engine.scheduler.waiting and all(
            not s.is_prefill for s in engine.scheduler.running)
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if decoding and len(step_ms) < steps:
            step_ms.append(dt * 1e3)
            hook_ms.append(sum(hook_times) * 1e3)
    return statistics.median(step_ms), statistics.median(hook_ms), min(step_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "2026-12-04-structured.md"))
    args = ap.parse_args()
    import torch

    import ernie45.engine.sampler as sampler_mod
    from benchmarks.lm_eval_check import cpu_name
    from ernie45.engine.llm import LLMEngine

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hook_times: list[float] = []
    inner = sampler_mod.apply_processors

    def timed(logits, seqs):  # noqa: ANN001
        t = time.perf_counter()
        inner(logits, seqs)
        hook_times.append(time.perf_counter() - t)

    sampler_mod.apply_processors = timed
    engine = LLMEngine(args.model, dtype="bfloat16", kv_cache_memory="256MB")
    run(engine, 1, True, 5, 999, hook_times)  # warm up: first grammar, tokenizer table, kernels
    rows = {}
    for batch in (1, 8):
        res = {False: [], True: []}
        for r in range(args.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                res[constrained].append(run(engine, batch, constrained, args.steps, r, hook_times))
        ratios = [c[0] / u[0] for u, c in zip(res[False], res[True])]
        rows[batch] = (res, ratios)
    cmd = "python benchmarks/bench_structured.py " + " ".join(sys.argv[1:])
    lines = ["# Structured output: cost per decode step, constrained vs unconstrained", "",
             f"Command: `{cmd.strip()}`; machine: {cpu_name()}, {torch.get_num_threads()} threads; "
             f"model `{args.model}` (bf16); torch {torch.__version__}", "",
             "Constraint: JSON schema, an array of exactly 60 integers 0-999 (llguidance mask over the "
             "6144-token vocabulary, applied for the whole batch in one masked_fill). Unconstrained: the same "
             "requests without it. Rounds alternate the order; step = one `LLMEngine.step()` with every "
             f"sequence decoding; median over {args.steps} steps per run.", "",
             "The added work of a constrained step is the hook (the matcher consuming the new token, the mask "
             "computed in llguidance, the batch bitmask applied); it is timed inside the step, so it is the "
             "steady figure. Whole-step times on this shared machine swing several-fold between runs (other "
             "jobs use the same 2 cores), so the fastest step of each mode is shown beside the medians.", "",
             "| batch | mask hook ms/step | hook / fastest unconstrained step | fastest step ms: unconstrained / "
             "constrained | median step ms: unconstrained / constrained | step ratio (median of paired rounds, "
             "range) |", "|---|---|---|---|---|---|"]
    for batch, (res, ratios) in rows.items():
        u = statistics.median(x[0] for x in res[False])
        c = statistics.median(x[0] for x in res[True])
        h = statistics.median(x[1] for x in res[True])
        fu, fc = min(x[2] for x in res[False]), min(x[2] for x in res[True])
        lines.append(f"| {batch} | {h:.2f} | {100 * h / fu:.1f}% | {fu:.2f} / {fc:.2f} | {u:.2f} / {c:.2f} | "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    lines += ["", "Raw (median step ms, hook ms, fastest step ms) per round:", ""]
    for batch, (res, _) in rows.items():
        for constrained in (False, True):
            vals = ", ".join(f"({s:.2f}, {h:.2f}, {f:.2f})" for s, h, f in res[constrained])
            lines.append(f"- batch {batch} {'constrained' if constrained else 'unconstrained'}: {vals}")
    lines.append("")
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
