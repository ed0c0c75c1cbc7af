"""The ``triton`` backend on a GPU (issue 19): correctness against the torch reference and decode speed against the
HBM roofline and the torch backend, one run.

Checks (PASS/FAIL with numbers; the exit status is 1 if any failed):
  1. tokens   tiny fp32 MoE models: engine greedy tokens with ``backend="triton"`` == ``backend="torch"`` on the same
              device (chunked prefill, several sequences, a speculative-style multi-token step through the engine's
              verify rows is covered by tests/accel on CPU).
  2. quant    the same model quantized int4/int8/int2 in the packed layout on the device: logits of the triton path
              within 1e-3 x the logit scale of the torch path (the codes are never expanded to a bf16 copy).
  3. speed    mid-4L (the ERNIE-4.5-21B-A3B shape, 4 layers) and the full 21B-A3B shape (28 layers), random weights
              built on the device, bf16 and int4: decode tok/s and ms/step at batch 1 / 16 / 64 for the triton and
              torch backends in alternating rounds (median of paired ratios, range), and the fraction of the HBM
              roofline (bytes a decode step must read / measured device copy bandwidth). transformers is measured
              beside them for mid-4L bf16 by ``benchmarks/bench_gpu.py`` (the same machine, the same prompts).

    PYTHONPATH=. python3 benchmarks/bench_gpu_triton.py --out $OUT                       # on the GPU machine
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_gpu_triton.py --device cpu --small   # the script itself, here

Writes ``results.json`` and ``table.md`` into ``--out``. Not yet run on a GPU: no device was lent to the task that
wrote it (see the issue's closing note).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import commit, fill_random, machine  # noqa: E402
from ernie45 import ModelConfig, SamplingParams  # noqa: E402

RESULTS: list[dict] = []


def record(name: str, ok: bool, **info) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    print(f"{'PASS' if ok else 'FAIL'} {name}: " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def guarded(name: str, fn, *args) -> None:  # noqa: ANN001
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        record(name, False, error=f"{type(err).__name__}: {err}")


def sync(dev: str) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def tiny() -> ModelConfig:
    return ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False, head_dim=16)


def random_model(cfg: ModelConfig, dev: str, dtype: torch.dtype, quant: str | None = None):  # noqa: ANN201
    """Random weights built on the device (bf16, normal 0.02); quantized there with round-to-nearest when asked,
    which gives the layout that device takes (``packed`` on CUDA: the codes the Triton kernels read)."""
    from ernie45.model.checkpoint import build_empty

    model = fill_random(build_empty(cfg, dtype, device=dev)).eval()
    if quant is not None:
        from ernie45.quant import QuantConfig, quantize_model

        model = quantize_model(model, QuantConfig.from_name(quant))
    return model


def generate(model, backend: str, prompts, new: int, **engine) -> tuple[list[list[int]], float, int]:  # noqa: ANN001
    from ernie45.engine import LLMEngine

    eng = LLMEngine(model, backend=backend, **engine)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True))
    done, steps, first = {}, 0, None
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        steps += 1
        if first is None:
            sync(str(next(model.parameters()).device))
            first = time.perf_counter()
    sync(str(next(model.parameters()).device))
    decode_s = time.perf_counter() - first
    del t0
    return [done[str(i)] for i in range(len(prompts))], decode_s, steps


def check_tokens(dev: str) -> None:
    cfg = tiny()
    model = fill_random(__import__("ernie45.model.model", fromlist=["x"]).ErnieForCausalLM(cfg), std=0.08).to(dev)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (21, 6, 11)]
    kw = dict(kv_cache_memory="4MB", block_size=4, max_num_batched_tokens=16)
    ref, _, _ = generate(model, "torch", prompts, 12, **kw)
    got, _, _ = generate(model, "triton", prompts, 12, **kw)
    record("tokens/tiny-moe fp32 triton == torch", got == ref, sequences=len(prompts))


def check_quant(dev: str) -> None:
    from ernie45.accel import accelerate
    from ernie45.model.model import ErnieForCausalLM
    from ernie45.quant import QuantConfig, quantize_model

    cfg = tiny()
    for q in ("int4", "int8", "int2"):
        model = quantize_model(fill_random(ErnieForCausalLM(cfg), std=0.08).to(dev), QuantConfig.from_name(q))
        layouts = {m.layout for m in model.modules() if hasattr(m, "layout") and hasattr(m, "qweight")}
        ids = torch.tensor([[5, 17, 99, 100, 7, 8, 9, 10]], device=dev)
        with torch.no_grad():
            accelerate(model, "torch")
            ref = model(ids).logits.float()
            accelerate(model, "triton")
            got = model(ids).logits.float()
        d, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        packed = layouts == {"packed"} or torch.device(dev).type != "cuda"  # CPU builds keep its own layouts
        record(f"quant/{q} triton == torch (packed codes)", d <= 1e-3 * max(scale, 1e-3) and packed,
               max_abs_diff=d, logit_scale=scale, layouts=sorted(layouts))


def copy_bandwidth(dev: str) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    n = (1 << 30) if torch.device(dev).type == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def step_bytes(model, cfg: ModelConfig, batch: int, context: int) -> float:  # noqa: ANN001
    """Bytes a decode step of ``batch`` sequences must read: every non-expert tensor once, the routed experts the
    batch is expected to touch (E x (1 - (1 - k/E)^batch) per MoE layer, uniform routing), and the KV cache."""
    expert, rest = 0, 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        n = t.numel() * t.element_size()
        if ".experts." in name:
            expert += n
        elif "embed_tokens" not in name or cfg.tie_word_embeddings:
            rest += n
    e, k = cfg.moe_num_experts, cfg.moe_k
    touched = (1 - (1 - k / e) ** batch) if e else 0.0
    return rest + expert * touched + batch * context * cfg.kv_bytes_per_token(2)


def speed(dev: str, cfg: ModelConfig, label: str, quant: str | None, batches: list[int], plen: int, new: int,
          rounds: int) -> dict:
    t = time.perf_counter()
    model = random_model(cfg, dev, torch.bfloat16, quant)
    sync(dev)
    print(f"built {label} {quant or 'bf16'} on {dev} in {time.perf_counter() - t:.1f}s", flush=True)
    bw = copy_bandwidth(dev)
    out = {"copy_GBps": bw / 1e9, "rows": {}}
    for b in batches:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(3, cfg.vocab_size, (b, plen), generator=g).tolist()
        kw = dict(max_num_seqs=max(16, b), max_num_batched_tokens=max(2048, b * plen), block_size=16,
                  kv_cache_memory=cfg.kv_bytes_per_token(2) * (b * (plen + new) + 1024), max_model_len=plen + new + 16)
        rates = {"triton": [], "torch": []}
        for r in range(rounds + 1):  # round 0 warms up both
            for backend in ("triton", "torch"):
                _, decode_s, steps = generate(model, backend, prompts, new, **kw)
                if r:
                    rates[backend].append(b * (new - 1) / decode_s)
        ratios = [a / c for a, c in zip(rates["triton"], rates["torch"])]
        tok_s = statistics.median(rates["triton"])
        roof = bw / step_bytes(model, cfg, b, plen + new // 2) * b
        out["rows"][b] = {"triton_tok_s": tok_s, "torch_tok_s": statistics.median(rates["torch"]),
                          "ms_per_step": 1000 * b / tok_s, "ratio_median": statistics.median(ratios),
                          "ratio_range": [min(ratios), max(ratios)], "roofline_tok_s": roof,
                          "roofline_fraction": tok_s / roof}
        print(label, quant or "bf16", b, out["rows"][b], flush=True)
    record(f"speed/{label} {quant or 'bf16'} ran", True,
           **{f"b{b}_roofline": round(r["roofline_fraction"], 3) for b, r in out["rows"].items()})
    del model
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes: check the script itself (CPU, interpreter)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_gpu_triton-"))
    args = ap.parse_args()
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device", flush=True)
        return 1
    t0 = time.perf_counter()
    env = f"{machine()}; cuda {torch.version.cuda}; commit {commit()}"
    guarded("tokens", check_tokens, dev)
    guarded("quant", check_quant, dev)
    speeds = {}
    if args.small:
        shapes = [("small-moe", tiny(), [1, 4], 16, 8)]
    else:
        from benchmarks.bench_generate import mid_4l

        full = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_nextn_predict_layers=0)
        shapes = [("mid-4L", mid_4l(), [1, 16, 64], 128, 128), ("21B-A3B", full, [1, 16, 64], 128, 64)]
    for label, cfg, batches, plen, new in shapes:
        for quant in (None, "int4"):
            key = f"{label}/{quant or 'bf16'}"
            try:
                speeds[key] = speed(dev, cfg, label, quant, batches, plen, new, 1 if args.small else args.rounds)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                record(f"speed/{key}", False, error=f"{type(err).__name__}: {err}")
    rows = ["| model | batch | triton tok/s | torch tok/s | ratio (median, range) | ms/step | roofline |",
            "|---|---|---|---|---|---|---|"]
    for key, s in speeds.items():
        for b, r in s["rows"].items():
            rows.append(f"| {key} | {b} | {r['triton_tok_s']:.1f} | {r['torch_tok_s']:.1f} | {r['ratio_median']:.2f}x "
                        f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | {r['ms_per_step']:.2f} | "
                        f"{100 * r['roofline_fraction']:.0f}% of {r['roofline_tok_s']:.0f} |")
    checks = "\n".join(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} |" for r in RESULTS)
    md = (f"- machine: {env}\n- command: `{' '.join(sys.argv)}`\n- wall: {time.perf_counter() - t0:.0f}s\n\n"
          f"| check | result |\n|---|---|\n{checks}\n\n" + "\n".join(rows) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": env, "checks": RESULTS, "speed": speeds}, f, indent=1, default=str)
    print(md)
    return 1 if any(not r["ok"] for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
