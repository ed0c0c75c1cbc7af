"""``ernie45 plan MODEL``: memory per GPU and the GPUs that fit, as a table (``format_plan``), JSON or a PNG plot.

Example: ``ernie45 plan ernie-4.5-300b-a47b --weights wint4 --context 131072 --batch 1 --json``.
"""

from __future__ import annotations

import argparse
import json
import logging

from ernie45.tools.formats import FORMAT_HELP, KV_BYTES
from ernie45.tools.hardware import DEFAULT_UTILIZATION, GiB, catalogue, find_device
from ernie45.tools.plan import MemoryPlan

log = logging.getLogger(__name__)


def cmd_plan(args: argparse.Namespace) -> int:
    from ernie45.tools.plan import PlanRequest, plan_memory

    if args.gpu:  # hybrid placement: one named GPU and host RAM (ernie45.tools.hybrid)
        return cmd_placement(args)
    req = PlanRequest(
        weights=args.weights, dtype=args.dtype, kv_dtype=args.kv_dtype, context=args.context,
        batch=args.batch, tp=args.tp, ep=args.ep, pp=args.pp, mode=args.mode, optimizer=args.optimizer,
        lora_rank=args.lora_rank, gradient_checkpointing=not args.no_gradient_checkpointing,
        prefill_chunk=args.prefill_chunk, block_size=args.block_size,
        quantize_head={None: None, "yes": True, "no": False}[args.quantize_head], mtp=args.mtp,
        device="cpu" if args.cpu else "gpu",
    )
    devices = catalogue() if not args.device else [find_device(d) for d in args.device]
    plan = plan_memory(args.model, req, devices=devices, utilization=args.utilization)
    if args.plot:
        from ernie45.tools.plot import plot_memory

        formats = tuple(args.plot_formats.split(",")) if args.plot_formats else None
        plot_memory(args.model, args.plot, req, **({"formats": formats} if formats else {}),
                    utilization=args.utilization)
    training = None
    if args.mode == "full" and (args.pp > 1 or args.ep > 1 or args.fsdp > 1 or args.recompute):
        training = _training_layout(args)  # issue 17: pp x ep x fsdp per-rank memory and the smallest layouts
    if args.json:
        print(json.dumps(plan.to_dict() | ({"training_layout": training[0]} if training else {}), indent=2))
    else:
        print(format_plan(plan))
        if training:
            print("\n" + training[1])
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


def _training_layout(args: argparse.Namespace) -> tuple[dict, str]:
    from dataclasses import asdict

    from ernie45.tools.formats import FLOAT_BYTES
    from ernie45.tools.plan import load_config
    from ernie45.tools.train_plan import TrainLayout, format_train_plan, smallest_layouts, train_memory

    if args.tp > 1:
        raise ValueError("--tp with --mode full: the trainers shard training with --pp, --ep and --fsdp; drop --tp")
    config = load_config(args.model)
    recompute = args.recompute.split(",") if args.recompute else None
    dtype_bytes = FLOAT_BYTES[(args.dtype or "bf16").lower()]
    mem = train_memory(config, TrainLayout(args.pp, args.ep, args.fsdp), args.batch, args.context, recompute,
                       dtype_bytes, args.microbatches, device="cpu" if args.cpu else "gpu")
    devices = [find_device(d) for d in args.device] if args.device else None
    fits = smallest_layouts(config, args.batch, args.context, recompute, dtype_bytes, devices,
                            utilization=args.utilization)
    return {"memory": mem.to_dict(), "smallest": [asdict(f) for f in fits]}, format_train_plan(mem, fits)


def format_plan(plan: MemoryPlan) -> str:
    """The human-readable table ``ernie45 plan`` prints."""
    p = plan.parallel
    lines = [
        f"{plan.model}: {plan.params / 1e9:.2f}B params ({plan.active_params / 1e9:.2f}B active), "
        f"{plan.mode}, weights {plan.weights_format}, KV {plan.kv_dtype}",
        f"context {plan.context:,} x batch {plan.batch}, tp={p['tp']} ep={p['ep']} pp={p['pp']} "
        f"({p['gpus']} GPU{'s' if p['gpus'] > 1 else ''}); KV {plan.kv_bytes_per_token:,} B/token (all layers)",
        "",
        "per GPU              GiB          bytes",
    ]
    rows = [("weights", plan.weights_bytes), ("KV cache", plan.kv_cache_bytes),
            ("activations", plan.activation_bytes)]
    if plan.mode != "inference":
        rows += [("gradients", plan.gradient_bytes), ("optimizer state", plan.optimizer_bytes)]
    rows += [("overhead", plan.overhead_bytes), ("total", plan.total_bytes)]
    lines += [f"  {k:<16}{v / GiB:>9.2f}  {v:>15,}" for k, v in rows]
    lines += ["", f"  all weights, one copy: {plan.weights_total_bytes / GiB:.2f} GiB", "",
              "device                                   usable GiB   as configured   fewest (layout)"]
    for f in plan.fits:
        fewest = "does not fit" if f.min_gpus is None else \
            f"{f.min_gpus} (tp={f.layout['tp']} pp={f.layout['pp']})"
        lines.append(f"  {f.name:<40}{f.usable_bytes / GiB:>9.1f}   {'fits' if f.fits_as_configured else 'no':<14}"
                     f"  {fewest}")
    return "\n".join(lines)


