"""lm-eval drives `ernie45 serve` through its `local-completions` model; its log-likelihoods must equal
scoring the same continuations with `load_model` directly (within 1e-4).

    pip install 'ernie45[eval]'    # lm-eval==0.4.13
    python benchmarks/lm_eval_check.py [--model demo] [--dtype float32]

Starts the server in this process (real uvicorn + engine thread), runs lm-eval on the repository's
20-question multiple-choice task (benchmarks/lm_eval_task/), with lm-eval's remote tokenizer reading our
/tokenize and /detokenize, then recomputes every (context, continuation) pair lm-eval scored:
one forward of context + continuation through the reference model, the sum of the continuation tokens'
fp32 log-softmax. Writes benchmarks/results/2026-12-04-lm-eval.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
TASK_DIR = os.path.join(HERE, "lm_eval_task")
TASK = "ernie45_mini_mc"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (lm_eval/api/model.py `_encode_pair`): trailing context spaces join the continuation;
    the pair is encoded whole and the context's tokens cut off the front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def direct_score(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    logp = model(ids).logits[0].float().log_softmax(-1)  # [T, V]
    rows = logp[len(ctx) - 1:len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "2026-12-04-lm-eval.md"))
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import ernie45
    from ernie45.model.checkpoint import resolve_model_path
    from ernie45.serve import ServerThread, build_app, build_engine
    from ernie45.tokenizer import load_tokenizer

    tmp = tempfile.mkdtemp(prefix="lmeval-task-")
    try:
        with open(os.path.join(TASK_DIR, f"{TASK}.yaml"), encoding="utf-8") as f:
            yaml_text = f.read().replace("test: questions.jsonl",
                                         f"test: {os.path.join(TASK_DIR, 'questions.jsonl')}")
        with open(os.path.join(tmp, f"{TASK}.yaml"), "w", encoding="utf-8") as f:
            f.write(yaml_text)
        engine = build_engine(args.model, dtype=args.dtype, kv_cache_memory="256MB")
        t0 = time.perf_counter()
        with ServerThread(build_app(engine, "served")) as srv:
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"base_url": srv.url + "/v1/completions", "model": "served",
                            "tokenizer_backend": "remote", "tokenized_requests": True, "num_concurrent": 1,
                            "max_retries": 1},
                tasks=[TASK], task_manager=TaskManager(include_path=tmp), log_samples=True)
        served_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    folder = resolve_model_path(args.model)
    tok = load_tokenizer(folder)
    model = ernie45.load_model(folder, dtype=getattr(torch, args.dtype)).eval()
    diffs, greedy_same, rows = [], 0, []
    correct = 0
    samples = results["samples"][TASK]
    for s in samples:
        lls = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            served_ll, served_greedy = resp[0]
            ctx, cont = encode_pair(tok, context, continuation)
            ll, greedy = direct_score(model, ctx, cont)
            diffs.append(abs(ll - served_ll))
            greedy_same += greedy == served_greedy
            lls.append(ll)
            if len(rows) < 8:
                rows.append((s["doc_id"], continuation.strip(), len(cont), served_ll, ll))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    n = len(diffs)
    acc = results["results"][TASK]["acc,none"]
    ok = max(diffs) < 1e-4 and greedy_same == n and abs(acc - correct / len(samples)) < 1e-9
    cmd = "python benchmarks/lm_eval_check.py " + " ".join(sys.argv[1:])
    lines = [
        "# lm-eval `local-completions` against `ernie45 serve`, checked against direct scoring",
        "",
        f"Command: `{cmd.strip()}` (lm-eval {lm_eval.__version__}, torch {torch.__version__})",
        f"Machine: {cpu_name()}; model `{args.model}`, dtype {args.dtype}",
        "",
        f"lm-eval ran the repository's task `{TASK}` (benchmarks/lm_eval_task/, {len(samples)} questions x "
        "4 choices) through the server: /v1/completions with token-id prompts, `echo`, `logprobs=1`, "
        "`max_tokens=1`; lm-eval's remote tokenizer used the server's /tokenize, /detokenize and "
        f"/tokenizer_info. Served run: {served_s:.1f} s.",
        "",
        "Each (context, continuation) lm-eval scored was recomputed with `load_model` + one forward of the "
        "reference model (sum of the continuation tokens' fp32 log-softmax), split into tokens as lm-eval does.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| log-likelihoods compared | {n} |",
        f"| max abs difference served vs direct | {max(diffs):.3e} |",
        f"| mean abs difference | {sum(diffs) / n:.3e} |",
        f"| is_greedy equal | {greedy_same} / {n} |",
        f"| accuracy (lm-eval acc) | {acc:.3f} |",
        f"| accuracy from the direct scores | {correct / len(samples):.3f} |",
        f"| result | {'PASS: equal within 1e-4' if ok else 'FAIL'} |",
        "",
        "First rows (doc, continuation, its tokens, served log-likelihood, direct):",
        "",
        "| doc | continuation | tokens | served | direct |",
        "|---|---|---|---|---|",
        *[f"| {d} | {c} | {k} | {a:.6f} | {b:.6f} |" for d, c, k, a, b in rows],
        "",
        "The demo model is a tiny toy, so its accuracy means nothing; the point is that a harness scoring "
        "through the server gets the model's exact numbers.",
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp_out, args.out)
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
