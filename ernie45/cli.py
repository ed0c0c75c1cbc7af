"""`ernie45 <verb>`: each verb is one library call."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args: argparse.Namespace) -> int:
    import os

    from ernie45.config import ModelConfig

    cfg = ModelConfig.from_json(args.model) if os.path.exists(args.model) else ModelConfig.from_name(args.model)
    layers = cfg.moe_layers
    info = {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv x {cfg.head_dim}",
        "moe_layers": f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "none",
        "experts": f"{cfg.moe_num_experts} routed, top-{cfg.moe_k}, {cfg.moe_num_shared_experts} shared"
        if cfg.is_moe else "dense",
        "params_total": cfg.num_params(),
        "params_active": cfg.num_active_params(),
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(2),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>26}: {v:,}" if isinstance(v, int) else f"{k:>26}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie45", description="ERNIE 4.5 text models in plain PyTorch")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("info", help="architecture and parameter counts of a preset or checkpoint folder")
    s.add_argument("model", help="preset name (ernie-4.5-21b-a3b, ...) or checkpoint folder")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one readable line, no traceback
        print(f"ernie45 {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
