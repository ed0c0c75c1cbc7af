"""Prefill forward time, ours vs transformers, on the same 21B-A3B-shaped weights.

    python benchmarks/bench_forward.py [--layers 2] [--dtypes bf16,fp32]

The real ERNIE-4.5-21B-A3B dimensions (hidden 2560, 20/4 heads, 64 experts top-6, 2 shared, vocab 103424),
with L layers (layer 0 dense, the rest MoE), random weights; both models load the same safetensors files.
Shapes 1x512 and 8x128 tokens. Also the MoE block alone (layer 1's FFN) on the same hidden states.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import random_model, timeit, write_result  # noqa: E402
from ernie45 import ModelConfig, load_model, save_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import transformers

    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(
        num_hidden_layers=args.layers, moe_layer_end_index=args.layers - 1, num_nextn_predict_layers=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(random_model(cfg, torch.bfloat16), tmp)
        for dname in args.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
            ours = load_model(tmp, dtype=dtype)
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            g = torch.Generator().manual_seed(0)
            for b, t in ((1, 512), (8, 128)):
                ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
                with torch.inference_mode():
                    t_ours = timeit(lambda: ours(ids), repeat=args.repeat)  # noqa: B023
                    t_ref = timeit(lambda: ref(ids), repeat=args.repeat)  # noqa: B023
                    x = torch.randn(b, t, cfg.hidden_size, generator=g).to(dtype)
                    m_ours = timeit(lambda: ours.model.layers[1].mlp(x), repeat=args.repeat)  # noqa: B023
                    m_ref = timeit(lambda: ref.model.layers[1].mlp(x), repeat=args.repeat)  # noqa: B023
                rows.append((dname, f"{b}x{t}", b * t / t_ours, b * t / t_ref, t_ref / t_ours, m_ref / m_ours))
                print(rows[-1], flush=True)
            ours = ref = None  # free before the next dtype  # noqa: F841
    table = ["| dtype | tokens | ours tok/s | transformers tok/s | forward speedup | MoE block speedup |",
             "|---|---|---|---|---|---|"]
    table += [f"| {d} | {s} | {a:.0f} | {r:.0f} | {x:.2f}x | {m:.2f}x |" for d, s, a, r, x, m in rows]
    text = (f"21B-A3B shape, {args.layers} layers (layer 0 dense, others MoE), random weights, prefill forward "
            f"(no KV cache), median of {args.repeat}.\n\n" + "\n".join(table))
    print(text)
    print("wrote", write_result("forward", text))


if __name__ == "__main__":
    main()
