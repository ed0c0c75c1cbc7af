"""GGUF import/export: peak memory of importing llama.cpp's Q4_K_M of mid-4L, the conversion error against
llama.cpp's own dequantization, and llama.cpp running our exports.

Parts (each in its own process; a child's peak RSS is its own):

- ``llama``: a tiny random MoE exported by us as bf16 / q8_0 / q4_0 and run by llama.cpp; its logits against ours
  on the loaded-back weights (max over positions and the median position).
- ``mid4l``: the ERNIE-4.5-21B-A3B shape with 4 layers (2.76B parameters, random bf16 weights), written by us as a
  BF16 GGUF and quantized by llama.cpp to Q4_K_M (``llama_model_quantize``). Then, each in a fresh process: our
  import (``load_model("x.gguf")``: peak RSS against the loaded model's bytes), llama.cpp's own load of the same
  file (``use_mmap=False``, so its weights count in its RSS too), and the error of our weights against
  ``gguf.quants.dequantize`` of every tensor, by ggml type, with bf16 (default) and fp32 scales.

- ``import``: an existing GGUF (``--gguf PATH``, e.g. the mid-4L Q4_K_M the ``mid4l`` part or ``bench_quant``
  made), without the export and quantize: per round, in fresh processes, our import, llama.cpp's load and (with
  ``--compare DIR``) the import of another ernie45 checkout (the code before a change), alternating.
- ``decode``: batch-1 greedy decode of that file after our import (the engine, its default backend) against
  llama.cpp decoding the same file, in alternating segments (``bench_quant.head_to_head``: 16 warm-up steps each,
  then ``--decode-rounds`` segments of ``--tokens``); the median of the paired per-round ratios with their range;
  then the prefill of a ``--prefill``-token prompt the same way (``bench_quant.prefill_head_to_head``).
  With ``--compare DIR``, the other checkout decodes the file too, in a fresh process (tok/s over ``--tokens``).

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_gguf.py [--parts llama mid4l] [--workdir DIR]
    flock /tmp/ernie45-heavy.lock python benchmarks/bench_gguf.py --parts import --gguf X.gguf [--rounds 3]
        [--compare /path/to/other/checkout]
    flock /tmp/ernie45-heavy.lock python benchmarks/bench_gguf.py --parts decode --gguf X.gguf [--tokens 32]
        [--decode-rounds 5] [--compare /path/to/other/checkout]

Needs ``pip install 'ernie45[gguf]' llama-cpp-python==0.3.36`` (llama.cpp built AVX-512, AMX off: its AMX path
crashes on this VM).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_quant import llama_quantize  # noqa: E402
from benchmarks.common import fill_random  # noqa: E402
from ernie45 import ModelConfig, load_model  # noqa: E402
from ernie45.model.checkpoint import build_empty  # noqa: E402
from ernie45.quant.quantize import qweights  # noqa: E402

torch.set_num_threads(2)
SMOKE = bool(os.environ.get("BENCH_GGUF_SMOKE"))


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: per address space, so it starts afresh at exec; ru_maxrss
    would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mid4l_config() -> ModelConfig:
    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_nextn_predict_layers=0)
    if SMOKE:  # the pipeline on a small shape (K-quants need rows of 256)
        cfg = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, head_dim=64, intermediate_size=256,
                                                        moe_intermediate_size=256)
    return cfg.replace(num_hidden_layers=4, moe_layer_end_index=3)


# -------------------------------------------------------------------------------------------- parts
@torch.no_grad()
def part_llama() -> dict:
    from llama_cpp import Llama

    from ernie45.formats.gguf import export_gguf, load_gguf

    cfg = ModelConfig.from_name("tiny-moe")
    model = build_empty(cfg, torch.float32)
    g = torch.Generator().manual_seed(0)
    for n, p in [*model.named_parameters(), *model.named_buffers()]:
        if "inv_freq" in n:
            continue
        if "norm" in n:
            p.uniform_(0.5, 1.5, generator=g)
        else:
            p.normal_(0, 0.08 if "gate.weight" in n else 0.04, generator=g)
    tokens = list(range(5, 21))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in ("bf16", "q8_0", "q4_0"):
            path = os.path.join(d, f"{kind}.gguf")
            export_gguf(model, path, kind, progress=False)
            ours = load_gguf(path, dtype=torch.float32)(torch.tensor([tokens])).logits[0]
            llm = Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
            llm.eval(tokens)
            theirs = torch.tensor(np.array(llm.scores[: len(tokens)]))
            llm.close()
            per_pos = ((ours - theirs).abs().amax(-1) / ours.abs().amax(-1)).tolist()
            out[kind] = {"max_rel": max(per_pos), "median_rel": sorted(per_pos)[len(per_pos) // 2],
                         "bytes": os.path.getsize(path)}
    return out


def child_import(path: str) -> dict:
    from ernie45.quant import quantized_nbytes

    base = peak_rss()
    t0 = time.perf_counter()
    model = load_model(path, progress=False)
    secs = time.perf_counter() - t0
    return {"import_s": secs, "peak_rss": peak_rss(), "rss_before": base, "model_bytes": quantized_nbytes(model),
            "file_bytes": os.path.getsize(path), "scheme": model.quant_config.describe()}


def child_llama_load(path: str) -> dict:
    from llama_cpp import Llama

    base = peak_rss()
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=64, n_threads=2, use_mmap=False, verbose=False)
    secs = time.perf_counter() - t0
    llm.close()
    return {"load_s": secs, "peak_rss": peak_rss(), "rss_before": base}


@torch.no_grad()
def child_errors(path: str) -> dict:
    """Our weights vs gguf-py's dequantization, per ggml type: max |ours - theirs| / max |theirs| over every
    tensor (the first, middle and last expert of a stack), for bf16 scales (the default) and fp32 scales."""
    import gguf

    from ernie45.formats.gguf import gguf_to_native

    out: dict = {}
    reader = gguf.GGUFReader(path)
    for dtype in (torch.bfloat16, torch.float32):
        model = load_model(path, dtype=dtype, progress=False)
        mods = dict(model.named_modules())
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        for t in reader.tensors:
            native, part = gguf_to_native(t.name)
            owner, _, leaf = native.rpartition(".")
            mod = mods.get(owner)
            name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
            key = f"{name}|{str(dtype).removeprefix('torch.')}"
            data = t.data
            if len(t.shape) == 3:
                qw = getattr(mod, leaf)
                pairs = []
                n = data.shape[0]
                for e in sorted({0, n // 2, n - 1}):  # three experts of each stack: the same code path for all
                    ref = torch.from_numpy(gguf.quants.dequantize(data[e], t.tensor_type))
                    got = qw.dequantize(e, torch.float32) if hasattr(qw, "qweight") else qw[e].float()
                    rows = ref.shape[0]
                    got = got[rows:] if part == "up" else got[:rows]
                    pairs.append((float((got - ref).abs().max()), float(ref.abs().max())))
                err, scale = max(p[0] for p in pairs), max(p[1] for p in pairs)
            else:
                ref = torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type)).reshape(
                    tuple(int(s) for s in reversed(t.shape.tolist())))
                if hasattr(mod, "qweight") and leaf == "weight":
                    got = mod.dequantize(None, torch.float32)
                else:
                    got = params[native].float().reshape(ref.shape)
                err, scale = float((got - ref).abs().max()), float(ref.abs().max())
            prev = out.get(key, {"max_rel": 0.0, "tensors": 0})
            out[key] = {"max_rel": max(prev["max_rel"], err / max(scale, 1e-30)), "tensors": prev["tensors"] + 1}
        del model
        gc.collect()
    return out


def child_decode(path: str) -> dict:
    """This checkout's batch-1 decode of the file (for ``--compare``): tok/s over TOKENS steps after 4 warm-up."""
    from benchmarks.bench_quant import OursDecoder

    dec = OursDecoder(load_model(path, progress=False), PROMPT, 4 + TOKENS)
    dec.segment(4)
    return {"tok_s": dec.segment(TOKENS)}


