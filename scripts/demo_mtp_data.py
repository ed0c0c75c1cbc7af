"""Training text for the demo's MTP head: the demo model's own continuations of corpus prompts (self-distillation).

A draft is accepted when it agrees with what the model itself generates, so the head learns best on text the model
writes: greedy continuations (what `--speculative-tokens` meets at temperature 0, past the end-of-text token too, as
the benchmark's ignore_eos requests) and sampled ones at the demo's default temperature/top_p. Prompts are the first
line (cut at 20-80 characters) of fortune and poem records and the opening of a Bible chapter's text (after its
heading; the same cut); the records the benchmark and the acceptance check prompt with
(``PROMPT_LINES`` below, and ``held_out``) are left out. Writes JSONL {"text": prompt + continuation}, atomically.

    python scripts/demo_mtp_data.py runs/demo_sft/final runs/demo_mtp_data.jsonl [--prompts 768] [--max-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ernie45.engine.llm import LLMEngine
from ernie45.engine.sampling_params import SamplingParams
from ernie45.utils import atomic_write_text

FORTUNES, POEMS, KJV = "data/corpus/en_fortunes.jsonl", "data/corpus/zh_poems.jsonl", "data/corpus/en_kjv.jsonl"


def held_out(i: int) -> bool:
    """Fortune records kept out of the MTP head's training text: the benchmark's (benchmarks/bench_spec.py takes
    i % 97 == 5) and the acceptance check's (i % 97 == 50)."""
    return i % 97 in (5, 50)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for path in (FORTUNES, POEMS, KJV):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if path == FORTUNES and held_out(i):
                    continue
                text = json.loads(line)["text"]
                first = text.split("\n\n", 1)[-1] if path == KJV else text.split("\n")[0]
                out.append(first[:rng.randint(20, 80)])
    rng.shuffle(out)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the demo model to continue with (runs/demo_sft/final)")
    ap.add_argument("out", help="JSONL to write")
    ap.add_argument("--prompts", type=int, default=768)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    eng = LLMEngine(args.model, kv_cache_memory="512MB", max_num_seqs=64)
    ps = prompts(args.prompts, args.seed)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for i, p in enumerate(ps):  # two thirds greedy, one third sampled with the demo's defaults
        params = greedy if i % 3 else SamplingParams(temperature=0.8, top_p=0.8, max_tokens=args.max_tokens,
                                                     seed=args.seed * 100003 + i)
        eng.add_request(str(i), p, params)
    texts: dict[int, str] = {}
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                texts[int(o.request_id)] = ps[int(o.request_id)] + o.outputs[0].text
    lines = "".join(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n" for i in range(len(ps)))
    atomic_write_text(args.out, lines)
    print(f"{args.out}: {len(ps)} continuations in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
