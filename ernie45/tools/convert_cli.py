"""The ``convert`` and ``export-gguf`` verbs (``ernie45.cli`` adds them with ``add_convert_parsers``)."""

from __future__ import annotations

import argparse
import json


def cmd_convert(args: argparse.Namespace) -> int:
    import logging

    from ernie45.tools.convert import convert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    to = "gguf" if args.verb == "export-gguf" else args.to
    res = convert(args.src, args.dst, to=to, type=args.type, check_tokens=args.check_tokens, dtype=args.dtype,
                  progress=True)
    print(f"{args.src} -> {args.dst} ({res['to']}, {res['type']}): logits on {len(res['tokens'])} tokens, "
          f"converted vs source: max |diff| {res['max_abs_diff']:.3g} ({res['max_rel_diff']:.2%} of the largest "
          f"logit), same argmax: {res['same_argmax']}")
    if args.json:
        print(json.dumps(res))
    return 0


def add_convert_parsers(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    s = sub.add_parser("convert", help="convert between HF safetensors, our quantized checkpoints, llama.cpp GGUF "
                       "and Paddle folders, then check logits against the source")
    s.add_argument("src", help="checkpoint folder (HF, ours quantized, Paddle), model.gguf, or 'demo'")
    s.add_argument("dst", help="output folder, or a .gguf file")
    s.add_argument("--to", choices=["hf", "gguf", "paddle"], default=None,
                   help="target format (default: gguf for a .gguf destination, else hf)")
    s.add_argument("--type", default=None, help="gguf: bf16 | q8_0 | q4_0; hf: keep | bf16 | fp32 | int8 | int4 | "
                   "int2 | wint2; paddle: bf16")
    _common(s)
    e = sub.add_parser("export-gguf", help="write a llama.cpp GGUF (bf16 / q8_0 / q4_0) of a checkpoint")
    e.add_argument("src", metavar="MODEL", help="checkpoint folder (HF, ours quantized, Paddle), model.gguf or 'demo'")
    e.add_argument("dst", metavar="OUT.gguf", help="the GGUF file to write")
    e.add_argument("--type", default="bf16", choices=["bf16", "q8_0", "q4_0"], help="weight type (default bf16)")
    _common(e)


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dtype", default="bfloat16", help="dtype the source is loaded in for conversion and the check")
    s.add_argument("--check-tokens", type=int, default=8, help="tokens of the final logit check")
    s.add_argument("--json", action="store_true", help="also print the check as JSON")
    s.set_defaults(func=cmd_convert)
