"""Pipeline bubble on CPU gloo: measured idle fraction of each rank against the schedule's theory.

Each rank times its own compute (``PipelineStage.forward_one_chunk`` + ``backward_one_chunk`` and the
zero-bubble weight pass) inside a step; bubble = 1 - compute / wall. Theory for equal stage times and
free communication: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v·m+p-1) interleaved with v stages per rank.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_pipeline.py --out benchmarks/results/2026-12-04-pipeline.md
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import command, commit, machine  # noqa: E402
from ernie45 import ErnieForCausalLM, ModelConfig, init_weights  # noqa: E402

SHAPE = ModelConfig.from_name("tiny-moe").replace(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, moe_num_experts=16, moe_k=4, moe_intermediate_size=256,
    moe_num_shared_experts=1, moe_layer_start_index=1)
CASES = [("1f1b", 1, 2), ("1f1b", 1, 4), ("1f1b", 1, 8), ("gpipe", 1, 4), ("interleaved-1f1b", 2, 4), ("zbv", 2, 4)]


def _timed(fn, acc: list[float]):  # noqa: ANN001, ANN202
    @functools.wraps(fn)
    def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc.append(time.perf_counter() - t0)
    return run


def measure(rank: int, world: int, out: dict, steps: int, seq: int, rows: int) -> None:
    from ernie45.parallel.mesh import ParallelConfig
    from ernie45.parallel.pipeline import Pipeline, PipelineConfig, PipelineMesh

    for schedule, virtual, m in CASES:
        pmesh = PipelineMesh(2, ParallelConfig(), SHAPE)
        cfg = PipelineConfig(pp=2, microbatches=m, schedule=schedule, virtual=virtual)
        model = init_weights(ErnieForCausalLM(SHAPE), std=0.02, seed=0).train()
        pipe = Pipeline(model, pmesh, cfg)
        ids = torch.randint(0, SHAPE.vocab_size, (rows * m, seq + 1), generator=torch.Generator().manual_seed(0))
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        pipe.forward_backward(x, y)  # builds the stages and infers shapes
        busy: list[float] = []
        for st in pipe.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                if hasattr(st, name):
                    setattr(st, name, _timed(getattr(st, name), busy))
        walls, fracs = [], []
        for _ in range(steps):
            for p in pipe.parameters():
                p.grad = None
            busy.clear()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            pipe.forward_backward(x, y)
            wall = time.perf_counter() - t0
            walls.append(wall)
            fracs.append(1 - sum(busy) / wall)
        out[f"{schedule}/v{virtual}/m{m}/rank{rank}"] = {"wall": statistics.median(walls),
                                                         "bubble": statistics.median(fracs),
                                                         "bubble_range": [min(fracs), max(fracs)],
                                                         "theory": cfg.bubble_theory(),
                                                         "compute_per_step": statistics.median(walls) *
                                                         (1 - statistics.median(fracs))}


def _entry(rank: int, world: int, port: int, steps: int, seq: int, rows: int, path: str) -> None:
    import json
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    out: dict = {}
    measure(rank, world, out, steps, seq, rows)
    with open(f"{path}.rank{rank}", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def main() -> None:
    import json
    import tempfile

    import torch.multiprocessing as mp

    from tests.parallel.launcher import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res")
        mp.spawn(_entry, args=(2, free_port(), args.steps, args.seq, args.rows, path), nprocs=2, join=True)
        res = {}
        for r in range(2):
            with open(f"{path}.rank{r}") as f:
                res.update(json.load(f))
    lines = [
        "# pipeline bubble (CPU gloo, pp=2)", "",
        f"- load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)\n"
        f"- machine: {machine()}; 2 ranks, 1 torch thread each", f"- commit: {commit()}",
        f"- command: `{command()}` (not under the flock: the queue of other helpers' benchmarks did not clear "
        "before the deadline)", "",
        f"Model: {SHAPE.num_hidden_layers} layers (MoE layers "
        f"{[i for i in range(SHAPE.num_hidden_layers) if SHAPE.is_moe_layer(i)]}: {SHAPE.moe_num_experts} experts "
        f"top-{SHAPE.moe_k} + 1 shared; the others dense), hidden {SHAPE.hidden_size}, vocab {SHAPE.vocab_size}, "
        f"{SHAPE.num_params() / 1e6:.1f}M params; micro-batch {args.rows} x {args.seq} tokens; split by parameter "
        f"count (embedding on stage 0, head on the last). Bubble = 1 - (time in the stage's forward/backward "
        f"chunks) / step wall time, per rank, median of {args.steps} steps after one warm-up (range in brackets). "
        "Theory: (p-1)/(m+p-1) for GPipe/1F1B, (p-1)/(v*m+p-1) interleaved; ZBV's theory is 0 when F = B = W "
        "(the schedule's assumption); the column shows the interleaved value for v=2. The theory assumes equal "
        "stage times: the last column shows how far the two ranks' compute differs (the head's vocabulary "
        "matmul and the cross-entropy sit on the last stage).", "",
        "| schedule | v | m | theory | rank 0 bubble | rank 1 bubble | step wall s | compute s rank 0 / rank 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for schedule, v, m in CASES:
        r0, r1 = res[f"{schedule}/v{v}/m{m}/rank0"], res[f"{schedule}/v{v}/m{m}/rank1"]
        lines.append(f"| {schedule} | {v} | {m} | {r0['theory']:.3f} | {r0['bubble']:.3f} "
                     f"[{r0['bubble_range'][0]:.3f}-{r0['bubble_range'][1]:.3f}] | {r1['bubble']:.3f} "
                     f"[{r1['bubble_range'][0]:.3f}-{r1['bubble_range'][1]:.3f}] | {r0['wall']:.2f} | "
                     f"{r0['compute_per_step']:.2f} / {r1['compute_per_step']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from ernie45.utils import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
