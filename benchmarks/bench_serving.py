"""Serving benchmark: `ernie45 serve` vs `transformers serve --continuous-batching` on the same checkpoint.

Like `vllm bench serve --dataset-name random` / FastDeploy's benchmark_serving.py: a fixed set of random
prompts per concurrency level (1, 4, 16, 64), streamed over /v1/completions, greedy. Per request TTFT
(time to the first streamed text), TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end latency;
per level output tokens/s, and TTFT/TPOT at p50/p90/p99 (the names vLLM and FastDeploy publish). Output
token counts come from the servers' own `usage`. Each server runs alone as a subprocess (2 CPU threads).

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py                  # 0.3B-shaped model
    flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py --model demo --no-peer

Writes benchmarks/results/<date>-serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORDS = ("the a model token text engine quick brown fox jumps over lazy dog cache memory expert layer attention "
         "streaming server request answer question hello world python code tensor batch").split()


def make_checkpoint(folder: str, preset: str, layers: int | None) -> str:
    """A random-weight checkpoint of a preset's shape, vocabulary cut to a small trained SentencePiece."""
    import sentencepiece as spm
    import torch

    import ernie45
    from ernie45.config import ModelConfig
    from tests.serve.util import write_tokenizer

    os.makedirs(folder, exist_ok=True)
    write_tokenizer(folder, vocab_size=400)
    vocab = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model")).get_piece_size()
    config = ModelConfig.from_name(preset).replace(vocab_size=vocab, tie_word_embeddings=True)
    if layers:
        config = config.replace(num_hidden_layers=layers)
    model = ernie45.init_weights(ernie45.ErnieForCausalLM(config), std=0.05, seed=0).to(torch.bfloat16)
    ernie45.save_model(model, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `__enter__` waits until /health answers."""

    def __init__(self, cmd: list[str], port: int, log_path: str):
        self.cmd, self.port, self.log_path = cmd, port, log_path

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ROOT}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.log_path}")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        buf = ""
        async for piece in r.aiter_text():
            buf += piece
            # one SSE event per blank-line-terminated block; transformers serve puts raw newlines and control
            # characters inside its JSON strings, so parse whole events, leniently
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                if not event.startswith("data: ") or event == "data: [DONE]":
                    continue
                try:
                    ev = json.loads(event[6:], strict=False)
                except json.JSONDecodeError:  # a blank line inside a token's text split the event: still a token
                    ev = {"choices": [{"text": "?"}]} if '"text"' in event else {}
                if ev.get("usage"):
                    usage = ev["usage"]
                for c in ev.get("choices", []):
                    if c.get("text"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    out = usage["completion_tokens"] if usage else chunks
    ttft = latency if ttft is None else ttft
    return {"ttft": ttft, "latency": latency, "output_tokens": out,
            "prompt_tokens": usage["prompt_tokens"] if usage else None,
            "tpot": (latency - ttft) / (out - 1) if out > 1 else None}


async def run_level(url: str, model: str, concurrency: int, texts: list[str], max_tokens: int,
                    timeout: float = 600) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def go(p: str) -> dict:
            async with sem:
                return await one_request(client, url, model, p, max_tokens)

        t0 = time.perf_counter()
        try:
            res = await asyncio.wait_for(asyncio.gather(*(go(p) for p in texts)), timeout)
        except asyncio.TimeoutError:  # a peer too slow for this level: report it, do not hold the lock for ever
            res = [{"error": f"level did not finish in {timeout:.0f} s"}] * len(texts)
        duration = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]

    def pct(key: str, q: float) -> float:
        vals = sorted(r[key] for r in ok if r[key] is not None)
        return 1000 * vals[min(len(vals) - 1, int(q * len(vals)))] if vals else float("nan")

    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(texts), "failed": len(res) - len(ok),
            "note": res[0]["error"] if not ok else "",
            "duration_s": duration, "output_tokens": out_tokens, "output_tok_s": out_tokens / duration,
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] or 0 for r in ok) if ok else 0,
            **{f"{k}_p{int(q * 100)}_ms": pct(k, q) for k in ("ttft", "tpot") for q in (0.5, 0.9, 0.99)}}


def sweep(name: str, url: str, model: str, levels: list[int], n_prompts: dict, words: int, max_tokens: int,
          timeout: float) -> list:
    rows = []
    asyncio.run(run_level(url, model, 1, prompts(2, words, seed=99), max_tokens))  # warm-up
    for c in levels:
        row = asyncio.run(run_level(url, model, c, prompts(n_prompts[c], words, seed=c), max_tokens, timeout))
        row["server"] = name
        print(f"{name:>14} c={c:<3} {row['output_tok_s']:8.1f} out tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} ms  "
              f"TPOT p50 {row['tpot_p50_ms']:7.1f} ms  failed {row['failed']} {row['note']}", flush=True)
        rows.append(row)
        if row["note"]:
            break  # higher concurrency would only take longer
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or 'demo' (default: build a random one)")
    ap.add_argument("--preset", default="ernie-4.5-0.3b", help="shape of the random checkpoint")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random checkpoint (0 = the preset's)")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--words", type=int, default=96, help="words per random prompt (~1.3 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    ap.add_argument("--peer-no-cb", action="store_true", help="run transformers serve without continuous batching")
    ap.add_argument("--level-timeout", type=float, default=150, help="seconds per concurrency level at most")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    n_prompts = {c: max(4, 2 * c) if c < 16 else c for c in levels}  # small: the peer is slow on CPU
    work = tempfile.mkdtemp(prefix="bench-serving-")
    model = args.model or make_checkpoint(os.path.join(work, "ckpt"), args.preset, args.layers)
    rows = []
    port = free_port()
    ours = [sys.executable, "-m", "ernie45.cli", "serve", model, "--port", str(port), "--served-model-name", "m",
            "--dtype", "bfloat16", "--max-num-seqs", "64", "--kv-cache-memory", "512MB", "--max-model-len", "1024"]
    with Server(ours, port, os.path.join(work, "ernie45.log")):
        rows += sweep("ernie45", f"http://127.0.0.1:{port}", "m", levels, n_prompts, args.words, args.max_tokens,
                      args.level_timeout)
    write_report(args, rows, model, float("nan"), 0)  # partial results survive a failing peer
    if not args.no_peer and args.model != "demo":
        port = free_port()
        peer = ["transformers", "serve", model, "--port", str(port), "--device", "cpu", "--dtype", "bfloat16",
                *([] if args.peer_no_cb else ["--continuous-batching"])]
        with Server(peer, port, os.path.join(work, "transformers.log")):
            rows += sweep("transformers", f"http://127.0.0.1:{port}", model, levels, n_prompts, args.words,
                          args.max_tokens, args.level_timeout)
    offline = offline_ceiling(model, prompts(n_prompts[levels[-1]], args.words, seed=levels[-1]), args.max_tokens)
    print(f"offline LLM.generate, {n_prompts[levels[-1]]} prompts at once: {offline:.1f} out tok/s", flush=True)
    write_report(args, rows, model, offline, n_prompts[levels[-1]])


def offline_ceiling(model: str, texts: list[str], max_tokens: int) -> float:
    """The same engine without HTTP: all prompts handed to LLM.generate at once (output tokens/s)."""
    import torch

    from ernie45 import LLM, SamplingParams

    torch.set_num_threads(2)
    llm = LLM(model, dtype="bfloat16", max_num_seqs=64, kv_cache_memory="512MB", max_model_len=1024)
    llm.generate(texts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(texts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def write_report(args: argparse.Namespace, rows: list[dict], model: str, offline: float, n_offline: int) -> None:
    from ernie45.utils import atomic_write_text

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import transformers

    date = datetime.date.today().isoformat()
    desc = args.model or (f"random-weight {args.preset} shape, {args.layers or 'all'} layers, 400-token "
                          "SentencePiece vocabulary")
    lines = [f"# Serving benchmark ({date})", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}; commit {commit}; transformers {transformers.__version__}",
             f"- command: `flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py {' '.join(sys.argv[1:])}`",
             f"- model: {desc}, "
             f"bf16; prompts of {args.words} random words, {args.max_tokens} output tokens max, greedy, streamed "
             "/v1/completions; each server alone on 2 threads",
             "- TTFT = time to the first streamed text; TPOT = (latency - TTFT) / (output tokens - 1); "
             "output tokens from the server's usage", "",
             "| server | concurrency | requests | failed | output tok/s | mean prompt tok | TTFT p50 / p90 / p99 ms | "
             "TPOT p50 / p90 / p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['failed']} | "
                     f"{r['output_tok_s']:.1f} | {r['mean_prompt_tokens']:.0f} | {r['ttft_p50_ms']:.0f} / "
                     f"{r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / "
                     f"{r['tpot_p90_ms']:.1f} / {r['tpot_p99_ms']:.1f} |" + (f" {r['note']}" if r["note"] else ""))
    peer = {r["concurrency"]: r for r in rows if r["server"] == "transformers"}
    ratios = [f"c={r['concurrency']}: {r['output_tok_s'] / peer[r['concurrency']]['output_tok_s']:.2f}x"
              for r in rows if r["server"] == "ernie45" and r["concurrency"] in peer
              and peer[r["concurrency"]]["output_tok_s"] > 0]
    if ratios:
        lines += ["", "Output tokens/s, ernie45 / transformers serve: " + ", ".join(ratios)]
        print("ratios (ernie45 / transformers):", ", ".join(ratios))
    last = int(args.levels.split(",")[-1])
    top = [r for r in rows if r["server"] == "ernie45" and r["concurrency"] == last and r["output_tok_s"] > 0]
    if n_offline:
        lines += ["", f"Same engine offline (`LLM.generate`, the {n_offline} prompts of the last level at once, no "
                  f"HTTP): {offline:.1f} output tok/s"
                  + (f"; the server at c={last} reaches {top[0]['output_tok_s'] / offline:.2f}x of it" if top else "")]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{date}-serving.md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
