"""ernie45 on a GPU: correctness against transformers and the CPU, and decode speed against transformers.

Checks (each prints PASS/FAIL with its numbers; all run, the exit status is 1 if any failed):
  1. parity   tiny random-weight dense and MoE models (tests/reference.py), ours vs transformers on the
              device, fp32 and bf16 logits; ours on the device vs ours on the CPU (fp32).
  2. engine   ``LLM`` greedy generation (fp32) on the device == on the CPU, token for token, for prompts of
              several lengths (chunked prefill included); a seeded sampled run repeats exactly.
  3. quant    a tiny MoE quantized on load (int4, int8) on the device vs the same on the CPU: logits at
              prefill and decode sizes, and engine greedy tokens (fp32).
  4. speed    "mid-4L" (the ERNIE-4.5-21B-A3B shape with 4 layers, random bf16 weights shared by both
              models): our engine vs transformers ``generate``, batch 1 and 16, 128-token prompts, 128 new
              tokens, greedy: TTFT, decode tok/s, ratios.

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --device cuda --out $OUT      # on the GPU machine
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --small             # the same code, small, here

Writes ``results.json`` and ``table.md`` into ``--out`` (default: $OUT, else a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.common import commit, machine  # noqa: E402
from ernie45 import LLM, ModelConfig, SamplingParams, load_model  # noqa: E402

RESULTS: list[dict] = []
SPEED: dict = {}


def record(name: str, ok: bool, **info) -> bool:
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    nums = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
    print(f"{'PASS' if ok else 'FAIL'} {name}: {nums}", flush=True)
    return ok


def _fmt(v) -> str:  # noqa: ANN001
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def guarded(name: str, fn, *args) -> None:  # noqa: ANN001
    """Run one check; an exception is a FAIL with its traceback, and the next check still runs."""
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        record(name, False, error=f"{type(err).__name__}: {err}"[:300])
    print(f"  ({name}: {time.perf_counter() - t0:.1f}s)", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ids(vocab: int, b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """(max abs diff, reference logit scale, argmax agreement) on the CPU in fp32."""
    got, want = got.float().cpu(), want.float().cpu()
    return ((got - want).abs().max().item(), want.abs().max().item(),
            (got.argmax(-1) == want.argmax(-1)).float().mean().item())


# ------------------------------------------------------------------------------------------------ models
def tiny_configs() -> dict[str, ModelConfig]:
    return {
        "dense": ModelConfig.from_name("tiny-dense").replace(use_bias=True),  # head_dim != hidden/heads, bias
        "moe": ModelConfig.from_name("tiny-moe"),                               # shared expert, MoE from layer 1
        # generation: untied heads (a tied head with these weights greedily repeats the last token)
        "dense-gen": ModelConfig.from_name("tiny-dense").replace(tie_word_embeddings=False),
        "moe-gen": ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False),
        # large enough for the CPU int4/int8 kernel layouts (N % 64 == 0)
        "moe-q": ModelConfig.from_name("tiny-moe").replace(hidden_size=128, moe_intermediate_size=64,
                                                           intermediate_size=256, head_dim=32,
                                                           tie_word_embeddings=False),
    }


def save_reference(tmp: str, name: str, cfg: ModelConfig, seed: int) -> tuple[torch.nn.Module, str]:
    from tests.reference import hf_model

    ref = hf_model(cfg, seed=seed)
    folder = os.path.join(tmp, name)
    ref.save_pretrained(folder)
    return ref, folder


# ------------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def check_parity(dev: str, name: str, ref: torch.nn.Module, folder: str, vocab: int) -> None:
    x = ids(vocab, 2, 32, seed=1)
    want32 = ref.to(dev)(x.to(dev)).logits
    ours = load_model(folder, dtype=torch.float32, device=dev, progress=False)
    assert next(ours.parameters()).device.type == torch.device(dev).type
    got32 = ours(x.to(dev)).logits
    cpu32 = load_model(folder, dtype=torch.float32, progress=False)(x).logits
    d, scale, agree = diff(got32, want32)
    dc, _, _ = diff(got32, cpu32)
    record(f"parity/{name}/fp32 vs transformers on {dev}", d <= 1e-4 * max(1.0, scale) and dc <= 1e-4 * max(1.0, scale),
           max_abs_diff=d, logit_scale=scale, argmax_agree=agree, ours_dev_vs_ours_cpu=dc)
    del ours
    ref_bf = ref.to(torch.bfloat16)
    want16 = ref_bf(x.to(dev)).logits
    ours16 = load_model(folder, dtype=torch.bfloat16, device=dev, progress=False)
    got16 = ours16(x.to(dev)).logits
    cpu16 = load_model(folder, dtype=torch.bfloat16, progress=False)(x).logits
    d, scale, agree = diff(got16, want16)
    _, _, agree32 = diff(got16, want32)
    # bf16 MoE: a rounding flips a few routing choices (in transformers too), so max diffs are large for
    # single tokens. The test: our bf16 error against the fp32 reference is no worse than 1.5x transformers'.
    err_ours = (got16.float() - want32).abs().mean().item()
    err_hf = (want16.float() - want32).abs().mean().item()
    record(f"parity/{name}/bf16 vs transformers on {dev}", err_ours <= 1.5 * err_hf and agree32 > 0.9,
           mean_err_vs_fp32_ours=err_ours, mean_err_vs_fp32_transformers=err_hf, argmax_vs_fp32=agree32,
           max_abs_diff_vs_hf_bf16=d, logit_scale=scale, ours_dev_vs_ours_cpu=diff(got16, cpu16)[0])
    ref.to(torch.float32).to("cpu")


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _generate(folder: str, dev: str, prompts: list[list[int]], params: SamplingParams, **load) -> list[list[int]]:
    llm = LLM(folder, dtype="float32", device=dev, kv_cache_memory="16MB", block_size=8,
              max_num_batched_tokens=32, max_model_len=256, **load)  # 32: the 77-token prompt is chunked
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def check_engine(dev: str, name: str, ref: torch.nn.Module, folder: str, vocab: int) -> None:
    ps = _prompts(vocab, [3, 17, 40, 77], seed=2)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    on_dev = _generate(folder, dev, ps, greedy)
    on_cpu = _generate(folder, "cpu", ps, greedy)
    same = sum(a == b for a, b in zip(on_dev, on_cpu))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(on_dev, on_cpu)]
    with torch.no_grad():  # transformers' greedy on the device, for information
        ref = ref.to(dev)
        hf = [ref.generate(torch.tensor([p], device=dev), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in ps]
        ref.to("cpu")
    same_hf = sum(a == b for a, b in zip(on_dev, hf))
    distinct = min(len(set(t)) for t in on_dev)
    record(f"engine/{name}/greedy fp32 {dev} == cpu", same == len(ps) and distinct > 3,
           prompts_equal=f"{same}/{len(ps)}", first_divergence=first_diff, equal_to_transformers=f"{same_hf}/{len(ps)}",
           min_distinct_tokens=distinct)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=24, seed=1234, ignore_eos=True)
    a = _generate(folder, dev, ps, sampled)
    b = _generate(folder, dev, ps, sampled)
    record(f"engine/{name}/seeded sampling repeats on {dev}", a == b and a != on_dev,
           equal=f"{sum(x == y for x, y in zip(a, b))}/{len(ps)}", differs_from_greedy=a != on_dev)


@torch.no_grad()
def check_quant(dev: str, quant: str, folder: str, vocab: int) -> None:
    from ernie45.quant.quantize import qweights

    ref32 = {}  # the CPU fp32 logits of the quantized model: what bf16 on either side is measured against
    for dtype in (torch.float32, torch.bfloat16):
        # The reference: the CPU model without ernie45's native kernels (they quantize activations to int8,
        # so they differ from exact dequantize-and-multiply by ~1e-2); with them, for information.
        with cpu_kernels(False):
            cpu = load_model(folder, quant=quant, dtype=dtype, progress=False)
        cpu_k = load_model(folder, quant=quant, dtype=dtype, progress=False)
        with cpu_kernels(False):  # a no-op off the CPU; with --device cpu the exact path on both sides
            gpu = load_model(folder, quant=quant, dtype=dtype, device=dev, progress=False)
        lay = {k: sorted({q.layout for _, q in qweights(m)}) for k, m in (("cpu", cpu), ("cpu_k", cpu_k), ("dev", gpu))}
        on_dev = all(t.device.type == torch.device(dev).type for t in gpu.state_dict().values())
        for label, (b, t) in (("prefill 2x12", (2, 12)), ("decode-size 1x8", (1, 8))):
            x = ids(vocab, b, t, seed=3)
            with cpu_kernels(False):
                got, want = gpu(x.to(dev)).logits, cpu(x).logits
            d, scale, agree = diff(got, want)
            dk = diff(got, cpu_k(x).logits)[0]
            info = dict(max_abs_diff=d, logit_scale=scale, argmax_agree=agree, vs_cpu_native_kernels=dk)
            if dtype == torch.float32:
                ref32[label] = want.float()
                ok = d <= 1e-4 * max(1.0, scale)
            else:
                # bf16: as in parity, a rounding can flip a near-tied routing choice on either side (seen: the
                # CPU's aten int8 path, one token of layer 2), which moves that token's logits by ~0.2 x scale.
                # So: the device's bf16 error against the fp32 quantized logits is no worse than 1.5x the CPU's.
                err_dev = (got.float().cpu() - ref32[label]).abs().mean().item()
                err_cpu = (want.float() - ref32[label]).abs().mean().item()
                agree32, agree32_cpu = diff(got, ref32[label])[2], diff(want, ref32[label])[2]
                # (and top-1 agreement with fp32 at most one token in 8 below the CPU's: small logits, near ties)
                ok = err_dev <= 1.5 * err_cpu + 1e-3 * scale and agree32 >= agree32_cpu - 0.125 - 1e-6
                info.update(mean_err_vs_fp32_dev=err_dev, mean_err_vs_fp32_cpu=err_cpu, argmax_vs_fp32_dev=agree32,
                            argmax_vs_fp32_cpu=agree32_cpu)
            record(f"quant/{quant}/{str(dtype)[6:]} {label} {dev} vs cpu", ok and on_dev, **info,
                   layouts_cpu=lay["cpu"], layouts_cpu_native=lay["cpu_k"], layouts_dev=lay["dev"])
        del cpu, cpu_k, gpu
    ps = _prompts(vocab, [5, 30], seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with cpu_kernels(False):
        a = _generate(folder, dev, ps, greedy, quant=quant)
        b = _generate(folder, "cpu", ps, greedy, quant=quant)
    record(f"quant/{quant}/engine greedy fp32 {dev} == cpu", a == b and min(len(set(t)) for t in a) > 3,
           prompts_equal=f"{sum(x == y for x, y in zip(a, b))}/{len(ps)}",
           min_distinct_tokens=min(len(set(t)) for t in a))


def cpu_kernels(flag: bool):  # noqa: ANN201 - a context manager
    try:
        from ernie45.kernels import use_kernels
    except ImportError:
        return contextlib.nullcontext()
    return use_kernels(flag)


# ------------------------------------------------------------------------------------------------ speed
def _sync(dev: str) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def speed_models(cfg: ModelConfig, dev: str):  # noqa: ANN201
    """transformers' model built on the device with random bf16 weights; ours over the same tensors."""
    import transformers

    from benchmarks.bench_generate import share_weights

    d = cfg.to_hf_dict()
    d.pop("architectures"), d.pop("model_type")
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Ernie4_5_MoeConfig(**d),
                                                            dtype=torch.bfloat16).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("e_score_correction_bias"):
                p.zero_()
            elif "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    ours = share_weights(hf, cfg).to(dev)
    return hf, ours


