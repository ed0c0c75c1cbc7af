"""Generation speed: the ernie45 engine vs transformers' ``generate`` on "mid-4L" (the real
ERNIE-4.5-21B-A3B shape with 4 layers, random weights, bf16), batch 1 and batch 16, 128-token prompts,
128 new tokens, greedy, in the same process (our model shares transformers' weight tensors, and the
runs alternate per batch size).

Figures: TTFT (time to the first token), prefill tok/s (prompt tokens / TTFT), decode tok/s (tokens
after the first / time after the first token), and the end-to-end throughput. Ours and transformers alternate
``--rounds`` times per batch size, the DRAM bandwidth measured around every round; each figure is the median round's
with the range over rounds, each ratio the median of the per-round ratios of the two runs made back to back
(``benchmarks/common.py``), and the batch-1 decode is held against the bandwidth ceiling of its own round.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_generate.py [--batch-sizes 1 16]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import dram_bandwidth, fill_random, median, median_range, paired_ratios  # noqa: E402
from ernie45 import ModelConfig, save_model  # noqa: E402
from ernie45.engine import LLMEngine, SamplingParams  # noqa: E402
from ernie45.model.checkpoint import build_empty  # noqa: E402
from ernie45.utils import atomic_write_text  # noqa: E402


def mid_4l() -> ModelConfig:
    return ModelConfig.from_name("ernie-4.5-21b-a3b").replace(
        num_hidden_layers=4, moe_layer_end_index=3, num_nextn_predict_layers=0)


@torch.no_grad()
def build_model(cfg: ModelConfig):  # noqa: ANN201
    """Meta build + a cheap fill: slices of one random pool (speed does not depend on the values;
    random init of 2.8B parameters would take ~1 minute)."""
    model = fill_random(build_empty(cfg, torch.bfloat16))
    return model.eval()


def batch1_bytes(cfg: ModelConfig) -> int:
    """bf16 weight bytes one batch-1 decode step reads: attention, dense MLP and shared experts, k of E routed experts
    per MoE layer, the fp32 router, the LM head, one embedding row."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    attn = h * (2 * cfg.num_attention_heads * cfg.head_dim + 2 * kv)
    total = cfg.vocab_size * h + h
    for i in range(cfg.num_hidden_layers):
        total += attn
        if cfg.is_moe_layer(i):
            total += 3 * h * (cfg.moe_k * cfg.moe_intermediate_size + cfg.shared_intermediate_size)
            total += 2 * cfg.moe_num_experts * h  # fp32 router counted in bf16 units
        else:
            total += 3 * h * cfg.intermediate_size
    return 2 * total


def make_prompts(cfg: ModelConfig, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=g).tolist()


def bench_ours(model, cfg: ModelConfig, batch: int, plen: int, new: int) -> dict:  # noqa: ANN001
    eng = LLMEngine(model, max_num_seqs=max(16, batch), max_num_batched_tokens=max(2048, batch * plen),
                    kv_cache_memory=cfg.kv_bytes_per_token(2) * (batch * (plen + new) + 1024), block_size=16,
                    max_model_len=plen + new + 16)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for i, p in enumerate(make_prompts(cfg, batch, 16)):  # warm-up (allocator, kernels)
        eng.add_request(f"w{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    t0 = time.perf_counter()
    for i, p in enumerate(make_prompts(cfg, batch, plen)):
        eng.add_request(str(i), p, params)
    first_step_end = None
    while eng.has_unfinished_requests():
        eng.step()
        if first_step_end is None:
            first_step_end = time.perf_counter()
    t_end = time.perf_counter()
    ttft = first_step_end - t0
    return {"ttft_s": ttft, "prefill_tok_s": batch * plen / ttft,
            "decode_tok_s": batch * (new - 1) / (t_end - first_step_end), "total_tok_s": batch * new / (t_end - t0)}


def bench_hf(hf, cfg: ModelConfig, batch: int, plen: int, new: int) -> dict:  # noqa: ANN001
    ids = torch.tensor(make_prompts(cfg, batch, plen))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        hf.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] == plen + new
    return {"ttft_s": ttft, "prefill_tok_s": batch * plen / ttft,
            "decode_tok_s": batch * (new - 1) / max(total - ttft, 1e-9), "total_tok_s": batch * new / total}


