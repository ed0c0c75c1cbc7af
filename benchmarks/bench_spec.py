"""Speculative decoding with the MTP block: speed-up and acceptance on the demo, and the cost of a verify step.

- ``demo``: the bundled demo model (its MTP head, ``recipes/demo_mtp.yaml``), greedy, batch 1 and 8, plain decoding
  and ``speculative_tokens`` k = 1..4, in alternating rounds (every round runs each setting once, back to back);
  each setting's speed-up is the median over rounds of its tokens/s over plain's in the same round, with the range.
  Prompts are lines of the demo's corpus; the share of outputs identical to plain decoding is reported (bf16: a
  verify forward of several tokens may round differently from a one-token step, so a near-tie can flip; fp32
  output is token-identical, tests/engine/test_speculative.py).
  Each setting's row also gives the wall time of a step and of its model forward alone (``runner.execute``: for
  drafting, the verification of k + 1 rows a sequence and its LM head), and the ceiling that follows: the speed-up
  at the measured acceptance if drafts, sampling and scheduling were free.
- ``verify``: mid-4L (the ERNIE-4.5-21B-A3B shape, 4 layers) int4 with random weights: one forward of a plain decode
  step (1 token) against a verification step of k + 1 = 4 tokens of the same sequence, over a 256-token cache,
  alternating, median of paired ratios. Its target: <= 1.3x. The part also reports the weight bytes each step reads
  from the routes it took (the routed experts' union per layer: their ratio is the floor of a memory-bound step's;
  this random model's tokens mostly pick the same experts) and where the time goes (each native decoder-layer call
  and the LM head, 1 token against 4). With ``--base REV`` the kernels as they were at REV (built beside this
  checkout's, ``common.kernels_at``) take turns with this checkout's on the same model, step by step (plain and
  verify with one, then with the other): both ratios from the same minutes of this VM's drifting bandwidth, and
  each step's speed-up over REV.

  ``k2_adaptive`` / ``k4_adaptive``: ``speculative_adaptive`` (drafting only while it measures faster; the engines
  live through all rounds, so it has learned by the later ones; with ``--draft-quant`` their block is quantized).
  ``--draft-quant int8`` adds k = 1..4 with the MTP block quantized (``speculative_draft_quant``): on the CPU
  backend a draft's decoder layer then runs as one native call.
- ``adaptive``: ``speculative_adaptive`` after it has learned (``part_adaptive``): plain decoding against adaptive
  engines (k = 2, 4) that first generated 1024 tokens a sequence, then ``--rounds`` alternating rounds of 256 tokens,
  batch 1 and 8; with the share of the measured steps that drafted.
- ``accept``: greedy acceptance at k = 1..4 of one or more MTP heads (``--accept-models``: model folders) on
  held-out prompts, to compare heads.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_spec.py [--parts demo verify accept] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write_result  # noqa: E402

from ernie45 import ModelConfig  # noqa: E402
from ernie45.engine.llm import LLMEngine  # noqa: E402
from ernie45.engine.sampling_params import SamplingParams  # noqa: E402


def demo_prompts(n: int) -> list[str]:
    lines = []
    with open("data/corpus/en_fortunes.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 97 == 5:  # spread over the file
                lines.append(json.loads(line)["text"].split("\n")[0][:60])
            if len(lines) == n:
                break
    return lines


def run_demo(engine: LLMEngine, prompts: list[str], max_tokens: int) -> tuple[float, list[list[int]], dict]:
    before = engine.stats()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    outs = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    dt = time.perf_counter() - t0
    after = engine.stats()
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    acc = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    steps = after["spec_verify_steps"] - before["spec_verify_steps"]
    toks = sum(len(v) for v in outs.values())
    return toks / dt, [outs[k] for k in sorted(outs)], {
        "acceptance": acc / drafted if drafted else None,
        "mean_accepted_length": (acc + steps) / steps if steps else None}


def part_demo(rounds: int, max_tokens: int, draft_quant: str | None = None) -> dict:
    """Settings k0 (plain) .. k4, and with ``draft_quant`` also k1_<scheme> .. k4_<scheme> (the MTP block quantized:
    ``speculative_draft_quant``), in alternating rounds."""
    out: dict = {}
    settings = [(f"k{k}", k, None) for k in range(5)]
    if draft_quant:
        settings += [(f"k{k}_{draft_quant}", k, draft_quant) for k in range(1, 5)]
    adaptive = [(f"k{k}_adaptive", k, draft_quant) for k in (2, 4)]  # speculative_adaptive (with draft_quant if any)
    engines = {name: LLMEngine("demo", kv_cache_memory="256MB", speculative_tokens=k, speculative_draft_quant=q,
                               speculative_adaptive=name.endswith("_adaptive"))
               for name, k, q in settings + adaptive}
    forward_s = {name: [0.0, 0] for name in engines}  # the model forwards' (runner.execute) seconds and calls
    for name, eng in engines.items():
        def timed(*a, _f=eng.runner.execute, _acc=forward_s[name], **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            r = _f(*a, **kw)
            _acc[0] += time.perf_counter() - t0
            _acc[1] += 1
            return r
        eng.runner.execute = timed
    for batch in (1, 8):
        prompts = demo_prompts(batch)
        for name in engines:  # warm-up
            run_demo(engines[name], prompts, 8)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        acc: dict[str, list] = {name: [] for name in engines}
        ref_tokens = None
        same: dict[str, list[float]] = {name: [] for name in engines}
        step_ms: dict[str, list[float]] = {name: [] for name in engines}  # wall ms a step; forward ms a step
        fwd_ms: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name in engines:
                forward_s[name][:] = [0.0, 0]
                r, toks, st = run_demo(engines[name], prompts, max_tokens)
                secs, calls = forward_s[name]
                step_ms[name].append(1e3 * batch * max_tokens / r / calls)
                fwd_ms[name].append(1e3 * secs / calls)
                if ref_tokens is None:
                    ref_tokens = toks
                # bf16: a verify forward may round differently from a one-token step, so near-ties can flip
                same[name].append(sum(a == b for a, b in zip(toks, ref_tokens)) / len(toks))
                rates[name].append(r)
                acc[name].append(st)
        for name in engines:
            ratios = [a / b for a, b in zip(rates[name], rates["k0"])]
            mal = acc[name][-1]["mean_accepted_length"]
            # the most drafting could give at this acceptance with free drafts and nothing around the forward: the
            # tokens of a verification over the verification forward's time, against a whole plain step's (paired)
            ceiling = None if mal is None or name.endswith("_adaptive") else statistics.median(
                mal * p / f for p, f in zip(step_ms["k0"], fwd_ms[name]))
            out[f"b{batch}_{name}"] = {
                "tok_s": statistics.median(rates[name]), "tok_s_all": [round(x, 1) for x in rates[name]],
                "speedup_median": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
                "acceptance": acc[name][-1]["acceptance"], "mean_accepted_length": mal,
                "identical_outputs": min(same[name]), "step_ms": statistics.median(step_ms[name]),
                "forward_ms": statistics.median(fwd_ms[name]), "ceiling": ceiling}
            st = engines[name].stats()
            if "spec_drafting" in st:  # adaptive: the share of its steps so far that drafted (all rounds, warm-ups)
                out[f"b{batch}_{name}"]["drafting_share"] = st["spec_steps_drafting"] / (
                    st["spec_steps_drafting"] + st["spec_steps_plain"])
            print(f"batch {batch} {name}: {out[f'b{batch}_{name}']}", flush=True)
    return out


def part_adaptive(rounds: int, learn: int = 1024, max_tokens: int = 256) -> dict:
    """``speculative_adaptive`` once it has learned: plain decoding against adaptive engines (k = 2, 4) that first
    generated ``learn`` tokens a sequence, then alternating rounds of ``max_tokens``; the share of steps that
    drafted counted over the measured rounds only."""
    out: dict = {}
    for batch in (1, 8):
        prompts = demo_prompts(batch)
        engines = {"k0": LLMEngine("demo", kv_cache_memory="256MB")}
        for k in (2, 4):
            engines[f"k{k}_adaptive"] = LLMEngine("demo", kv_cache_memory="256MB", speculative_tokens=k,
                                                  speculative_adaptive=True)
        for eng in engines.values():  # the learning phase (plain decoding: a warm-up)
            run_demo(eng, prompts, learn)
        before = {name: eng.stats() for name, eng in engines.items()}
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name, eng in engines.items():
                rates[name].append(run_demo(eng, prompts, max_tokens)[0])
        for name, eng in engines.items():
            ratios = [a / b for a, b in zip(rates[name], rates["k0"])]
            row = {"tok_s": statistics.median(rates[name]), "speedup_median": statistics.median(ratios),
                   "speedup_range": [min(ratios), max(ratios)]}
            if name != "k0":
                st, st0 = eng.stats(), before[name]
                d = st["spec_steps_drafting"] - st0["spec_steps_drafting"]
                row["drafting_share"] = d / (d + st["spec_steps_plain"] - st0["spec_steps_plain"])
            out[f"b{batch}_{name}"] = row
            print(f"adaptive batch {batch} {name}: {row}", flush=True)
    return out


def part_accept(models: list[str], n: int = 24, max_tokens: int = 64) -> dict:
    """Greedy acceptance at k = 1..4 of each model folder's MTP head on prompts its training text left out (fortune
    records i % 97 == 50: ``scripts/demo_mtp_data.py``), all prompts in one batch."""
    ps = []
    with open("data/corpus/en_fortunes.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 97 == 50:
                ps.append(json.loads(line)["text"].split("\n")[0][:60])
    out = {}
    for folder in models:
        row = {}
        for k in (1, 2, 3, 4):
            eng = LLMEngine(folder, kv_cache_memory="256MB", speculative_tokens=k)
            _, _, st = run_demo(eng, ps[:n], max_tokens)
            row[f"k{k}"] = st
        out[folder] = row
        print(folder, row, flush=True)
    return out


def mid4l_int4() -> torch.nn.Module:
    from common import fill_random

    from ernie45.quant.load import build_quantized
    from ernie45.quant.scheme import QuantConfig

    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_nextn_predict_layers=0, num_hidden_layers=4,
                                                             moe_layer_end_index=3)
    model = fill_random(build_quantized(cfg, QuantConfig.from_name("int4"), torch.bfloat16))
    with torch.no_grad():  # random codes; scales giving weights ~ U(-0.02, 0.02)
        g = torch.Generator().manual_seed(0)
        for name, b in model.named_buffers():
            if b.dtype in (torch.uint8, torch.int8):
                b.view(torch.uint8).copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=g))
            elif name.endswith("scale_zeros"):
                b[..., 0].fill_(0.02 / 8)
                b[..., 1].zero_()
            elif name.endswith("scales"):
                b.fill_(0.02 / 127)
            elif name.endswith("zeros"):
                b.fill_(1e-3)
    return model.eval()


def part_verify(pairs: int, context: int = 256, k: int = 3, base: str | None = None) -> dict:
    from ernie45.accel import AttentionMetadata, accelerate, backend_of
    from ernie45.engine.kv_cache import KVCache

    model = accelerate(mid4l_int4(), "auto")  # what the engine runs: the native CPU backend where it loads
    cfg = model.config
    kv = KVCache(cfg, num_blocks=(context + 64) // 16, block_size=16, dtype=torch.bfloat16)
    attention = backend_of(model).attention(kv)
    table = list(range(kv.num_blocks))
    g = torch.Generator().manual_seed(1)

    @torch.inference_mode()
    def step(n: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g)
        pos = torch.arange(context, context + n)[None]
        meta = AttentionMetadata.build([table], [n], [context + n], 16, num_decodes=1)  # verify rows = decode rows
        t0 = time.perf_counter()
        model(ids, position_ids=pos, cache=attention.step(meta), logits_indices=torch.arange(n))
        return time.perf_counter() - t0

    floor = verify_byte_floor(model, cfg, context, k + 1, attention, table)
    for _ in range(3):
        step(1), step(k + 1)
    plain, verify = [], []
    for _ in range(pairs):
        plain.append(step(1))
        verify.append(step(k + 1))
    ratios = [v / p for v, p in zip(verify, plain)]
    out = {"plain_ms": 1e3 * statistics.median(plain), "verify_ms": 1e3 * statistics.median(verify),
           "tokens_verified": k + 1, "ratio_median": statistics.median(ratios),
           "ratio_range": [min(ratios), max(ratios)], **floor, "split": verify_split(step, k + 1, pairs)}
    if base:
        out["base"] = verify_against(base, step, k + 1, pairs)
    return out


def verify_against(rev: str, step, n: int, pairs: int) -> dict:  # noqa: ANN001
    """Plain and ``n``-token steps with the kernels at ``rev`` and with this checkout's, taking turns on the same
    model (``kernels._lib`` swapped between pairs of steps): each library's median ratio and range, and the median
    speed-up of this checkout's steps over ``rev``'s (paired: the steps next to each other)."""
    import tempfile

    from common import kernels_at

    from ernie45 import kernels

    new = kernels.library()
    times: dict[str, dict[str, list[float]]] = {"base": {"1": [], "n": []}, "new": {"1": [], "n": []}}
    with tempfile.TemporaryDirectory() as work:
        libs = {"base": kernels_at(rev, kernels.active_isa(), work), "new": new}
        if libs["base"].changed:  # it would stand in for the active library: every signature and struct must agree
            raise SystemExit(f"--base {rev}: its kernels differ from this checkout's in "
                             f"{sorted(libs['base'].changed)}; pick a revision with the same signatures and structs")
        try:
            for i in range(3 + pairs):
                for name in ("base", "new") if i % 2 else ("new", "base"):
                    kernels._lib = libs[name]
                    p, v = step(1), step(n)
                    if i >= 3:
                        times[name]["1"].append(p)
                        times[name]["n"].append(v)
        finally:
            kernels._lib = new
    out: dict = {"rev": rev}
    for name, t in times.items():
        r = [v / p for v, p in zip(t["n"], t["1"])]
        out[name] = {"plain_ms": 1e3 * statistics.median(t["1"]), "verify_ms": 1e3 * statistics.median(t["n"]),
                     "ratio_median": statistics.median(r), "ratio_range": [min(r), max(r)]}
    for kind in ("1", "n"):
        sp = [b / a for b, a in zip(times["base"][kind], times["new"][kind])]
        out[f"speedup_{kind}"] = {"median": statistics.median(sp), "range": [min(sp), max(sp)]}
    return out


def verify_split(step, n: int, pairs: int) -> dict:  # noqa: ANN001
    """Where the time of a 1-token and an ``n``-token step goes: each native decoder-layer call and the LM head
    (``kernels.decode_layer``, ``kernels.qgemm_ptrs``), timed by wrapping them, median over ``pairs`` steps each."""
    from ernie45 import kernels

    spent: dict[str, list[float]] = {}
    originals = {name: getattr(kernels, name) for name in ("decode_layer", "qgemm_ptrs")}

    def timed(name: str, f):  # noqa: ANN001, ANN202
        def run(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            r = f(*a, **kw)
            spent.setdefault(name, []).append(time.perf_counter() - t0)
            return r
        return run

    out: dict[str, dict[str, float]] = {}
    try:
        for name, f in originals.items():
            setattr(kernels, name, timed(name, f))
        for rows in (1, n):
            per: dict[str, list[float]] = {}
            for _ in range(pairs):
                spent.clear()
                total = step(rows)
                for i, t in enumerate(spent.get("decode_layer", [])):
                    per.setdefault(f"layer {i}", []).append(t)
                per.setdefault("LM head", []).append(sum(spent.get("qgemm_ptrs", [])))
                per.setdefault("whole step", []).append(total)
            out[str(rows)] = {key: 1e3 * statistics.median(v) for key, v in per.items()}
    finally:
        for name, f in originals.items():
            setattr(kernels, name, f)
    return out


def verify_byte_floor(model: torch.nn.Module, cfg: ModelConfig, context: int, n: int, attention,  # noqa: ANN001
                      table: list[int], draws: int = 16) -> dict:
    """The weight bytes a step of ``n`` tokens reads against one of 1 token, from the routes the model takes: every
    weight once, the routed experts each token picks once per layer (their union for ``n`` tokens), one embedding row
    per token. A memory-bound step cannot cost less than this ratio. Routes from ``draws`` random token strings (an
    untimed forward with router records: the module path, same routes)."""
    from ernie45.accel import AttentionMetadata

    def nbytes(mod: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*mod.parameters(), *mod.buffers()))

    m = model.model
    experts = [layer.mlp.experts for layer in m.layers if layer.is_moe]
    per_expert = [nbytes(e) / cfg.moe_num_experts for e in experts]
    row = nbytes(m.embed_tokens) / cfg.vocab_size
    fixed = nbytes(model) - sum(map(nbytes, experts)) - nbytes(m.embed_tokens)  # parameters() counts a tied one once
    if getattr(model.lm_head, "weight", None) is m.embed_tokens.weight:
        fixed += nbytes(m.embed_tokens) - row  # the tied table is read whole as the head (the row within it)
    g = torch.Generator().manual_seed(2)

    def union_sizes(t: int) -> list[float]:
        sizes = []
        for _ in range(draws):
            ids = torch.randint(0, cfg.vocab_size, (1, t), generator=g)
            meta = AttentionMetadata.build([table], [t], [context + t], 16, num_decodes=1)
            with torch.inference_mode():
                out = model(ids, position_ids=torch.arange(context, context + t)[None], cache=attention.step(meta),
                            logits_indices=torch.arange(t), return_router=True)
            sizes.append([len(set(idx.flatten().tolist())) for _, idx in out.router])
        return [statistics.mean(col) for col in zip(*sizes)]

    one, many = union_sizes(1), union_sizes(n)
    plain = fixed + row + sum(u * b for u, b in zip(one, per_expert))
    verify = fixed + n * row + sum(u * b for u, b in zip(many, per_expert))
    return {"experts_per_layer_1": one, "experts_per_layer_verify": many, "bytes_plain_mb": plain / 1e6,
            "bytes_verify_mb": verify / 1e6, "byte_ratio": verify / plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["demo", "verify"], choices=["demo", "verify", "accept", "adaptive"])
    ap.add_argument("--accept-models", nargs="+", default=["demo"],
                    help="model folders whose MTP heads the accept part compares (e.g. an older demo's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--draft-quant", default=None,
                    help="also run k=1..4 with the MTP block quantized with this preset (speculative_draft_quant)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 on a machine whose cores other work shares: 2 threads then spin at "
                         "barriers and a step can take 10x longer)")
    ap.add_argument("--note", default="", help="a line for the results file (e.g. what else ran on the machine)")
    ap.add_argument("--base", default=None, help="verify part: also run the kernels as they were at this git "
                    "revision, taking turns with this checkout's on the same model")
    ap.add_argument("--name", default=None, help="results file benchmarks/results/<date>-<name>.md (default: spec, "
                    "or spec-<part> for one part), so that repeated runs can be kept side by side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"load_before": [round(x, 2) for x in os.getloadavg()]}
    if "demo" in args.parts:
        res["demo"] = part_demo(args.rounds, args.max_tokens, args.draft_quant)
    if "accept" in args.parts:
        res["accept"] = part_accept(args.accept_models)
    if "adaptive" in args.parts:
        res["adaptive"] = part_adaptive(args.rounds)
    if "verify" in args.parts:
        res["verify"] = part_verify(args.pairs, base=args.base)
        print(res["verify"], flush=True)
    res["load_after"] = [round(x, 2) for x in os.getloadavg()]
    lines = [f"load average (1, 5, 15 min) before {res['load_before']}, after {res['load_after']} "
             f"(2 cores: above ~2 other work shared them)." + (f" {args.note}" if args.note else "")]
    if "demo" in res:
        lines += ["", "| setting | tok/s (median) | speed-up vs plain, median of paired rounds [range] | acceptance | "
                      "mean tokens a verification | outputs identical to plain | ms a step: all / the forward | "
                      "ceiling with free drafts |", "|---|---|---|---|---|---|---|---|"]
    for key, r in res.get("demo", {}).items():
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        mal = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        ceiling = "-" if r["ceiling"] is None else f"{r['ceiling']:.2f}x"
        lines.append(f"| demo {key} | {r['tok_s']:.1f} | {r['speedup_median']:.2f}x "
                     f"[{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}] | {acc} | {mal} | "
                     f"{100 * r['identical_outputs']:.0f}% | {r['step_ms']:.2f} / {r['forward_ms']:.2f} | "
                     f"{ceiling} |")
    shares = [f"{key} {100 * r['drafting_share']:.0f}%" for key, r in res.get("demo", {}).items()
              if "drafting_share" in r]
    if shares:
        lines += ["", "Adaptive engines, the share of their steps that drafted (over their life: warm-ups and the "
                      "batch-1 rounds before batch 8): " + ", ".join(shares) + "."]
    if "demo" in res:
        lines += ["", "Ceiling with free drafts: a setting's mean tokens a verification times a plain step's wall "
                      "time over the setting's verification forward alone (the model's forward of the k + 1 rows and "
                      "its LM head, `runner.execute`), the median over the paired rounds: the speed-up if drafting, "
                      "sampling and scheduling cost nothing. Where it is below an aim, no drafting reaches the aim "
                      "at that acceptance on this machine."]
    if "adaptive" in res:
        lines += ["", "speculative_adaptive after a learning phase (1024 tokens a sequence), then alternating rounds "
                      "of 256 tokens: tok/s, speed-up over plain decoding (median of paired rounds, range), the "
                      "share of the measured rounds' steps that drafted", "",
                  "| setting | tok/s | speed-up | steps drafting |", "|---|---|---|---|"]
        for key, r in res["adaptive"].items():
            share = f"{100 * r['drafting_share']:.1f}%" if "drafting_share" in r else "-"
            lines.append(f"| demo {key} | {r['tok_s']:.1f} | {r['speedup_median']:.2f}x "
                         f"[{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}] | {share} |")
    if "accept" in res:
        lines += ["", "greedy acceptance on held-out prompts (24 fortune records i % 97 == 50, 64 tokens, one batch): "
                      "acceptance / mean tokens a verification", "", "| MTP head | k=1 | k=2 | k=3 | k=4 |",
                  "|---|---|---|---|---|"]
        for folder, row in res["accept"].items():
            lines.append(f"| {folder} | " + " | ".join(
                f"{100 * row[f'k{k}']['acceptance']:.0f}% / {row[f'k{k}']['mean_accepted_length']:.2f}"
                for k in (1, 2, 3, 4)) + " |")
    if "verify" in res:
        v = res["verify"]
        lines += ["", f"mid-4L int4, batch 1, 256-token context: plain decode step {v['plain_ms']:.1f} ms, verify "
                      f"step of {v['tokens_verified']} tokens {v['verify_ms']:.1f} ms: {v['ratio_median']:.2f}x "
                      f"(paired median; range {v['ratio_range'][0]:.2f}-{v['ratio_range'][1]:.2f})", "",
                  f"Weight bytes read, from the routes taken (mean over random token strings): "
                  f"{v['bytes_plain_mb']:.0f} MB a plain step, {v['bytes_verify_mb']:.0f} MB a verify step of "
                  f"{v['tokens_verified']} tokens ({v['byte_ratio']:.2f}x): routed experts per MoE layer "
                  f"{', '.join(f'{x:.1f}' for x in v['experts_per_layer_1'])} for one token, "
                  f"{', '.join(f'{x:.1f}' for x in v['experts_per_layer_verify'])} for "
                  f"{v['tokens_verified']} (their union). A memory-bound step costs at least its bytes, so "
                  f"{v['byte_ratio']:.2f}x is this model's floor for the ratio.", "",
                  f"Where the time goes (ms, median over the steps; the native decoder-layer calls and the LM head "
                  f"timed by wrapping them, 1 token against {v['tokens_verified']}):", "",
                  "| part | 1 token | " + f"{v['tokens_verified']} tokens | ratio |", "|---|---|---|---|"]
        one, many = v["split"]["1"], v["split"][str(v["tokens_verified"])]
        lines += [f"| {key} | {one[key]:.2f} | {many[key]:.2f} | {many[key] / one[key]:.2f}x |" for key in one]
        if "base" in v:
            b = v["base"]
            lines += ["", f"Against the kernels at `{b['rev']}`, taking turns on the same model (plain and verify "
                          f"step with one library, then with the other; {args.pairs} turns each):", "",
                      "| kernels | plain step ms | verify step ms | verify / plain (paired median, range) |",
                      "|---|---|---|---|"]
            for name, label in (("base", f"`{b['rev']}`"), ("new", "this checkout")):
                r = b[name]
                lines.append(f"| {label} | {r['plain_ms']:.1f} | {r['verify_ms']:.1f} | {r['ratio_median']:.2f}x "
                             f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |")
            lines += ["", f"This checkout's steps against `{b['rev']}`'s next to them: plain "
                          f"{b['speedup_1']['median']:.2f}x ({b['speedup_1']['range'][0]:.2f}-"
                          f"{b['speedup_1']['range'][1]:.2f}), verify {b['speedup_n']['median']:.2f}x "
                          f"({b['speedup_n']['range'][0]:.2f}-{b['speedup_n']['range'][1]:.2f})."]
    text = "\n".join(lines) + "\n\nraw:\n```json\n" + json.dumps(res, indent=1) + "\n```"
    # a part other than demo alone gets its own file, so it does not replace a run with the demo table
    alone = len(args.parts) == 1 and args.parts[0] != "demo"
    print(write_result(args.name or (f"spec-{args.parts[0]}" if alone else "spec"), text))


if __name__ == "__main__":
    main()