def bench_ours(model, cfg: ModelConfig, dev: str, batch: int, plen: int, new: int) -> dict:  # noqa: ANN001
    from benchmarks.bench_generate import make_prompts
    from ernie45.engine import LLMEngine

    eng = LLMEngine(model, max_num_seqs=max(16, batch), max_num_batched_tokens=max(2048, batch * plen),
                    kv_cache_memory=cfg.kv_bytes_per_token(2) * (batch * (plen + new) + 1024), block_size=16,
                    max_model_len=plen + new + 16)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    g = torch.Generator().manual_seed(1000 + batch)  # warm-up prompts of the real length, no shared prefix
    warm = torch.randint(3, cfg.vocab_size, (2, batch, plen), generator=g).tolist()
    for rep in range(2):  # warm-up: allocator, kernels, both prefill and decode shapes
        for i, p in enumerate(warm[rep]):
            eng.add_request(f"w{rep}-{i}", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
    _sync(dev)
    t0 = time.perf_counter()
    for i, p in enumerate(make_prompts(cfg, batch, plen)):
        eng.add_request(str(i), p, params)
    first = None
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        if first is None:
            _sync(dev)
            first = time.perf_counter()
    _sync(dev)
    end = time.perf_counter()
    return {"ttft_s": first - t0, "prefill_tok_s": batch * plen / (first - t0),
            "decode_tok_s": batch * (new - 1) / (end - first), "ms_per_step": 1000 * (end - first) / (steps - 1),
            "total_tok_s": batch * new / (end - t0)}


@torch.no_grad()
def bench_hf(hf, cfg: ModelConfig, dev: str, batch: int, plen: int, new: int) -> dict:  # noqa: ANN001
    from benchmarks.bench_generate import make_prompts

    x = torch.tensor(make_prompts(cfg, batch, plen), device=dev)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    g = torch.Generator().manual_seed(1000 + batch)
    warm = torch.randint(3, cfg.vocab_size, (batch, plen), generator=g).to(dev)
    for _ in range(2):
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=8, min_new_tokens=8, **kw)
    _sync(dev)
    t0 = time.perf_counter()
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1, **kw)
    _sync(dev)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, **kw)
    _sync(dev)
    total = time.perf_counter() - t0
    assert out.shape[1] == plen + new
    return {"ttft_s": ttft, "prefill_tok_s": batch * plen / ttft, "decode_tok_s": batch * (new - 1) / (total - ttft),
            "ms_per_step": 1000 * (total - ttft) / (new - 1), "total_tok_s": batch * new / total}


