"""The hardware planner against measurement and against the peers' figures, in one run.

1. Predicted vs measured resident memory on this machine: weights after ``ernie45.load_model`` (fp32, bf16,
   int8, int4 quantize-on-load) of random-weight checkpoints, and the engine's KV cache sized from the
   planner's figure; each in a fresh subprocess, VmRSS delta after malloc_trim.
2. Peer method, run here: accelerate's ``estimate-memory`` arithmetic (parameters of the transformers model
   built on the meta device x dtype size; int8 = 1/2 and int4 = 1/4 of fp16) against ours.
3. Published figures: FastDeploy's minimum GPU counts for the 300B on 80 GB GPUs and Baidu's 89 GB 2-bit
   checkpoint on one 141 GB GPU, against ours.

Run: ``flock /tmp/ernie45-heavy.lock python benchmarks/bench_plan.py`` (a minute of CPU on 2 cores, but
4.2 GB peak RSS measured: the medium checkpoint's quantize-on-load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_result  # noqa: E402
from ernie45 import ModelConfig  # noqa: E402
from ernie45.tools import plan_memory  # noqa: E402
from tests.tools.test_plan_measured import KV_SCRIPT, ROOT, measure_load, random_checkpoint  # noqa: E402

GB = 1e9


def measured_section(tmp: str) -> list[str]:
    rows = ["| checkpoint | load | predicted weights (MB) | RSS delta (MB) | ratio |", "|---|---|---|---|---|"]
    small = random_checkpoint(ModelConfig.from_name("ernie-4.5-0.3b").replace(num_hidden_layers=4),
                              os.path.join(tmp, "small"))
    mid = random_checkpoint(ModelConfig.from_name("ernie-4.5-21b-a3b").replace(
        num_hidden_layers=2, moe_num_experts=8, moe_layer_end_index=1, num_nextn_predict_layers=0),
        os.path.join(tmp, "mid"))
    cases = [(small, "0.3B shape, 4 layers", d, q) for d, q in
             (("fp32", "none"), ("bf16", "none"), ("bf16", "int8"), ("bf16", "int4"))]
    cases += [(mid, "21B shape, 2 layers, 8 experts", "bf16", q) for q in ("none", "int4")]
    for path, label, dtype, quant in cases:
        weights = dtype if quant == "none" else quant
        pred = plan_memory(path, weights=weights, dtype=dtype, device="cpu", devices=[]).weights_bytes
        got = measure_load(path, dtype, quant)
        rows.append(f"| {label} | {weights} | {pred / 1e6:,.1f} | {got['rss_delta'] / 1e6:,.1f} | "
                    f"{got['rss_delta'] / pred:.3f} |")
        print(rows[-1], flush=True)
    rows += ["", "| KV cache (engine, 0.3B) | dtype | predicted (MB) | RSS delta (MB) | ratio |",
             "|---|---|---|---|---|"]
    for kv, ctx, batch in (("bf16", 4096, 4), ("fp32", 4096, 4)):
        pred = plan_memory("ernie-4.5-0.3b", kv_dtype=kv, context=ctx, batch=batch, devices=[]).kv_cache_bytes
        out = subprocess.run([sys.executable, "-c", KV_SCRIPT, "ernie-4.5-0.3b", kv, str(pred), "16"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {ctx} tokens x {batch} | {kv} | {pred / 1e6:,.1f} | {got['rss_delta'] / 1e6:,.1f} | "
                    f"{got['rss_delta'] / pred:.3f} |")
        print(rows[-1], flush=True)
    return rows


def accelerate_style(name: str) -> int:
    """Bytes of the transformers model in bf16 as accelerate's estimate-memory counts them (meta build)."""
    import transformers

    cfg = ModelConfig.from_name(name).replace(num_nextn_predict_layers=0).to_hf_dict()
    cfg.pop("architectures")
    model_type = cfg.pop("model_type")
    if model_type == "ernie4_5_moe":
        hf_cfg, cls = transformers.Ernie4_5_MoeConfig(**cfg), transformers.Ernie4_5_MoeForCausalLM
    else:
        hf_cfg = transformers.Ernie4_5Config(**{k: v for k, v in cfg.items() if not k.startswith("moe_")})
        cls = transformers.Ernie4_5ForCausalLM
    with torch.device("meta"):
        model = cls(hf_cfg)
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique) * 2


def peer_section() -> list[str]:
    rows = ["| model | format | accelerate-style (GB) | ernie45 plan weights (GB) | ours / theirs |",
            "|---|---|---|---|---|"]
    for name in ("ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b"):
        bf16 = accelerate_style(name)
        for fmt, theirs in (("bf16", bf16), ("wint8", bf16 // 2), ("wint4", bf16 // 4)):
            ours = plan_memory(name, weights=fmt, devices=[]).weights_total_bytes
            rows.append(f"| {name} | {fmt} | {theirs / GB:,.2f} | {ours / GB:,.2f} | {ours / theirs:.3f} |")
    return rows


def published_section() -> list[str]:
    rows = ["| 300B-A47B, context 32768, batch 1 | FastDeploy / Baidu | ernie45 plan |", "|---|---|---|"]
    published = {"wint8": 8, "wint4": 4, "wint2": 2, "fp8": 8, "bf16": 16}
    for fmt, n in published.items():
        plan = plan_memory("ernie-4.5-300b-a47b", weights=fmt, context=32768, batch=1)
        h100 = next(f for f in plan.fits if f.device == "h100")
        rows.append(f"| {fmt}: 80 GB GPUs needed | {n} | {h100.min_gpus} |")
    w2 = plan_memory("ernie-4.5-300b-a47b", weights="wint2", context=32768, batch=1)
    h200 = next(f for f in w2.fits if f.device == "h200")
    rows.append(f"| wint2 checkpoint size | 89 GB | {w2.weights_total_bytes / GB:.1f} GB "
                f"({w2.weights_total_bytes / 2**30:.1f} GiB) |")
    rows.append(f"| wint2 on one 141 GB GPU | fits | {'fits' if h200.min_gpus == 1 else 'no'} "
                f"({w2.total_bytes / 2**30:.1f} GiB of {h200.usable_bytes / 2**30:.1f} usable) |")
    return rows


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        measured = measured_section(tmp)
    text = "\n".join(["## Predicted vs measured (this machine)", "", *measured, "",
                      "## Peer method: accelerate estimate-memory arithmetic on the transformers model", "",
                      *peer_section(), "",
                      "accelerate counts every parameter at the nominal width (embeddings and router included, no "
                      "scales); ernie45 keeps the router fp32 and embeddings/head bf16 and adds per-row scales.", "",
                      "## Published figures", "", *published_section()])
    print(text)
    print("wrote", write_result("plan", text))


if __name__ == "__main__":
    main()
