"""Serving benchmark: `ernie45 serve` vs `transformers serve --continuous-batching` on the same checkpoint.

Like `vllm bench serve --dataset-name random` / FastDeploy's benchmark_serving.py: a fixed set of random
prompts per concurrency level (1, 4, 16, 64), streamed over /v1/completions, greedy. Per request TTFT
(time to the first streamed text), TPOT ((latency - TTFT) / (output tokens - 1)) and end-to-end latency;
per level output tokens/s, and TTFT/TPOT at p50/p90/p99 (the names vLLM and FastDeploy publish).

Both servers run in one run on the same requests: each is a subprocess (2 CPU threads), both resident, and for
each level they take turns (`--rounds` times: ours, then the peer, back to back); the other server is idle
meanwhile (its CPU seconds during the turn are recorded). Token counts are the client's, the same way for both:
the streamed text and the prompt encoded with the checkpoint's tokenizer (servers report `usage` differently or
not at all; each server's own count is kept beside it as a check). The benchmark's checkpoint declares the
tokenizer the way transformers must read it to match ours (LlamaTokenizer, legacy, no BOS), so both servers see
the same prompt tokens. Each round sends new prompts (the same to both servers), so no round is served from the other
rounds' prefix cache. Figures: the median round's, range over rounds; ratios: the median of per-round ratios.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py                  # 0.3B-shaped model
    (the peer needs `pip install accelerate`: transformers serve refuses to load without it)
    flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py --model demo --no-peer

Writes benchmarks/results/<date>-serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
TOKENIZER = None  # the checkpoint's (ernie45.tokenizer.Tokenizer), set in main: counts tokens for every server
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
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_cfg = json.load(f)
    # transformers reads this SentencePiece model as ours does only as a legacy LlamaTokenizer without BOS
    # (tests/test_tokenizer.py checks the equality): the same prompt tokens on both servers
    tok_cfg.update(tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=False, add_eos_token=False)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f)
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
    ttft, chunks, usage, text = None, 0, None, []
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
                    ev = {"choices": [{"text": "\ufffd"}]} if '"text"' in event else {}
                if ev.get("usage"):
                    usage = ev["usage"]
                for c in ev.get("choices", []):
                    if c.get("text"):
                        chunks += 1
                        text.append(c["text"])
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    out = len(TOKENIZER.encode("".join(text)))  # counted the same way for every server
    ttft = latency if ttft is None else ttft
    return {"ttft": ttft, "latency": latency, "output_tokens": out, "prompt_tokens": len(TOKENIZER.encode(prompt)),
            "usage_output_tokens": usage.get("completion_tokens") if usage else None,
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
    usage = [r["usage_output_tokens"] for r in ok if r["usage_output_tokens"] is not None]
    return {"concurrency": concurrency, "requests": len(texts), "failed": len(res) - len(ok),
            "note": res[0]["error"] if not ok else "",
            "duration_s": duration, "output_tokens": out_tokens, "output_tok_s": out_tokens / duration,
            "usage_reported": len(usage), "usage_output_tokens": sum(usage),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in ok) if ok else 0,
            **{f"{k}_p{int(q * 100)}_ms": pct(k, q) for k in ("ttft", "tpot") for q in (0.5, 0.9, 0.99)}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or 'demo' (default: build a random one)")
    ap.add_argument("--preset", default="ernie-4.5-0.3b", help="shape of the random checkpoint")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random checkpoint (0 = the preset's)")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=3, help="turns of each server per level (odd: the median is one)")
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
    global TOKENIZER
    from ernie45.tokenizer import Tokenizer

    TOKENIZER = Tokenizer.from_pretrained(model)
    port = free_port()
    servers = [("ernie45", [sys.executable, "-m", "ernie45.cli", "serve", model, "--port", str(port),
                            "--served-model-name", "m", "--dtype", "bfloat16", "--max-num-seqs", "64",
                            "--kv-cache-memory", "512MB", "--max-model-len", "1024"], port, "m")]
    if not args.no_peer and args.model != "demo":
        port = free_port()
        cb = [] if args.peer_no_cb else ["--continuous-batching"]
        cli = os.path.join(os.path.dirname(sys.executable), "transformers")  # the venv's, not whatever is on PATH
        cli = cli if os.path.exists(cli) else "transformers"
        servers.append(("transformers", [cli, "serve", model, "--port", str(port), "--device", "cpu",
                                         "--dtype", "bfloat16", "--model-timeout", "86400", *cb], port, model))
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        running = [(name, stack.enter_context(Server(cmd, port, os.path.join(work, f"{name}.log"))), port, served)
                   for name, cmd, port, served in servers]
        for _, _, port, served in running:  # warm-up
            asyncio.run(run_level(f"http://127.0.0.1:{port}", served, 1, prompts(2, args.words, seed=99),
                                  args.max_tokens))
        stopped: set[str] = set()
        for c in levels:
            for rnd in range(args.rounds):
                # The same requests for every server within a round, new ones each round: a repeated prompt would
                # be served from ernie45's prefix cache (the peer has none), which is not what this measures.
                texts = prompts(n_prompts[c], args.words, seed=1000 * c + rnd)
                for name, _, port, served in running:
                    if name in stopped:
                        continue
                    others = [s.proc.pid for n, s, _, _ in running if n != name]
                    idle0 = sum(cpu_seconds(pid) for pid in others)
                    row = asyncio.run(run_level(f"http://127.0.0.1:{port}", served, c, texts, args.max_tokens,
                                                args.level_timeout))
                    row.update(server=name, round=rnd, idle_cpu_s=sum(cpu_seconds(pid) for pid in others) - idle0)
                    print(f"{name:>14} c={c:<3} round {rnd + 1}: {row['output_tok_s']:8.1f} out tok/s  TTFT p50 "
                          f"{row['ttft_p50_ms']:8.1f} ms  TPOT p50 {row['tpot_p50_ms']:7.1f} ms  failed "
                          f"{row['failed']} {row['note']}", flush=True)
                    rows.append(row)
                    if row["note"]:
                        stopped.add(name)  # higher concurrency would only take longer
            write_report(args, rows, model, float("nan"), 0)  # partial results survive a failing peer
    offline = offline_ceiling(model, prompts(n_prompts[levels[-1]], args.words, seed=1000 * levels[-1]),
                              args.max_tokens)
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
    from benchmarks.common import machine, median, median_range, paired_ratios
    from ernie45.utils import atomic_write_text

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import transformers

    date = datetime.date.today().isoformat()
    desc = args.model or (f"random-weight {args.preset} shape, {args.layers or 'all'} layers, 400-token "
                          "SentencePiece vocabulary")
    lines = [f"# Serving benchmark ({date})", "",
             f"- machine: {machine()}; Python {platform.python_version()}; commit {commit}; "
             f"transformers {transformers.__version__}",
             f"- command: `flock /tmp/ernie45-heavy.lock python benchmarks/bench_serving.py {' '.join(sys.argv[1:])}`",
             f"- model: {desc}, "
             f"bf16; prompts of {args.words} random words, {args.max_tokens} output tokens max, greedy, streamed "
             "/v1/completions; each server a subprocess on 2 threads, both resident, taking turns on the same "
             f"requests ({args.rounds} rounds per level, ours then the peer)",
             "- token counts: the client's, the streamed text and the prompt encoded with the checkpoint's tokenizer, "
             "the same for both servers (the servers' own `usage`, where reported, is the last column)",
             "- TTFT = time to the first streamed text; TPOT = (latency - TTFT) / (output tokens - 1); each figure "
             "is the median round's (by output tok/s), output tok/s with its range over rounds", "",
             "| server | concurrency | requests | failed | output tok/s | mean prompt tok | TTFT p50 / p90 / p99 ms | "
             "TPOT p50 / p90 / p99 ms | idle peer CPU s | server usage (reported streams: tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["concurrency"]), []).append(r)
    for (_, _), rs in groups.items():
        r = sorted(rs, key=lambda x: x["output_tok_s"])[len(rs) // 2]  # the median round, as common.median picks
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {sum(x['failed'] for x in rs)} | "
                     f"{median_range([x['output_tok_s'] for x in rs], '{:.1f}')} | {r['mean_prompt_tokens']:.0f} | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.1f} / {r['tpot_p90_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
                     f"{max(x['idle_cpu_s'] for x in rs):.1f} | {r['usage_reported']}/{r['requests']}: "
                     f"{r['usage_output_tokens']} (client {r['output_tokens']}) |"
                     + (f" {r['note']}" if r["note"] else ""))
    ratios = []
    for (server, c), rs in groups.items():
        peer = groups.get(("transformers", c))
        if server != "ernie45" or not peer:
            continue
        pairs = [(a["output_tok_s"], b["output_tok_s"]) for a, b in zip(rs, peer) if b["output_tok_s"] > 0]
        if pairs:
            ratios.append(f"c={c}: {median_range(paired_ratios(*map(list, zip(*pairs))), unit='x')}")
    if ratios:
        lines += ["", "Output tokens/s, ernie45 / transformers serve, median of the per-round ratios (range): "
                  + ", ".join(ratios)]
        print("ratios (ernie45 / transformers):", ", ".join(ratios))
    last = int(args.levels.split(",")[-1])
    top = groups.get(("ernie45", last))
    if n_offline:
        best = median([x["output_tok_s"] for x in top]) if top else 0
        lines += ["", f"Same engine offline (`LLM.generate`, the {n_offline} prompts of the last level at once, no "
                  f"HTTP): {offline:.1f} output tok/s"
                  + (f"; the server at c={last} reaches {best / offline:.2f}x of it" if best else "")]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{date}-serving.md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
