# Usage: PYTHONPATH=<tree> python benchmarks/backends_qdecode.py <tree> int4,int8  (one JSON line of tok/s)
"""Batch-1 greedy decode tok/s of mid-4L (21B-A3B shape, 4 layers) quantized int4 / int8, random codes, through the
engine (bench_quant's OursDecoder: 16 warm-up steps, then segments of 16). Run with the tree under test on sys.path."""
import json
import statistics
import sys

import torch

sys.path.insert(0, sys.argv[1])
from benchmarks.bench_quant import OursDecoder, real_shape  # noqa: E402
from benchmarks.common import fill_random  # noqa: E402
from ernie45.quant import QuantConfig  # noqa: E402
from ernie45.quant.load import build_quantized  # noqa: E402

torch.set_num_threads(2)
out = {}
for preset in sys.argv[2].split(","):
    model = fill_random(build_quantized(real_shape(4), QuantConfig.from_name(preset), torch.bfloat16))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, b in model.named_buffers():
            if b.dtype in (torch.uint8, torch.int8):
                b.view(torch.uint8).copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=g))
            elif name.endswith("scales"):
                b.fill_(0.02 / 127)
            elif name.endswith("zeros"):
                b.fill_(1e-3)
    dec = OursDecoder(model, 32, 16 + 5 * 16)
    dec.segment(16)
    segs = [dec.segment(16) for _ in range(5)]
    out[preset] = {"best": max(segs), "median": statistics.median(segs), "segments": segs,
                   "backend": getattr(dec.eng, "backend", "n/a")}
    del dec, model
print(json.dumps(out))
