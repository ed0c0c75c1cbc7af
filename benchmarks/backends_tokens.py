# Usage: PYTHONPATH=<tree> python benchmarks/backends_tokens.py OUT.json  (run for two commits, compare the JSON files)
"""Greedy tokens of the engine on tiny models (bf16 and quantized), for comparing two commits."""
import json
import sys

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights
from ernie45.engine import LLMEngine, SamplingParams
from ernie45.quant import QuantConfig, quantize_model

CFG = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                                head_dim=64)
PROMPTS = [[5, 17, 99, 3], [250, 41, 7], [9, 8, 7, 6, 5, 4, 3], list(range(40, 70))]
out = {}
for name in ["bf16", "int4", "int8", "int2", "int4-dense6"]:
    for bs in (1, 4):
        model = init_weights(ErnieForCausalLM(CFG), std=0.05, seed=0).bfloat16().eval()
        if name != "bf16":
            qc = QuantConfig.from_name("int4", dense_bits=6) if name == "int4-dense6" else name
            quantize_model(model, qc)
        eng = LLMEngine(model, max_num_seqs=bs, kv_cache_memory="8MB", max_model_len=128, enable_prefix_caching=False)
        for i, p in enumerate(PROMPTS):
            eng.add_request(str(i), p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        res = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    res[o.request_id] = list(o.outputs[0].token_ids)
        out[f"{name}/bs{bs}"] = res
json.dump(out, open(sys.argv[1], "w"), indent=0)
print("backend:", getattr(eng, "backend", "n/a"))
