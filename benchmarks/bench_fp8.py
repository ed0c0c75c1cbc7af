"""FP8 vs bf16 training on a GPU with FP8 (H100/H200/H20, capability >= 8.9): the ERNIE-4.5-21B-A3B layer
shape with a few layers, the same data and seed; loss curves, their distance, and the step-time ratio.

    python benchmarks/bench_fp8.py --layers 4 --steps 60 --out benchmarks/results/2026-12-04-fp8.md

Both runs: fp32 master weights and AdamW, bf16 autocast; the fp8 run adds ``ernie45.train.fp8.enable_fp8``
(torchao tensorwise float8 for every linear but the head, rowwise ``torch._scaled_mm`` for the routed
experts). Pass criterion printed with the table: the fp8 loss stays within ``--tolerance`` (relative) of
the bf16 loss at every step after warm-up. Without an FP8 GPU it stops with the requirement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import command, commit, machine  # noqa: E402
from ernie45 import ErnieForCausalLM, ModelConfig, init_weights  # noqa: E402
from ernie45.train import losses  # noqa: E402
from ernie45.train.fp8 import enable_fp8, require_fp8  # noqa: E402


def run(cfg: ModelConfig, precision: str, steps: int, batch: int, seq: int, lr: float, seed: int
        ) -> tuple[list[float], list[float]]:
    torch.manual_seed(seed)
    model = init_weights(ErnieForCausalLM(cfg), std=0.02, seed=seed).cuda().train()
    if precision == "fp8":
        print(enable_fp8(model), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    # A learnable stream: token t+1 = (a * token t + b) mod V with a few (a, b) per sequence, plus noise.
    data = []
    for _ in range(steps):
        a = torch.randint(1, 50, (batch, 1), generator=gen)
        b = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
        x0 = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
        idx = torch.arange(seq + 1)[None]
        data.append(((x0 + idx * b + a * idx * idx) % cfg.vocab_size).cuda())
    curve, times = [], []
    for step in range(steps):
        ids = data[step]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = losses.masked_cross_entropy(logits, ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        curve.append(loss.item())
    return curve, times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tolerance", type=float, default=0.02, help="max |fp8 - bf16| / bf16 loss after warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing and the tolerance")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_fp8("cuda")
    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_hidden_layers=args.layers,
                                                              num_nextn_predict_layers=0)
    bf16, t_bf16 = run(cfg, "bf16", args.steps, args.batch, args.seq, args.lr, 0)
    torch.cuda.empty_cache()
    fp8, t_fp8 = run(cfg, "fp8", args.steps, args.batch, args.seq, args.lr, 0)
    w = args.warmup
    ratios = [a / b for a, b in zip(t_bf16[w:], t_fp8[w:])]
    dist = [abs(a - b) / b for a, b in zip(fp8[w:], bf16[w:])]
    ok = max(dist) <= args.tolerance
    lines = [
        "# fp8 vs bf16 training", "", f"- machine: {machine()}", f"- commit: {commit()}",
        f"- command: `{command()}`", "",
        f"ERNIE-4.5-21B-A3B layer shape, {args.layers} layers ({cfg.num_params() / 1e9:.2f}B params), batch "
        f"{args.batch} x {args.seq}, AdamW lr {args.lr}, clip 1.0, same data and init. Speed-up = bf16 step time / "
        f"fp8 step time, median of paired steps after {w} warm-up steps (range in brackets).", "",
        f"- step-time speed-up fp8 over bf16: **{statistics.median(ratios):.2f}x** [{min(ratios):.2f}-"
        f"{max(ratios):.2f}]",
        f"- loss distance |fp8 - bf16| / bf16 after warm-up: max {max(dist):.4f}, mean {statistics.mean(dist):.4f} "
        f"(tolerance {args.tolerance}: {'PASS' if ok else 'FAIL'})",
        f"- final loss: bf16 {bf16[-1]:.4f}, fp8 {fp8[-1]:.4f} (start {bf16[0]:.4f})", "",
        "| step | bf16 loss | fp8 loss | bf16 s | fp8 s |", "|---|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {a:.4f} | {b:.4f} | {ta:.3f} | {tb:.3f} |"
              for i, (a, b, ta, tb) in enumerate(zip(bf16, fp8, t_bf16, t_fp8))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from ernie45.utils import atomic_write_text

        atomic_write_text(args.out, text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