def check_speed(dev: str, cfg: ModelConfig, label: str, batches: list[int], plen: int, new: int) -> None:
    t = time.perf_counter()
    hf, ours = speed_models(cfg, dev)
    _sync(dev)
    SPEED.update(model=label, params_b=cfg.num_params() / 1e9, prompt=plen, new=new, build_s=time.perf_counter() - t,
                 rows={})
    print(f"built {label} ({cfg.num_params() / 1e9:.2f}B params, bf16) on {dev} in {SPEED['build_s']:.1f}s",
          flush=True)
    for b in batches:
        # first check that both models compute the same thing (they share weights; bf16, so loosely)
        x = torch.tensor([[5, 17, 99, 1000 % cfg.vocab_size, 7, 8, 9, 10]], device=dev)
        with torch.no_grad():
            d, scale, agree = diff(ours(x).logits, hf(x).logits)
        if b == batches[0]:
            record(f"speed/{label} ours == transformers (bf16, shared weights)", d <= 0.05 * max(scale, 1e-3),
                   max_abs_diff=d, logit_scale=scale, argmax_agree=agree)
        r = {"ours": bench_ours(ours, cfg, dev, b, plen, new)}
        print("ours", b, r["ours"], flush=True)
        r["transformers"] = bench_hf(hf, cfg, dev, b, plen, new)
        print("transformers", b, r["transformers"], flush=True)
        SPEED["rows"][b] = r
        if torch.device(dev).type == "cuda":
            SPEED["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ok = all(r["ours"]["decode_tok_s"] > 0 for r in SPEED["rows"].values())
    ratios = {f"b{b}_decode_ratio": r["ours"]["decode_tok_s"] / r["transformers"]["decode_tok_s"]
              for b, r in SPEED["rows"].items()}
    record(f"speed/{label} ran", ok, **ratios)
    profile_ours(ours, cfg, dev, plen)


def profile_ours(model, cfg: ModelConfig, dev: str, plen: int, steps: int = 8) -> None:  # noqa: ANN001
    """Where a batch-1 decode step of ours spends its time (torch.profiler, for information)."""
    from benchmarks.bench_generate import make_prompts
    from ernie45.engine import LLMEngine

    eng = LLMEngine(model, max_num_seqs=16, max_num_batched_tokens=2048, block_size=16,
                    kv_cache_memory=cfg.kv_bytes_per_token(2) * (plen + steps + 1024), max_model_len=plen + 64)
    eng.add_request("p", make_prompts(cfg, 1, plen)[0],
                    SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    eng.step(), eng.step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(dev).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            eng.step()
    key = "cuda_time_total" if torch.device(dev).type == "cuda" else "cpu_time_total"
    out = os.environ.get("OUT") or tempfile.gettempdir()
    for k in ("cpu_time_total", key):
        text = prof.key_averages().table(sort_by=k, row_limit=40, max_name_column_width=50)
        with open(os.path.join(out, f"profile_ours_b1_{k}.txt"), "w") as f:
            f.write(text)
    print(f"profile of {steps} batch-1 decode steps of ours, by {key} (top 12):")
    print("\n".join(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40).splitlines()[:16]))


def speed_table() -> str:
    if not SPEED.get("rows"):
        return "(no speed results)"
    lines = [f"model {SPEED['model']} ({SPEED['params_b']:.2f}B params, bf16, random weights), prompt "
             f"{SPEED['prompt']} + {SPEED['new']} new tokens, greedy; ratio > 1: ours better", "",
             "| batch | metric | ours | transformers | ratio |", "|---|---|---|---|---|"]
    for b, r in SPEED["rows"].items():
        for key, label in (("decode_tok_s", "decode tok/s"), ("ms_per_step", "ms / decode step"), ("ttft_s", "TTFT s"),
                           ("prefill_tok_s", "prefill tok/s"), ("total_tok_s", "end-to-end tok/s")):
            o, t = r["ours"][key], r["transformers"][key]
            ratio = t / o if key in ("ttft_s", "ms_per_step") else o / t
            lines.append(f"| {b} | {label} | {o:.4g} | {t:.4g} | {ratio:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a small model for the speed part (CPU debugging)")
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_gpu-"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["parity", "engine", "quant", "speed"])
    args = ap.parse_args()
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device", flush=True)
        return 1
    import transformers

    t_start = time.perf_counter()
    env = (f"{machine()}; cuda {torch.version.cuda}; transformers {transformers.__version__}; "
           f"commit {commit()}")
    print("machine:", env, flush=True)
    torch.manual_seed(0)
    cfgs = tiny_configs()
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        refs = {n: save_reference(tmp, n, c, seed=i + 1) for i, (n, c) in enumerate(cfgs.items())}
        if "parity" not in args.skip:
            for n in ("dense", "moe"):
                guarded(f"parity/{n}", check_parity, dev, n, refs[n][0], refs[n][1], cfgs[n].vocab_size)
        if "engine" not in args.skip:
            for n in ("dense-gen", "moe-gen"):
                guarded(f"engine/{n}", check_engine, dev, n, refs[n][0], refs[n][1], cfgs[n].vocab_size)
        if "quant" not in args.skip:
            for q in ("int4", "int8"):
                guarded(f"quant/{q}", check_quant, dev, q, refs["moe-q"][1], cfgs["moe-q"].vocab_size)
    if "speed" not in args.skip:
        if args.small:
            cfg = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, moe_intermediate_size=128,
                                                            intermediate_size=512, moe_num_experts=16, moe_k=4,
                                                            num_hidden_layers=4, vocab_size=4096, head_dim=64)
            guarded("speed", check_speed, dev, cfg, "small-moe", [1, 4], 32, 16)
        else:
            from benchmarks.bench_generate import mid_4l

            guarded("speed", check_speed, dev, mid_4l(), "mid-4L", [1, 16], 128, 128)
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    os.makedirs(args.out, exist_ok=True)
    table = speed_table()
    summary = "\n".join(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | "
                        + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("check", "ok")) + " |"
                        for r in RESULTS)
    md = (f"- machine: {env}\n- command: `{' '.join(sys.argv)}`\n- wall: {time.perf_counter() - t_start:.0f}s\n\n"
          f"| check | result | numbers |\n|---|---|---|\n{summary}\n\n{table}\n")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": env, "argv": sys.argv, "checks": RESULTS, "speed": SPEED}, f, indent=1, default=str)
    print("\n" + "=" * 100)
    for r in RESULTS:
        print(f"{'PASS' if r['ok'] else 'FAIL'} {r['check']}")
    print(table)
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed; wall {time.perf_counter() - t_start:.0f}s; "
          f"wrote {args.out}/table.md, results.json")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
