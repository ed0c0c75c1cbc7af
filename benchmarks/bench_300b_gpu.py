"""The 300B-A47B at 2 bits on one GPU, and with its routed experts in host RAM (issue 20's device measurements).

Two parts, each in its own process (fresh CUDA memory statistics):

- ``gpu``: the ``ernie-4.5-300b-a47b`` shape at the ``int2`` preset (int8 dense weights, 2-bit routed experts)
  built straight on the device: the module tree on the meta device, the quantize swap (``build_only``), then
  every tensor materialised on the GPU and filled there (random codes, scales giving weights ~U(-0.02, 0.02);
  no checkpoint, no host copy). Reports ``torch.cuda.max_memory_allocated`` against the planner
  (``ernie45.tools.hybrid``: weights + KV cache + activations, without the CUDA context, which the allocator does
  not see), decode tok/s at batch 1 / 8 / 32, and at batch 1 the fraction of the HBM roofline (bytes one
  decode step reads / the measured device copy bandwidth).
- ``hybrid``: the same model with every MoE layer's routed experts in host RAM (built and filled there) and the
  rest on the GPU, the GPU memory capped with ``torch.cuda.set_per_process_memory_fraction`` at ``--gpu-cap``
  (default 24 GB, a 24-48 GB GPU user); decode tok/s at batch 1 and 8 against the host-RAM roofline for the
  experts' bytes (top-k of E per MoE layer at batch 1, the expected distinct experts of B random tokens at
  batch B) over the measured host read bandwidth.

Backend: whatever ``accelerate(model, "auto")`` picks when the acceleration pass is on this branch, else the
plain torch path. The real-speed run needs the lead's ``triton`` backend (fused MoE with the 2-bit codes
dequantized in registers, paged attention; issue 19): without it every quantized matmul on CUDA dequantizes its
weight to bf16 first, so the figures measure that path, not the hardware.

``--small``: a tiny MoE shape on the CPU ("GPU" = CPU, no memory cap), to check the script itself in seconds;
it prints a SMOKE report and writes no results file.

    python benchmarks/bench_300b_gpu.py                    # on the H200: both parts, writes results/<date>-300b-gpu.md
    python benchmarks/bench_300b_gpu.py --small            # CPU smoke of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import dram_bandwidth  # noqa: E402
from ernie45.config import ModelConfig  # noqa: E402
from ernie45.engine.llm import LLMEngine  # noqa: E402
from ernie45.engine.sampling_params import SamplingParams  # noqa: E402
from ernie45.model.layers import RotaryEmbedding  # noqa: E402
from ernie45.model.model import ErnieForCausalLM  # noqa: E402
from ernie45.offload import place_experts  # noqa: E402
from ernie45.quant.modules import QuantExperts  # noqa: E402
from ernie45.quant.quantize import quantize_model  # noqa: E402
from ernie45.tools.hybrid import estimate_placements  # noqa: E402

MODEL = "ernie-4.5-300b-a47b"


def shape(small: bool) -> ModelConfig:
    if small:
        return ModelConfig.from_name("tiny-moe").replace(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
            moe_layer_end_index=3, tie_word_embeddings=False, num_nextn_predict_layers=0)
    return ModelConfig.from_name(MODEL).replace(num_nextn_predict_layers=0)


@torch.no_grad()
def _fill(module: torch.nn.Module, recurse: bool = True) -> None:
    """Random values on whatever device the tensors are: floats ~N(0, 0.02), norms 1, quantized codes uniform
    bytes, quantization scales so that weights are ~U(-0.02, 0.02), rotary tables recomputed."""
    tensors = list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
    for name, t in tensors:
        if t.dtype in (torch.uint8, torch.int8):
            t.view(torch.uint8).random_(0, 256)
        elif not t.is_floating_point() or name.endswith("inv_freq"):
            continue
        elif name.endswith("e_score_correction_bias"):
            t.zero_()
        elif "norm" in name:
            t.fill_(1.0)
        elif name.endswith("scale_zeros"):
            t[..., 0].fill_(0.02 / 2)
            t[..., 1].zero_()
        elif name.endswith("scales"):
            t.fill_(0.02 / 127)
        elif name.endswith("zeros"):
            t.fill_(1e-3)
        else:
            t.normal_(0.0, 0.02)
    for m in module.modules() if recurse else [module]:
        if isinstance(m, RotaryEmbedding):
            m.reset()


def build(cfg: ModelConfig, device: torch.device, experts_host: bool) -> ErnieForCausalLM:
    """int2 model built on the meta device, then materialised: routed experts on the host when ``experts_host``
    (filled there), everything else on ``device`` (filled there)."""
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg).to(torch.bfloat16)  # the router stays fp32 (Router._apply)
    quantize_model(model, "int2", build_only=True, dtype=torch.bfloat16)
    hosted = {id(m) for m in model.modules() if isinstance(m, QuantExperts)} if experts_host else set()
    inside = set()
    for m in model.modules():
        if id(m) in hosted:
            m.to_empty(device="cpu")
            _fill(m)
            inside |= {id(c) for c in m.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m.to_empty(device=device, recurse=False)
            _fill(m, recurse=False)
    model.eval()
    if experts_host:
        place_experts(model, device, experts_on="cpu")
    return model


def accelerate_auto(model: torch.nn.Module) -> str:
    try:
        from ernie45.accel import accelerate  # the acceleration pass (issue 22); absent on older branches
    except ImportError:
        return "torch (no acceleration pass on this branch)"
    out = accelerate(model, "auto")
    return str(getattr(out, "backend", None) or getattr(model, "backend", None) or "auto")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Best of 5: bytes read per second by a device-to-device copy (read + write counted as read only x2)."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x, y
    return 2 * int(gib * 2**30) / best


def decode(model: ErnieForCausalLM, cfg: ModelConfig, device: torch.device, batch: int, prompt: int, tokens: int,
           kv_bytes: int) -> dict:
    """Decode tok/s at ``batch`` concurrent sequences (prefill not timed); median ms of the decode steps."""
    eng = LLMEngine(model, max_num_seqs=batch, max_num_batched_tokens=max(256, batch * prompt), block_size=16,
                    kv_cache_memory=kv_bytes, max_model_len=prompt + tokens + 16)
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for rep in range(2):  # rep 0 warms up (allocator, shapes), rep 1 is timed
        for i, p in enumerate(torch.randint(3, cfg.vocab_size, (batch, prompt), generator=g).tolist()):
            eng.add_request(f"{rep}-{i}", p, params if rep else SamplingParams(temperature=0.0, max_tokens=4,
                                                                              ignore_eos=True))
        steps = []
        while eng.has_unfinished_requests():
            sync(device)
            t0 = time.perf_counter()
            eng.step()
            sync(device)
            steps.append(time.perf_counter() - t0)
    decode_steps = steps[1:]  # the first step of the timed round is the prefill
    ms = 1000 * statistics.median(decode_steps)
    return {"batch": batch, "ms_per_step": ms, "tok_s": batch * 1000 / ms, "steps": len(decode_steps)}


def expected_distinct(e: int, k: int, b: int) -> float:
    """Expected distinct experts of one MoE layer chosen by ``b`` tokens routed uniformly, k of e each."""
    return e * (1 - (1 - k / e) ** b)


def part(name: str, args: argparse.Namespace) -> dict:
    small = args.small
    cfg = shape(small)
    device = torch.device("cpu" if small else "cuda")
    context = args.prompt + args.tokens + 16
    batches = [1, 8, 32] if name == "gpu" else [1, 8]
    out: dict = {"part": name, "device": str(device)}
    if name == "hybrid" and device.type == "cuda":
        cap = int(float(args.gpu_cap.upper().rstrip("GB")) * 1e9)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        out["gpu_cap_bytes"] = cap
    t0 = time.perf_counter()
    model = build(cfg, device, experts_host=name == "hybrid")
    out["build_s"] = time.perf_counter() - t0
    out["backend"] = accelerate_auto(model)
    plan = estimate_placements(cfg, weights="int2", context=context, batch=max(batches), gpu="h200",
                               host_bandwidth="60GB/s")
    est = plan.by_n(len(plan.placements) - 1 if name == "gpu" else 0)
    kv = est.kv_cache_bytes
    out["planned"] = {"gpu_weights_bytes": est.gpu_weights_bytes, "kv_cache_bytes": kv,
                      "activation_bytes": est.activation_bytes,
                      "gpu_bytes_without_context": est.gpu_weights_bytes + kv + est.activation_bytes,
                      "host_expert_bytes": est.host_expert_bytes,
                      "gpu_read_bytes_per_token": est.gpu_read_bytes_per_token,
                      "host_read_bytes_per_token": est.host_read_bytes_per_token}
    on_dev = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                 if t.device == device)
    out["weights_on_device_bytes"] = on_dev if device.type == "cuda" else None
    out["runs"] = []
    for b in batches:
        kv_b = cfg.kv_bytes_per_token(2) * b * (context + 16)
        out["runs"].append(decode(model, cfg, device, b, args.prompt, args.tokens, kv_b))
    if device.type == "cuda":
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        out["memory_vs_planner"] = out["max_memory_allocated"] / out["planned"]["gpu_bytes_without_context"]
    e, k = cfg.moe_num_experts, cfg.moe_k
    moe_layers = len(plan.placements) - 1
    per_layer_experts = est.host_expert_bytes / moe_layers if name == "hybrid" else est.gpu_expert_bytes / moe_layers
    if name == "gpu":
        bw = copy_bandwidth(device, 0.05 if small else 4.0)
        out["device_bandwidth"] = bw
        r1 = out["runs"][0]
        roof_ms = 1000 * est.gpu_read_bytes_per_token / bw
        out["roofline_ms_batch1"] = roof_ms
        out["roofline_fraction_batch1"] = roof_ms / r1["ms_per_step"]
    else:
        bw = dram_bandwidth(0.05 if small else 4.0)
        out["host_bandwidth"] = bw
        for r in out["runs"]:
            expert_bytes = moe_layers * per_layer_experts * expected_distinct(e, k, r["batch"]) / e
            r["host_roofline_ms"] = 1000 * expert_bytes / bw
            r["host_roofline_fraction"] = r["host_roofline_ms"] / r["ms_per_step"]
    return out


def report(results: dict, args: argparse.Namespace) -> str:
    lines = []
    if args.small:
        lines.append("SMOKE RUN (--small: tiny shape on the CPU; checks the script, not the hardware)\n")
    for name, r in results.items():
        p = r["planned"]
        lines.append(f"## {name}: backend {r['backend']}, built in {r['build_s']:.1f} s on {r['device']}")
        if r.get("max_memory_allocated") is not None:
            lines.append(f"- GPU max_memory_allocated {r['max_memory_allocated'] / 1e9:.2f} GB vs planner "
                         f"{p['gpu_bytes_without_context'] / 1e9:.2f} GB (weights {p['gpu_weights_bytes'] / 1e9:.2f}"
                         f" + KV {p['kv_cache_bytes'] / 1e9:.2f} + activations {p['activation_bytes'] / 1e9:.2f}): "
                         f"ratio {r['memory_vs_planner']:.3f}; weights on the device "
                         f"{r['weights_on_device_bytes'] / 1e9:.2f} GB")
        if "gpu_cap_bytes" in r:
            lines.append(f"- GPU memory capped at {r['gpu_cap_bytes'] / 1e9:.0f} GB; routed experts in host RAM: "
                         f"{p['host_expert_bytes'] / 1e9:.2f} GB")
        if name == "gpu":
            lines.append(f"- device copy bandwidth {r['device_bandwidth'] / 1e9:.0f} GB/s; batch-1 roofline "
                         f"{r['roofline_ms_batch1']:.2f} ms/step ({p['gpu_read_bytes_per_token'] / 1e9:.2f} GB "
                         f"read per token): {100 * r['roofline_fraction_batch1']:.1f}% of it reached")
        else:
            lines.append(f"- host read bandwidth {r['host_bandwidth'] / 1e9:.0f} GB/s")
        lines.append("\n| batch | ms/step | tok/s | host roofline ms | fraction |\n|---|---|---|---|---|")
        for run in r["runs"]:
            roof = f"{run['host_roofline_ms']:.2f} | {100 * run['host_roofline_fraction']:.1f}%" \
                if "host_roofline_ms" in run else " | "
            lines.append(f"| {run['batch']} | {run['ms_per_step']:.2f} | {run['tok_s']:.2f} | {roof} |")
        lines.append("")
    lines.append("raw: " + json.dumps(results))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["gpu", "hybrid"], choices=["gpu", "hybrid"])
    ap.add_argument("--small", action="store_true", help="tiny shape on the CPU: a smoke run of the script")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (prefill, not timed)")
    ap.add_argument("--gpu-cap", default="24GB", help="GPU memory the hybrid part may use (default 24GB)")
    ap.add_argument("--_part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.small and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or --small for the CPU smoke run")
    if args._part:
        print(json.dumps(part(args._part, args)))
        return
    results = {}
    for name in args.parts:
        cmd = [sys.executable, __file__, "--_part", name, "--tokens", str(args.tokens), "--prompt", str(args.prompt),
               "--gpu-cap", args.gpu_cap] + (["--small"] if args.small else [])
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"part {name} failed")
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name} ({time.perf_counter() - t0:.0f} s): done", flush=True)
    text = report(results, args)
    print(text)
    if not args.small:
        from common import write_result

        print("wrote", write_result("300b-gpu", text))


if __name__ == "__main__":
    main()
