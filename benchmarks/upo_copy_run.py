"""The UPO copy demo as recorded in benchmarks/results/2026-12-04-upo.md: UPOTrainer steps with held-out greedy
exact match every 50 steps (printed; the 10-step means of reward / group std / length / KL likewise).

    python scripts/make_upo_task.py --task digits --out /tmp/upo_copy      # train/held/warmup.jsonl
    ernie45 train sft --config recipes/upo_copy_warmup.yaml                 # (data path: /tmp/upo_copy/warmup.jsonl)
    CHAT=/tmp/upo_copy OMP_NUM_THREADS=1 python benchmarks/upo_copy_run.py B2 copy 2 1000 \
        'init_from="runs/upo_copy_warmup/final"' 'upo.stop=[]' 'upo.max_new_tokens=4'

Base settings: recipes/upo.yaml with the overrides given as key=json (upo.* for the upo mapping), the reward
scripts/make_upo_task.py:digit_match; recipes/upo_copy.yaml is the same configuration as one recipe.
Without CHAT it builds raw-text prompts ("Copy: 37\nAnswer: ") with make_digits.
"""
import json
import os
import sys
import time

sys.path.insert(0, "scripts")
from make_upo_task import make_digits  # noqa: E402

from ernie45.train.recipe import TrainConfig  # noqa: E402
from ernie45.train.upo import UPOTrainer  # noqa: E402


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    name, op, length, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    over = dict(a.split("=", 1) for a in sys.argv[5:])
    out = f"/tmp/upo_runs/{name}"
    os.makedirs(out, exist_ok=True)
    chat = os.environ.get("CHAT")
    if chat:
        train, held = read(f"{chat}/train.jsonl"), read(f"{chat}/held.jsonl")
    else:
        train, held = make_digits(op, length, 20 if length == 2 else 100, 0)
    with open(f"{out}/train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    cfg = TrainConfig.from_yaml("recipes/upo.yaml", output_dir=out + "/run")
    cfg.data = [f"{out}/train.jsonl"]
    cfg.upo["rewards"] = [{"type": "python", "function": "scripts/make_upo_task.py:digit_match", "weight": 1.0}]
    cfg.upo["max_new_tokens"] = length + 2
    cfg.max_steps, cfg.plot = steps, False
    for k, v in over.items():
        if k.startswith("upo."):
            cfg.upo[k[4:]] = json.loads(v)
        else:
            setattr(cfg, k, json.loads(v))
    tr = UPOTrainer(cfg)
    tok = tr.tokenizer

    def encode(p: str | list[dict]) -> list[int]:
        text = p if isinstance(p, str) else tok.apply_chat_template(p, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def evaluate() -> tuple[float, list[str]]:  # greedy exact match on the held-out prompts
        groups, _ = tr.rollout.generate([encode(r["prompt"]) for r in held], 1, [0] * len(held),
                                        max_new_tokens=length + 2, temperature=0.0, stop=["\n"])
        ans = [g[0].text.strip() for g in groups]
        return sum(a == r["answer"] for a, r in zip(ans, held)) / len(held), ans[:8]

    print("before", evaluate(), flush=True)
    t0, rows = time.time(), []
    for s in range(steps):
        rows.append(tr.train_step())
        if (s + 1) % 10 == 0:
            w = rows[-10:]
            mean = {k: sum(x.get(k, 0.0) for x in w) / len(w)
                    for k in ("reward_mean", "reward_group_std", "completion_len", "kl")}
            print(s + 1, round(time.time() - t0), f"R {mean['reward_mean']:.3f} gstd {mean['reward_group_std']:.3f} "
                  f"len {mean['completion_len']:.2f} kl {mean['kl']:.3f}", flush=True)
        if (s + 1) % 50 == 0:
            print("eval", evaluate(), flush=True)
    print("after", evaluate(), flush=True)


if __name__ == "__main__":
    main()