PROMPT, TOKENS, PREFILL = 32, 32, 256
"""Part decode: the prompt's length, the tokens of a timed segment (``--tokens``), the prefill's prompt
(``--prefill``, 0: none)."""


def part_decode(path: str, rounds: int, compare: str | None) -> dict:
    """Ours (imported here) against llama.cpp on the same file, alternating segments; then the other checkout."""
    import benchmarks.bench_quant as bq

    bq.ROUNDS = rounds
    t0 = time.perf_counter()
    model = load_model(path, progress=False)
    out: dict = {"file": os.path.basename(path), "import_s": time.perf_counter() - t0, "tokens": TOKENS,
                 "formats": sorted({qw.layout for _, qw in qweights(model)})}
    out |= bq.head_to_head(model, path, PROMPT, TOKENS)
    if PREFILL:
        out["prefill"] = bq.prefill_head_to_head(model, path, PREFILL) | {"tokens": PREFILL}
    del model
    gc.collect()
    if compare:
        out["before"] = run_child("decode", path, os.path.join(compare, "benchmarks", "bench_gguf.py"))
    return out


def run_child(what: str, path: str, script: str = __file__) -> dict:
    """One measurement in a fresh process (its own VmHWM); ``script``: this file, or another checkout's copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    env = dict(os.environ, PYTHONPATH=root)
    run = subprocess.run([sys.executable, script, "--_child", what, path], capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"child {what} ({script}) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def part_import(path: str, rounds: int, compare: str | None) -> dict:
    """Rounds of (ours, llama.cpp[, the other checkout]) on one file, each in a fresh process, alternating."""
    out: dict = {"file": os.path.basename(path), "rounds": []}
    other = os.path.join(compare, "benchmarks", "bench_gguf.py") if compare else None
    for r in range(rounds):
        got = {"ours": run_child("import", path), "llama": run_child("llama_load", path)}
        if other:
            got["before"] = run_child("import", path, other)
        out["rounds"].append(got)
        print(f"round {r}: {json.dumps(got)}", file=sys.stderr, flush=True)
    return out


def part_mid4l(work: str) -> dict:
    from ernie45.formats.gguf import export_gguf

    cfg = mid4l_config()
    bf16, q4km = os.path.join(work, "mid4l-bf16.gguf"), os.path.join(work, "mid4l-Q4_K_M.gguf")
    model = fill_random(build_empty(cfg, torch.bfloat16))
    t0 = time.perf_counter()
    export_gguf(model, bf16, "bf16", progress=False)
    out: dict = {"export_bf16_s": time.perf_counter() - t0, "bf16_bytes": os.path.getsize(bf16),
                 "params": sum(p.numel() for p in model.parameters())}
    del model
    gc.collect()
    t0 = time.perf_counter()
    llama_quantize(bf16, q4km, "Q4_K_M")
    out["llama_quantize_s"] = time.perf_counter() - t0
    os.unlink(bf16)
    for child in ("import", "llama_load", "errors"):
        run = subprocess.run([sys.executable, __file__, "--_child", child, q4km], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"child {child} failed:\n{run.stderr[-3000:]}")
        out[child] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{child}: {json.dumps(out[child])}", file=sys.stderr, flush=True)  # kept if a later child fails
    return out


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    global TOKENS, PREFILL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["llama", "mid4l"], choices=["llama", "mid4l", "import", "decode"])
    ap.add_argument("--gguf", help="parts import and decode: the GGUF file")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="part decode: tokens of a timed segment")
    ap.add_argument("--decode-rounds", type=int, default=5, help="part decode: alternating segments each")
    ap.add_argument("--prefill", type=int, default=PREFILL, help="part decode: prefill prompt length (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="part import: rounds (odd: the median is a round)")
    ap.add_argument("--compare", metavar="DIR", help="part import: also import with the ernie45 checkout in DIR")
    ap.add_argument("--workdir", default=None, help="where the mid-4L GGUFs go (~7 GB)")
    ap.add_argument("--_part", help=argparse.SUPPRESS)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    TOKENS, PREFILL = args.tokens, args.prefill
    if args._child:
        what, path = args._child
        res = {"import": child_import, "llama_load": child_llama_load, "errors": child_errors,
               "decode": child_decode}[what](path)
        print(json.dumps(res))
        return
    if args._part:
        if args._part == "llama":
            res = part_llama()
        else:
            with tempfile.TemporaryDirectory(dir=args.workdir) as work:
                res = part_mid4l(work)
        print(json.dumps(res))
        return
    from common import write_result

    results = {}
    if "import" in args.parts:
        if not args.gguf:
            ap.error("--parts import needs --gguf PATH")
        results["import"] = part_import(args.gguf, args.rounds, args.compare)
    if "decode" in args.parts:
        if not args.gguf:
            ap.error("--parts decode needs --gguf PATH")
        results["decode"] = part_decode(args.gguf, args.decode_rounds, args.compare)
    for part in (p for p in args.parts if p not in ("import", "decode")):
        cmd = [sys.executable, __file__, "--_part", part] + (["--workdir", args.workdir] if args.workdir else [])
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"part {part} failed")
        results[part] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{part} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[part])}", flush=True)
    text = report(results)
    print(text)
    if not SMOKE:
        name = {("import",): "gguf-import", ("decode",): "gguf-decode"}.get(tuple(args.parts), "gguf")
        print("wrote", write_result(name, text))


def report_import(imp: dict) -> list[str]:
    from common import median_range, paired_ratios

    gib = 2**30
    rounds = imp["rounds"]
    lines = [f"## Import of {imp['file']}: ours against llama.cpp's load, {len(rounds)} alternating rounds", "",
             "| round | loader | time | peak RSS | RSS before | loaded weights | (peak - before) / weights |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        for who in ("ours", "before", "llama"):
            if who not in r:
                continue
            v = r[who]
            size = r["ours"]["model_bytes"] if who != "llama" else r["ours"]["file_bytes"]
            secs = v["import_s"] if who != "llama" else v["load_s"]
            label = {"ours": "ours", "before": "ours before this change", "llama": "llama.cpp (use_mmap=False)"}[who]
            lines.append(f"| {i} | {label} | {secs:.1f} s | {v['peak_rss'] / gib:.2f} GiB | "
                         f"{v['rss_before'] / gib:.2f} GiB | {size / gib:.2f} GiB"
                         f"{' (file)' if who == 'llama' else ''} | "
                         f"{(v['peak_rss'] - v['rss_before']) / size:.3f} |")
    ours = [r["ours"]["import_s"] for r in rounds]
    llama = [r["llama"]["load_s"] for r in rounds]
    peak = [(r["ours"]["peak_rss"] - r["ours"]["rss_before"]) / r["ours"]["model_bytes"] for r in rounds]
    lines += ["", f"- our import time / llama.cpp's load time, paired per round: "
              f"{median_range(paired_ratios(ours, llama), '{:.1f}', 'x')} "
              f"(ours {median_range(ours, '{:.1f}', ' s')}, llama.cpp {median_range(llama, '{:.1f}', ' s')})",
              f"- our peak above the process before loading / loaded weights: {median_range(peak, '{:.3f}')}"]
    if all("before" in r for r in rounds):
        before = [r["before"]["import_s"] for r in rounds]
        bpeak = [(r["before"]["peak_rss"] - r["before"]["rss_before"]) / r["before"]["model_bytes"] for r in rounds]
        lines.append(f"- before this change: {median_range(before, '{:.1f}', ' s')}, peak / weights "
                     f"{median_range(bpeak, '{:.3f}')}; speed-up paired per round "
                     f"{median_range(paired_ratios(before, ours), '{:.1f}', 'x')}")
    lines.append(f"- scheme on import: {rounds[0]['ours']['scheme']}")
    return lines + [""]


def report_decode(d: dict) -> list[str]:
    from common import median_range, paired_ratios

    ratios = paired_ratios(d["ours_rounds"], d["peer_rounds"])
    lines = [f"## Batch-1 decode of {d['file']} after our import, against llama.cpp on the same file", "",
             f"{len(ratios)} alternating segments of {d['tokens']} tokens each (after 16 warm-up steps each), "
             f"prompt {PROMPT} tokens; our weights in the layouts {', '.join(d['formats'])} (import "
             f"{d['import_s']:.1f} s).", "",
             "| segment | ours tok/s | llama.cpp tok/s | ours / llama.cpp | DRAM GB/s around it |",
             "|---|---|---|---|---|"]
    for i, (a, b, bw) in enumerate(zip(d["ours_rounds"], d["peer_rounds"], d["bandwidth_rounds"])):
        lines.append(f"| {i} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {bw / 1e9:.1f} |")
    lines += ["", f"- ours / llama.cpp, paired per segment: {median_range(ratios, '{:.2f}', 'x')} (ours "
              f"{median_range(d['ours_rounds'], '{:.1f}', ' tok/s')}, llama.cpp "
              f"{median_range(d['peer_rounds'], '{:.1f}', ' tok/s')})"]
    if "before" in d:
        lines.append(f"- the other checkout (`--compare`), in a fresh process after these: {d['before']['tok_s']:.2f} "
                     f"tok/s over {d['tokens']} tokens")
    if "prefill" in d:
        p = d["prefill"]
        lines += ["", f"Prefill of a {p['tokens']}-token prompt (one chunk, to its first token), alternating, a new "
                  f"random prompt each round: ours {median_range(p['ours_rounds'], '{:.0f}', ' tok/s')}, llama.cpp "
                  f"{median_range(p['peer_rounds'], '{:.0f}', ' tok/s')}; paired "
                  f"{median_range(paired_ratios(p['ours_rounds'], p['peer_rounds']), '{:.2f}', 'x')}."]
    return lines + [""]


def report(r: dict) -> str:
    gib = 2**30
    lines = ["llama.cpp: llama-cpp-python 0.3.36 built with GGML_NATIVE=OFF, AVX-512 (+VNNI, BF16), AMX off (its AMX "
             "path crashes on this VM); 2 threads.", ""]
    if "import" in r:
        lines += report_import(r["import"])
    if "decode" in r:
        lines += report_decode(r["decode"])
    if "llama" in r:
        lines += ["## llama.cpp runs our exports (tiny random MoE, 16 tokens)", "",
                  "| type | file bytes | logits max rel. diff (worst position) | median position |",
                  "|---|---|---|---|"]
        for kind, v in r["llama"].items():
            lines.append(f"| {kind} | {v['bytes']:,} | {v['max_rel']:.2e} | {v['median_rel']:.2e} |")
        lines += ["", "Ours computes in fp32 on the loaded-back weights; llama.cpp quantizes activations to Q8 for "
                  "quantized matmuls, so a worst position can flip a near-tied expert of the random model.", ""]
    if "mid4l" in r:
        m = r["mid4l"]
        imp, ll = m["import"], m["llama_load"]
        lines += ["## Importing llama.cpp's Q4_K_M of mid-4L (21B-A3B shape, 4 layers, "
                  f"{m['params'] / 1e9:.2f}B parameters)", "",
                  f"- our BF16 export: {m['export_bf16_s']:.0f} s, {m['bf16_bytes'] / gib:.2f} GiB; llama.cpp "
                  f"quantize to Q4_K_M: {m['llama_quantize_s']:.0f} s, file {imp['file_bytes'] / gib:.2f} GiB",
                  f"- scheme on import: {imp['scheme']}", "",
                  "| loader | time | peak RSS | RSS before load | loaded weights | (peak - before) / weights |",
                  "|---|---|---|---|---|---|",
                  f"| ours `load_model(x.gguf)` | {imp['import_s']:.1f} s | {imp['peak_rss'] / gib:.2f} GiB | "
                  f"{imp['rss_before'] / gib:.2f} GiB | {imp['model_bytes'] / gib:.2f} GiB | "
                  f"{(imp['peak_rss'] - imp['rss_before']) / imp['model_bytes']:.2f} |",
                  f"| llama.cpp `Llama(use_mmap=False)` | {ll['load_s']:.1f} s | {ll['peak_rss'] / gib:.2f} GiB | "
                  f"{ll['rss_before'] / gib:.2f} GiB | {imp['file_bytes'] / gib:.2f} GiB (file) | "
                  f"{(ll['peak_rss'] - ll['rss_before']) / imp['file_bytes']:.2f} |", "",
                  "Ours is larger than the file: int4 g32 with a bf16 scale and zero is 5 bits a weight (Q4_K 4.5), "
                  "Q6_K "
                  "becomes 6-bit g16 with a scale and a zero (8 bits; Q6_K 6.56), Q5_K/Q5_0 would be held in 6 bits, "
                  "and the embedding is dequantized to bf16. The peak above the weights is the imported file's header "
                  "and vocabulary parsed by gguf-py plus per-expert temporaries.", "",
                  "### Our weights against gguf-py's dequantization (every tensor; first, middle, last expert of a "
                  "stack)", "",
                  "| ggml type | scales | tensors | max abs. error / max abs. weight |", "|---|---|---|---|"]
        for key, v in sorted(m["errors"].items()):
            qt, dt = key.split("|")
            lines.append(f"| {qt} | {dt} | {v['tensors']} | {v['max_rel']:.2e} |")
        lines += ["", "fp32 scales: exact (0) for every type we map (F32, BF16, Q4_K, Q5_K, Q6_K, Q8_0...); bf16 "
                  "scales round each group's scale and zero to 8 significant bits."]
    lines.append("")
    lines.append("Raw: " + json.dumps(r))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
