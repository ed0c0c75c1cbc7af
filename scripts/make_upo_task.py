"""Prompts and partial-credit rewards for the UPO learning demo on the bundled demo model.

Two verifiable tasks the demo model (a fortune/poem babbler) cannot do at the start (exact match 0/128
samples in our probes):

- ``add`` (the demo in ``recipes/upo.yaml``): ``"3 + 4 = "`` -> ``"7"`` for operands 0..``--max-operand``.
  ``closeness`` gives credit from the first step: 0.5 x max(0, 1 - |x - answer| / 5) for the number x the
  completion starts with (a quarter of the demo model's samples start with a digit), halved unless the
  completion is that number alone. The built-in ``exact`` verifier adds 1.0 for the right answer.
- ``copy``: ``"Repeat the word: river\\nAnswer:"`` -> ``"river"``; ``similarity`` gives 1.0 for the word,
  else 0.5 x difflib's similarity ratio of the stripped completion and the word.

    python scripts/make_upo_task.py --task add --out data/upo_add.jsonl [--max-operand 4]
    python scripts/make_upo_task.py --task copy --out data/upo_copy.jsonl [--words 48] [--seed 0]
    python scripts/make_upo_task.py --eval MODEL --out data/upo_add.jsonl    # accuracy of a model on the prompts
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re

# Short common English words; every one occurs in the demo's fortune corpus.
WORDS = [
    "apple", "river", "moon", "green", "seven", "house", "light", "water", "stone", "heart", "night", "money",
    "friend", "world", "happy", "bird", "dream", "music", "paper", "glass", "horse", "table", "tree", "cloud",
    "bread", "smile", "north", "honey", "queen", "tiger", "ocean", "lemon", "chair", "storm", "dance", "garden",
    "silver", "window", "sugar", "candle", "winter", "summer", "flower", "doctor", "letter", "orange", "mountain",
    "thunder",
]
TEMPLATE = "Repeat the word: {word}\nAnswer:"


def similarity(prompt: str, completion: str, record: dict) -> float:
    """Partial credit for copying ``record['answer']`` (see the module docstring)."""
    got, want = completion.strip(), str(record["answer"])
    if got == want:
        return 1.0
    return 0.5 * difflib.SequenceMatcher(None, got, want).ratio()


_LEADING_INT = re.compile(r"\s*(-?\d+)")


def closeness(prompt: str, completion: str, record: dict) -> float:
    """Partial credit for an addition answer (see the module docstring)."""
    m = _LEADING_INT.match(completion)
    if not m:
        return 0.0
    x, want = int(m.group(1)), int(record["answer"])
    credit = 0.5 * max(0.0, 1.0 - abs(x - want) / 5)
    return credit if completion.strip() == m.group(1) else credit / 2


DIGITS_TEMPLATE = "{op}: {digits}\nAnswer: "


def digit_match(prompt: str, completion: str, record: dict) -> float:
    """Per-position credit for a digit-string answer: the share of positions where the stripped completion
    has the answer's character, over the longer of the two (an extra or a missing character costs its share).
    A constant or random answer scores 1/10 per position on average, whatever it is."""
    got, want = completion.strip(), str(record["answer"])
    if not got:
        return 0.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def make_digits(op: str, length: int, holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Every ``length``-digit string (leading zeros included) as a prompt ``"Copy: 371\nAnswer: "`` -> ``"371"``
    (op copy) or ``"Reverse: 371\nAnswer: "`` -> ``"173"`` (op reverse); a seeded random ``holdout`` of them
    is set aside for evaluation. Returns (train, held out)."""
    if op not in ("copy", "reverse"):
        raise ValueError(f"--op {op!r}: choose copy or reverse")
    if not 1 <= length <= 4:
        raise ValueError(f"--length {length}: choose 1..4")
    strings = [str(i).zfill(length) for i in range(10 ** length)]
    if not 0 <= holdout < len(strings):
        raise ValueError(f"--holdout {holdout}: choose 0..{len(strings) - 1} (there are {len(strings)} strings)")
    random.Random(seed).shuffle(strings)
    rows = [{"prompt": DIGITS_TEMPLATE.format(op=op.capitalize(), digits=s),
             "answer": s if op == "copy" else s[::-1]} for s in strings]
    return rows[holdout:], rows[:holdout]


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def write_digits_chat(out_dir: str, op: str, length: int, holdout: int, seed: int) -> None:
    """The copy/reverse demo as chat prompts: ``train.jsonl`` / ``held.jsonl`` (UPO prompts and held-out
    evaluation) and ``warmup.jsonl``, SFT chats that teach only the answer *format*: each training prompt
    answered with a random digit string of the right length (seed + 1), so after the warm-up the model
    answers in the format at chance level on the task (1/10 per digit)."""
    train, held = make_digits(op, length, holdout, seed)
    def chat(r: dict) -> list[dict]:
        return [{"role": "user", "content": r["prompt"].split("\n")[0]}]
    rng = random.Random(seed + 1)
    write_jsonl(os.path.join(out_dir, "train.jsonl"), [{"prompt": chat(r), "answer": r["answer"]} for r in train])
    write_jsonl(os.path.join(out_dir, "held.jsonl"), [{"prompt": chat(r), "answer": r["answer"]} for r in held])
    rand = [str(rng.randrange(10 ** length)).zfill(length) for _ in train]
    write_jsonl(os.path.join(out_dir, "warmup.jsonl"),
                [{"messages": chat(r) + [{"role": "assistant", "content": a}]} for r, a in zip(train, rand)])