def add_plan_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    """Register ``ernie45 plan`` on the CLI's subparsers."""
    formats = ", ".join(f"{k} ({v})" for k, v in FORMAT_HELP.items())
    s = sub.add_parser("plan", help="memory per GPU (weights, KV cache, activations) and which GPUs fit",
                       description="Plan memory for a model: weights in a format, KV cache for a context and "
                                   "batch, activations, training state; fit it to a GPU catalogue.")
    s.add_argument("model", help="preset name (ernie-4.5-300b-a47b, ernie-4.5-21b-a3b, ernie-4.5-0.3b) or "
                                 "checkpoint folder")
    s.add_argument("--weights", default=None, help=f"weight format: {formats}; or int<b>[-g<N>][-asym]. Default: "
                                                   "a checkpoint folder's own format (quantized or not), else bf16")
    s.add_argument("--dtype", default=None, help="compute dtype (bf16, fp16, fp32); default: the weights' "
                                                 "own float type, else bf16")
    s.add_argument("--kv-dtype", default=None, choices=sorted(KV_BYTES), help="KV cache dtype (default: dtype)")
    s.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    s.add_argument("--batch", type=int, default=1, help="concurrent sequences, or sequences per micro-batch")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel size (GPUs = tp x ep x pp)")
    s.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    s.add_argument("--fsdp", type=int, default=1, help="--mode full: data ranks per stage sharding the dense weights "
                                                      "(FSDP2); GPUs = pp x max(ep, fsdp)")
    s.add_argument("--recompute", default=None, help="--mode full: none, attention, experts, mlp, full or a "
                                                     "comma-separated list (ernie45.train.recompute)")
    s.add_argument("--microbatches", type=int, default=None, help="--mode full: micro-batches per step "
                                                                  "(default pp; 1F1B keeps pp - stage in flight)")
    s.add_argument("--mode", default="inference", choices=["inference", "full", "lora"],
                   help="inference, full fine-tuning, or LoRA")
    s.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "none"], help="training optimizer")
    s.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (mode lora)")
    s.add_argument("--no-gradient-checkpointing", action="store_true", help="training keeps every activation")
    s.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per forward step at most")
    s.add_argument("--block-size", type=int, default=16, help="KV-cache page size in tokens")
    s.add_argument("--quantize-head", choices=["yes", "no"], default=None,
                   help="force the LM head quantized or full precision (default: the format's rule)")
    s.add_argument("--mtp", action="store_true", help="count the MTP draft block")
    s.add_argument("--cpu", action="store_true", help="plan for a CPU process (no CUDA context overhead)")
    s.add_argument("--device", action="append", help="fit only these devices (catalogue key such as h100, or "
                                                     "a size such as 80GiB); repeatable")
    s.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                   help=f"fraction of each device the model may use (default {DEFAULT_UTILIZATION})")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--plot", default=None, metavar="OUT.png", help="write memory vs context per format as PNG")
    s.add_argument("--plot-formats", default=None, help="comma-separated formats for --plot "
                                                        "(default bf16,fp8,wint8,wint4,wint2)")
    h = s.add_argument_group("hybrid placement (routed experts on the GPU or in host RAM; --gpu turns it on)")
    h.add_argument("--gpu", default=None, help="one GPU: catalogue key (h200, h100, rtx4090) or a size (24GB)")
    h.add_argument("--ram", default=None, help="host RAM, e.g. 128GB (default: this machine's)")
    h.add_argument("--placement", default="auto", help="auto (all on the GPU if it fits, else the most MoE "
                   "layers' experts that fit, else experts in RAM), gpu, cpu, or N = GPU MoE layers")
    h.add_argument("--host-bandwidth", default="60GB/s", help="host RAM read bandwidth (default 60GB/s)")
    h.add_argument("--gpu-bandwidth", default=None, help="GPU memory bandwidth (default: the catalogue's)")
    s.set_defaults(func=cmd_plan)


def cmd_placement(args: argparse.Namespace) -> int:
    """``ernie45 plan MODEL --gpu H200 --ram 128GB --placement auto``: every placement and the recommended one."""
    from dataclasses import asdict

    from ernie45.tools.hybrid import estimate_placements, format_placements, recommend_placement

    plan = estimate_placements(args.model, weights=args.weights or "bf16", context=args.context, batch=args.batch,
                               gpu=args.gpu, ram=args.ram, gpu_bandwidth=args.gpu_bandwidth,
                               host_bandwidth=args.host_bandwidth, utilization=args.utilization, dtype=args.dtype)
    recommend_placement(plan, args.placement)
    if args.json:
        out = plan.to_dict()
        out["recommended"] = {**asdict(plan.recommended), "name": plan.recommended.name}
        print(json.dumps(out, indent=2))
    else:
        print(format_placements(plan))
    return 0
