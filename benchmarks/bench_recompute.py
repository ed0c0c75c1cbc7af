"""Memory and time of each recomputation choice on one training step (CPU), predicted and measured.

Each choice runs in a fresh process: first a plain step for the peak RSS growth (VmHWM) and its time,
then the same step under ``AllocationMeter`` (bytes of live tensors allocated by the step, the CPU's
stand-in for ``torch.cuda.max_memory_allocated``). The planner's prediction is
``ernie45.tools.train_plan.stage_activation_bytes`` + the fp32 gradients.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_recompute.py --out benchmarks/results/2026-12-04-recompute.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import command, commit, machine  # noqa: E402
from ernie45 import ErnieForCausalLM, ModelConfig, init_weights  # noqa: E402

# A 21B-A3B layer scaled to 2 shared CPU cores: GQA 8 x 64 over 2 kv heads, 16 experts top-4 + 1 shared.
SHAPE = ModelConfig.from_name("tiny-moe").replace(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, moe_num_experts=16, moe_k=4, moe_intermediate_size=256,
    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3)
CHOICES = ["none", "attention", "experts", "mlp", "attention,experts", "full"]


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(choice: str, batch: int, seq: int) -> dict:
    from ernie45.train import losses
    from ernie45.train.recompute import AllocationMeter, apply_recompute

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = init_weights(ErnieForCausalLM(SHAPE), std=0.02, seed=0).train()
    apply_recompute(model, choice.split(","))
    ids = torch.randint(0, SHAPE.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = losses.masked_cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:], reduction="sum")
        loss.backward()

    step()  # warm-up: lazy inits and the first gradient buffers
    for p in model.parameters():
        p.grad = None
    base = vm_hwm()
    times = []
    for _ in range(1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    rss = vm_hwm() - base
    params = list(model.parameters())
    with AllocationMeter(exclude=params + list(model.buffers())) as meter:
        step()
    return {"rss_growth": rss, "meter_peak": meter.peak, "grads": sum(p.numel() * 4 for p in params),
            "step_s": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq)))
        return
    from ernie45.tools.train_plan import stage_activation_bytes
    from ernie45.train.recompute import parse_recompute

    rows = {}
    for choice in CHOICES:
        r = subprocess.run([sys.executable, __file__, "--child", choice, "--batch", str(args.batch), "--seq",
                            str(args.seq)], capture_output=True, text=True, check=True)
        rows[choice] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[choice]["predicted"] = stage_activation_bytes(
            SHAPE, range(SHAPE.num_hidden_layers), args.batch * args.seq, 4, parse_recompute(choice.split(","))) \
            + rows[choice]["grads"]
        print(choice, rows[choice], flush=True)
    mib = 2**20
    none = rows["none"]
    lines = [
        "# activation recomputation: memory per choice (CPU, one process)", "",
        f"- load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)\n"
        f"- machine: {machine()}", f"- commit: {commit()}",
        f"- command: `{command()}` (not under the flock: the queue did not clear before the deadline)",
        "",
        f"Model: {SHAPE.num_hidden_layers} layers (layer 0 dense, 3 MoE: {SHAPE.moe_num_experts} experts top-"
        f"{SHAPE.moe_k} width {SHAPE.moe_intermediate_size} + 1 shared), hidden {SHAPE.hidden_size}, GQA "
        f"{SHAPE.num_attention_heads}x{SHAPE.head_dim} / {SHAPE.num_key_value_heads} kv heads, vocab "
        f"{SHAPE.vocab_size}, {SHAPE.num_params() / 1e6:.0f}M params, fp32; one step of {args.batch} x {args.seq} "
        "tokens (forward, summed cross-entropy, backward). Measured = peak bytes of live tensors the step "
        "allocated (AllocationMeter; gradients included, weights excluded). Predicted = "
        "`ernie45.tools.train_plan` activations + fp32 gradients. RSS = growth of the process's peak RSS over "
        "the warm-up step (the allocator reuses freed pages, so it tracks the measured peak loosely). Step time: "
        "one step after the warm-up, on a loaded machine (indicative only).", "",
        "| recompute | measured MiB | predicted MiB | predicted / measured | vs none | peak RSS growth MiB | "
        "step s | time vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for choice in CHOICES:
        r = rows[choice]
        lines.append(f"| {choice} | {r['meter_peak'] / mib:.0f} | {r['predicted'] / mib:.0f} | "
                     f"{r['predicted'] / r['meter_peak']:.2f} | {r['meter_peak'] / none['meter_peak']:.2f} | "
                     f"{r['rss_growth'] / mib:.0f} | {r['step_s']:.2f} | {r['step_s'] / none['step_s']:.2f} |")
    lines += ["", f"Gradients alone: {none['grads'] / mib:.0f} MiB (in every row)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from ernie45.utils import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