def share_weights(hf, cfg: ModelConfig):  # noqa: ANN001, ANN201
    """Our ErnieForCausalLM over transformers' tensors (same names and fused expert layout, except
    the router bias): both models in memory for the price of one, so the runs can alternate."""
    from ernie45.model.layers import RotaryEmbedding
    from ernie45.model.model import ErnieForCausalLM

    with torch.device("meta"):
        ours = ErnieForCausalLM(cfg)
    sd = {k.replace("gate.moe_statics.", "gate."): (v.view(-1) if "moe_statics" in k else v)
          for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd, assign=True, strict=True)
    for m in ours.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = torch.empty(m.head_dim // 2)
            m.reset()
    ours.tie_weights()
    return ours.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-hf", action="store_true", help="only our engine (no ratios)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="ours and transformers alternate this many times per batch size (odd: the median is a "
                         "round); ratios are per round, back to back (the memory bandwidth drifts over minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = mid_4l()
    t = time.perf_counter()
    model = build_model(cfg)
    print(f"built mid-4L ({cfg.num_params() / 1e9:.2f}B params, bf16) in {time.perf_counter() - t:.1f}s", flush=True)
    hf = None
    if not args.skip_hf:
        import transformers

        with tempfile.TemporaryDirectory(prefix="mid4l-") as tmp:
            save_model(model, tmp)
            del model
            gc.collect()
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
            # transformers may leave the weights memory-mapped from the (temporary) files; pages the
            # kernel evicts are then re-read from disk every step (10x slower for both engines).
            with torch.no_grad():
                for t in list(hf.parameters()) + list(hf.buffers()):
                    t.data = t.data.clone()
        model = share_weights(hf, cfg)
    # rounds[name][batch]: one dict of figures per round; bandwidth[batch]: measured before each round and after
    rounds: dict[str, dict[int, list[dict]]] = {"ours": {}, "transformers": {}}
    bandwidth: dict[int, list[float]] = {}
    for b in args.batch_sizes:  # alternate ours / theirs per batch size and round: bandwidth drifts over minutes
        bandwidth[b] = [dram_bandwidth()]
        for _ in range(args.rounds):
            runs = [("ours", bench_ours, model)] + ([("transformers", bench_hf, hf)] if hf is not None else [])
            for name, fn, m in runs:
                r = fn(m, cfg, b, args.prompt_len, args.new_tokens)
                print(name, b, r, flush=True)
                rounds[name].setdefault(b, []).append(r)
            bandwidth[b].append(dram_bandwidth())
    results = {"rounds": rounds, "bandwidth": bandwidth}
    report(args, results)
    return 0


METRICS = (("decode_tok_s", "decode tok/s", True), ("prefill_tok_s", "prefill tok/s", True),
           ("total_tok_s", "end-to-end tok/s", True), ("ttft_s", "TTFT s", False))


def report(args: argparse.Namespace, results: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    step_bytes = batch1_bytes(mid_4l())
    rounds, bandwidth = results["rounds"], results["bandwidth"]
    lines = [f"# bench_generate: ernie45 engine vs transformers generate ({datetime.date.today()})", "",
             f"- machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
             f"- command: `flock /tmp/ernie45-heavy.lock python benchmarks/bench_generate.py "
             f"--batch-sizes {' '.join(map(str, args.batch_sizes))} --rounds {args.rounds}`",
             f"- commit: {commit}; model mid-4L (21B-A3B shape, 4 layers, random weights, bf16); "
             f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy",
             f"- method: per batch size, {args.rounds} rounds of ours then transformers, back to back. Each figure is "
             "the median round's, the range over rounds in brackets; each ratio is the median of the per-round "
             "ratios (> 1: ours better; TTFT theirs / ours), range in brackets.", "",
             "| batch | metric | ours | transformers | ratio, median of paired rounds |", "|---|---|---|---|---|"]
    for b, ours in rounds["ours"].items():
        hf = rounds["transformers"].get(b)
        for key, label, higher in METRICS:
            mine = [r[key] for r in ours]
            theirs = [r[key] for r in hf] if hf else None
            ratio = "" if theirs is None else median_range(paired_ratios(mine, theirs, higher), unit="x")
            lines.append(f"| {b} | {label} | {median_range(mine)} | {'' if theirs is None else median_range(theirs)} "
                         f"| {ratio} |")
    lines += ["", "Rounds (decode tok/s, ours / transformers, and the DRAM read bandwidth around the round):", ""]
    for b, ours in rounds["ours"].items():
        hf = rounds["transformers"].get(b) or [None] * len(ours)
        bw = bandwidth[b]
        for i, (o, t) in enumerate(zip(ours, hf)):
            peer = "" if t is None else f" / {t['decode_tok_s']:.2f}"
            lines.append(f"- batch {b}, round {i + 1}: {o['decode_tok_s']:.2f}{peer}; {bw[i] / 1e9:.1f} -> "
                         f"{bw[i + 1] / 1e9:.1f} GB/s")
    if 1 in rounds["ours"]:
        # each batch-1 round against the ceiling of its own round: the higher bandwidth measured around it
        fr = [(o["decode_tok_s"] * step_bytes / max(bw0, bw1), max(bw0, bw1)) for o, bw0, bw1 in
              zip(rounds["ours"][1], bandwidth[1], bandwidth[1][1:])]
        frac, bw = median(fr)
        lines += ["", f"Batch-1 bandwidth ceiling: a decode step reads {step_bytes / 1e9:.2f} GB of bf16 weights; each "
                  f"round's decode speed times that, over the higher bandwidth measured around the round: "
                  f"{median_range([f for f, _ in fr], fmt='{:.0%}')} of the ceiling (median round: {bw / 1e9:.1f} "
                  f"GB/s, a {bw / step_bytes:.1f} tok/s ceiling)."]
    text = "\n".join(lines) + "\n"
    print(text)
    path = os.path.join(ROOT, "benchmarks", "results", f"{datetime.date.today()}-bench_generate.md")
    atomic_write_text(path, text)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