def make_add(max_operand: int) -> list[dict]:
    if not 1 <= max_operand <= 99:
        raise ValueError(f"--max-operand {max_operand}: choose 1..99")
    return [{"prompt": f"{a} + {b} = ", "answer": str(a + b)}
            for a in range(max_operand + 1) for b in range(max_operand + 1)]


def make(num_words: int, seed: int) -> list[dict]:
    if not 1 <= num_words <= len(WORDS):
        raise ValueError(f"--words {num_words}: choose 1..{len(WORDS)}")
    words = random.Random(seed).sample(WORDS, num_words)
    return [{"prompt": TEMPLATE.format(word=w), "answer": w} for w in words]


def evaluate(model: str, path: str, samples: int = 8) -> dict:
    """Exact-match rate of ``model`` (a folder or 'demo') on the prompts in ``path``: greedy, and over
    ``samples`` samples at temperature 1; plus the greedy answers."""
    from ernie45 import LLM, SamplingParams

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    llm = LLM(model, dtype="float32", enable_prefix_caching=False)
    tok = llm.engine.tokenizer
    prompts, stop_ids, names = [], None, []
    for r in rows:
        if isinstance(r["prompt"], list):  # chat messages (--task digits): encoded as the UPO trainer does, and
            # stopped on <|end_of_sentence|> as its rollouts are
            text = tok.apply_chat_template(r["prompt"], add_generation_prompt=True)
            prompts.append(tok.encode(text, add_special_tokens=False))
            stop_ids = list(tok.stop_token_ids)
            names.append(r["prompt"][-1]["content"])
        else:
            prompts.append(r["prompt"])
            names.append(r["prompt"].strip())
    greedy = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, stop=["\n"], stop_token_ids=stop_ids))
    sampled = llm.generate(prompts, [SamplingParams(max_tokens=6, temperature=1.0, n=samples, seed=i, stop=["\n"],
                                                    stop_token_ids=stop_ids) for i in range(len(prompts))])
    g = [o.outputs[0].text.strip() for o in greedy]
    return {"model": model, "prompts": len(rows),
            "greedy_exact": sum(a == r["answer"] for a, r in zip(g, rows)) / len(rows),
            "sampled_exact": sum(c.text.strip() == r["answer"] for o, r in zip(sampled, rows) for c in o.outputs)
            / (len(rows) * samples),
            "greedy_answers": dict(zip(names, g))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["add", "copy", "digits"], default="add")
    ap.add_argument("--op", choices=["copy", "reverse"], default="copy", help="--task digits: copy or reverse")
    ap.add_argument("--length", type=int, default=2, help="--task digits: digits per string")
    ap.add_argument("--holdout", type=int, default=20, help="--task digits: strings kept for evaluation")
    ap.add_argument("--out", default="data/upo_add.jsonl")
    ap.add_argument("--max-operand", type=int, default=4)
    ap.add_argument("--words", type=int, default=len(WORDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", metavar="MODEL", help="score MODEL on the prompts in --out instead of writing them")
    args = ap.parse_args()
    if args.eval:
        print(json.dumps(evaluate(args.eval, args.out), ensure_ascii=False))
        return
    if args.task == "digits":  # --out is a folder: train.jsonl, held.jsonl, warmup.jsonl
        write_digits_chat(args.out, args.op, args.length, args.holdout, args.seed)
        print(f"{args.op} {args.length} digits -> {args.out}/{{train,held,warmup}}.jsonl")
        return
    rows = make_add(args.max_operand) if args.task == "add" else make(args.words, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, args.out)
    print(f"{len(rows)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
