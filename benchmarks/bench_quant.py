"""Quantized decode speed: ernie45 int8 / int4 against the memory-bandwidth roofline and llama.cpp.

Parts (each in its own process, so one's memory never adds to another's):

- ``mid4l``: the real ERNIE-4.5-21B-A3B shape with 4 layers (2.76B parameters), random bf16 weights saved as
  our checkpoint and as a BF16 ``ernie4_5-moe`` GGUF (PyPI ``gguf``); ours quantizes on load
  (``load_model(path, quant=...)``), llama.cpp quantizes the GGUF to Q8_0 / Q4_K_M
  (``llama_model_quantize``). Same weights, batch-1 greedy decode, both on 2 threads.
- ``full``: all 28 layers of the 21B-A3B, int4, built directly in quantized form with random codes (it
  does not fit in bf16 here); against the roofline only (a 40 GiB bf16 GGUF for llama.cpp does not fit
  this machine's RAM-bound budget in one run).
- ``check``: a tiny model whose GGUF logits must match ours (proves the GGUF the peer reads is ours).

Roofline = measured DRAM read bandwidth / bytes of weights read per token at batch 1 (every dense
weight, k of E experts per MoE layer, the LM head, the router), the same bytes our decode reads.

    flock /tmp/ernie45-heavy.lock python benchmarks/bench_quant.py [--parts check mid4l full] [--tokens 32]

llama-cpp-python (``pip install llama-cpp-python==0.3.36 gguf``) is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks.common import dram_bandwidth, fill_random, median, median_range, paired_ratios  # noqa: E402
from ernie45 import ModelConfig, load_model, save_model  # noqa: E402
from ernie45.model.checkpoint import build_empty  # noqa: E402
from ernie45.model.moe import Router  # noqa: E402
from ernie45.quant import QuantConfig, QuantExperts, QWeight, quantized_nbytes  # noqa: E402
from ernie45.quant.load import build_quantized  # noqa: E402

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------ measures
def bytes_per_token(model) -> int:  # noqa: ANN001
    """Weight bytes one batch-1 decode step reads: all quantized dense weights and the head, k/E of each
    expert stack, the fp32 routers; the embedding contributes one row."""
    cfg = model.config
    total = 0
    in_experts = {id(w) for m in model.modules() if isinstance(m, QuantExperts) for w in m.children()}
    for _, m in model.named_modules():
        if isinstance(m, QuantExperts):
            total += (m.gate_up_proj.nbytes() + m.down_proj.nbytes()) * cfg.moe_k // cfg.moe_num_experts
        elif isinstance(m, QWeight) and id(m) not in in_experts:
            total += m.nbytes()
        elif isinstance(m, Router):
            total += m.weight.numel() * 4
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total + cfg.hidden_size * 2


ROUNDS = 5
"""Timed segments per decode measurement; the best is reported (the machine's noise is up to +40%, MACHINE.md)."""
WARMUP = 16
"""Untimed steps each side decodes first: the first segment after a model loads runs up to 2x slower (seen for
both engines; the memory system settling after gigabytes of fresh pages)."""


class OursDecoder:
    """Batch-1 greedy decode through the ernie45 engine (paged KV cache), timed in segments after the prefill."""

    def __init__(self, model, prompt_len: int, total: int) -> None:  # noqa: ANN001
        from ernie45.engine import LLMEngine, SamplingParams

        self.eng = LLMEngine(model, max_num_seqs=1, kv_cache_memory="256MB", max_model_len=prompt_len + total + 8,
                             enable_prefix_caching=False)
        prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
        self.eng.add_request("r", prompt.tolist(), SamplingParams(max_tokens=total + 1, temperature=0,
                                                                  ignore_eos=True))
        self.eng.step()  # prefill + first token

    def segment(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.eng.step()
        return n / (time.perf_counter() - t0)


class LlamaDecoder:
    """llama.cpp's batch-1 decode (``Llama.eval`` one token at a time) on the same prompt length, in segments."""

    def __init__(self, path: str, prompt_len: int, total: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=prompt_len + total + 16, n_threads=2, n_threads_batch=2,
                         n_batch=64, verbose=False)
        self.ids = torch.randint(3, self.llm.n_vocab(), (prompt_len + total,),
                                 generator=torch.Generator().manual_seed(1)).tolist()
        self.llm.eval(self.ids[:prompt_len])
        self.pos = prompt_len

    def segment(self, n: int) -> float:
        seg, self.pos = self.ids[self.pos:self.pos + n], self.pos + n
        t0 = time.perf_counter()
        for t in seg:
            self.llm.eval([t])
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        self.llm.close()


def head_to_head(model, gguf: str | None, prompt_len: int, tokens: int) -> dict:  # noqa: ANN001
    """Ours and llama.cpp in alternating segments (WARMUP steps each first, then ROUNDS segments each, the best of
    each kept), with the DRAM bandwidth
    measured before every round and after the last: the machine's bandwidth drifts over minutes, so figures taken
    minutes apart do not make a ratio, and each round of ours is held against the higher of the two measures
    around it (its roofline)."""
    ours = OursDecoder(model, prompt_len, WARMUP + ROUNDS * tokens)
    peer = LlamaDecoder(gguf, prompt_len, WARMUP + ROUNDS * tokens) if gguf else None
    ours.segment(WARMUP)
    if peer:
        peer.segment(WARMUP)
    bws = [dram_bandwidth()]
    r_ours, r_peer = [], []
    for _ in range(ROUNDS):
        r_ours.append(ours.segment(tokens))
        if peer:
            r_peer.append(peer.segment(tokens))
        bws.append(dram_bandwidth())
    if peer:
        peer.close()
    del ours
    gc.collect()
    return {"ours": max(r_ours), "peer": max(r_peer) if r_peer else None, "ours_rounds": r_ours, "peer_rounds": r_peer,
            "bandwidth_rounds": [max(a, b) for a, b in zip(bws, bws[1:])]}


def prefill_head_to_head(model, gguf: str, prompt_len: int) -> dict:  # noqa: ANN001
    """Prefill of a ``prompt_len``-token prompt (one chunk, to its first token), ours and llama.cpp alternating,
    ROUNDS each after one untimed prefill each; a new random prompt every round (no cache reuse on either side)."""
    from llama_cpp import Llama

    from ernie45.engine import LLMEngine, SamplingParams

    eng = LLMEngine(model, max_num_seqs=1, kv_cache_memory="256MB", max_model_len=prompt_len + 8,
                    max_num_batched_tokens=prompt_len, enable_prefix_caching=False)
    llm = Llama(model_path=gguf, n_ctx=prompt_len + 16, n_threads=2, n_threads_batch=2, n_batch=prompt_len,
                n_ubatch=prompt_len, verbose=False)
    g = torch.Generator().manual_seed(2)
    vocab = min(model.config.vocab_size, llm.n_vocab())

    def ours(i: int) -> float:
        ids = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        t0 = time.perf_counter()
        eng.add_request(f"p{i}", ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        return prompt_len / (time.perf_counter() - t0)

    def theirs() -> float:
        ids = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return prompt_len / (time.perf_counter() - t0)

    ours(-1), theirs()
    r_ours, r_peer = [], []
    for i in range(ROUNDS):
        r_ours.append(ours(i))
        r_peer.append(theirs())
    llm.close()
    return {"ours_rounds": r_ours, "peer_rounds": r_peer}


def roofline(h: dict, bytes_per_token: int) -> tuple[float, float, float]:
    """(fraction of the roofline, roofline tok/s, bandwidth) of the median round: each round of ours against the
    bandwidth measured around it (one round alone can read over 100%: the bandwidth swings within seconds)."""
    return median([(t * bytes_per_token / bw, bw / bytes_per_token, bw)
                    for t, bw in zip(h["ours_rounds"], h["bandwidth_rounds"])])


# --------------------------------------------------------------------------------------------- GGUF
def write_gguf(model, path: str) -> None:  # noqa: ANN001
    """Our weights as a BF16 ``ernie4_5-moe`` GGUF (``ernie45.formats.gguf.export_gguf``)."""
    from ernie45.formats.gguf import export_gguf

    export_gguf(model, path, "bf16", progress=False)


def llama_quantize(src: str, dst: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed")


# -------------------------------------------------------------------------------------------- parts
@torch.no_grad()
def part_check(tokens: int) -> dict:
    """Tiny model: llama.cpp's logits on our GGUF against our forward (the GGUF is right)."""
    from llama_cpp import Llama

    cfg = ModelConfig.from_name("tiny-moe").replace(moe_intermediate_size=64)  # 128 == 64 * 1 shared * 2 kv
    model = build_empty(cfg, torch.float32)
    fill_random(model)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # make the router decisive and the norms non-trivial
        if "norm" in n:
            p.uniform_(0.5, 1.5, generator=g)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tiny.gguf")
        write_gguf(model.to(torch.bfloat16).float(), path)
        ids = list(range(5, 5 + tokens))
        llm = Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        llm.close()
    ours = model.to(torch.bfloat16).float()(torch.tensor([ids])).logits[0]
    err = float((ours - theirs).abs().max() / ours.abs().max())
    return {"max_rel_logit_diff": err}


def real_shape(layers: int | None = None) -> ModelConfig:
    cfg = ModelConfig.from_name("ernie-4.5-21b-a3b").replace(num_nextn_predict_layers=0)
    if SMOKE:  # the whole pipeline on a tiny shape, to check the script itself in seconds
        cfg = ModelConfig.from_name("tiny-moe").replace(moe_intermediate_size=64, hidden_size=128,
                                                        intermediate_size=128, num_key_value_heads=2)
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers, moe_layer_end_index=layers - 1)
    return cfg


SMOKE = bool(os.environ.get("BENCH_QUANT_SMOKE"))
PREFILL = 0
"""Prompt tokens of the prefill comparison on mid-4L (``--prefill``; 0: none)."""


PAIRS = (("int8", {}, "Q8_0"), ("int4", {}, "Q4_K_M"), ("int4-head6", {"head_bits": 6}, "Q4_K_M"),
         ("int4-head6", {"head_bits": 6}, "Q4_0"))
"""(our preset, its options, the llama.cpp type it runs against). The same bits: int8 per channel and Q8_0 (8.5
bits); int4 g128 (4.25) with a 6-bit g64 head (6.5) and Q4_K_M / Q4_0 (4.5-4.9, with a Q6_K head: 6.56). The
default int4 keeps an int8 head, 1.2x the head bytes of theirs."""


def part_mid4l(tokens: int, prompt: int, work: str) -> dict:
    cfg = real_shape(4)
    ckpt, gguf_bf16 = os.path.join(work, "mid4l"), os.path.join(work, "mid4l-bf16.gguf")
    model = build_empty(cfg, torch.bfloat16)
    fill_random(model)
    save_model(model, ckpt)
    write_gguf(model, gguf_bf16)
    del model
    gc.collect()
    out: dict = {}
    for ftype in sorted({p for _, _, p in PAIRS}):
        dst = os.path.join(work, f"mid4l-{ftype}.gguf")
        t0 = time.perf_counter()
        llama_quantize(gguf_bf16, dst, ftype)
        out[f"llama_{ftype}_quantize_s"] = time.perf_counter() - t0
        out[f"llama_{ftype}_bytes"] = os.path.getsize(dst)
    os.unlink(gguf_bf16)
    loaded = None
    for quant, opts, ftype in PAIRS:
        if loaded != quant:
            model = None
            gc.collect()
            t0 = time.perf_counter()
            model = load_model(ckpt, quant=quant.split("-")[0], progress=False, **opts)
            out[f"{quant}_load_s"] = time.perf_counter() - t0
            out[f"{quant}_bytes"] = quantized_nbytes(model)
            out[f"{quant}_bytes_per_token"] = bytes_per_token(model)
            loaded = quant
        out[f"{quant}|{ftype}"] = head_to_head(model, os.path.join(work, f"mid4l-{ftype}.gguf"), prompt, tokens)
        if PREFILL:
            out[f"{quant}|{ftype}|prefill"] = prefill_head_to_head(model, os.path.join(work, f"mid4l-{ftype}.gguf"),
                                                                   PREFILL)
    return out


def part_full(tokens: int, prompt: int) -> dict:
    cfg = real_shape()
    t0 = time.perf_counter()
    model = fill_random(build_quantized(cfg, QuantConfig.from_name("int4"), torch.bfloat16))  # full-precision parts
    with torch.no_grad():  # then the quantized buffers: random codes, scales giving weights ~ U(-0.02, 0.02)
        g = torch.Generator().manual_seed(0)
        for name, b in model.named_buffers():
            if b.dtype in (torch.uint8, torch.int8):
                flat = b.view(torch.uint8).view(-1)
                chunk = torch.randint(0, 256, (1 << 26,), dtype=torch.uint8, generator=g)
                for i in range(0, flat.numel(), chunk.numel()):
                    n = min(chunk.numel(), flat.numel() - i)
                    flat[i:i + n].copy_(chunk[(i // 3) % (chunk.numel() - n + 1):][:n])
            elif name.endswith("scale_zeros"):
                b[..., 0].fill_(0.02 / 8)  # weights ~ U(-0.02, 0.02)
                b[..., 1].zero_()
            elif name.endswith("scales"):
                b.fill_(0.02 / 127)
            elif name.endswith("zeros"):  # span/packed layouts of the asymmetric int4 preset
                b.fill_(1e-3)
    out = {"build_s": time.perf_counter() - t0, "int4_bytes": quantized_nbytes(model),
           "int4_bytes_per_token": bytes_per_token(model)}
    out["int4"] = head_to_head(model, None, prompt, tokens)
    return out


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["check", "mid4l", "full"], choices=["check", "mid4l", "full"])
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill, not timed)")
    ap.add_argument("--workdir", default=None, help="where the mid-4L checkpoint and GGUFs go (~17 GB)")
    ap.add_argument("--prefill", type=int, default=256,
                    help="mid-4L: also time the prefill of a prompt this long against llama.cpp's (0: skip)")
    ap.add_argument("--_part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PREFILL
    PREFILL = args.prefill
    if args._part:  # child process: one part, JSON on the last line
        if args._part == "check":
            res = part_check(8)
        elif args._part == "mid4l":
            with tempfile.TemporaryDirectory(dir=args.workdir) as work:
                res = part_mid4l(args.tokens, args.prompt, work)
        else:
            res = part_full(args.tokens, args.prompt)
        print(json.dumps(res))
        return
    from common import write_result

    results = {}
    for part in args.parts:
        cmd = [sys.executable, __file__, "--_part", part, "--tokens", str(args.tokens), "--prompt", str(args.prompt),
               "--prefill", str(args.prefill)]
        if args.workdir:
            cmd += ["--workdir", args.workdir]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"part {part} failed")
        results[part] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{part} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[part])}", flush=True)
    text = report(results, args)
    print(text)
    print("wrote", write_result("quant", text))


def report(r: dict, args: argparse.Namespace) -> str:
    lines = [f"Batch-1 greedy decode, {args.prompt}-token prompt, 2 threads; ours and llama.cpp in alternating "
             f"segments of {args.tokens} steps after {WARMUP} untimed ones, {ROUNDS} each. tok/s: the median round's, "
             "the range over rounds in brackets. Roofline = DRAM read bandwidth (the higher of the two measures "
             "around a round) / weight bytes ours reads per token; the fraction is the median round's. ours / peer: "
             "the median over rounds of the ratio of the two back-to-back segments, the range in brackets.", ""]
    if "check" in r:
        lines.append(f"GGUF check (tiny model): llama.cpp logits vs ours, max relative difference "
                     f"{r['check']['max_rel_logit_diff']:.2e}.\n")
    lines += ["| model | ours | tok/s | roofline tok/s | of roofline | peer | tok/s | ours / peer, paired rounds |",
              "|---|---|---|---|---|---|---|---|"]
    if "mid4l" in r:
        m = r["mid4l"]
        for quant, _, peer in PAIRS:
            h = m[f"{quant}|{peer}"]
            frac, roof, bw = roofline(h, m[f"{quant}_bytes_per_token"])
            lines.append(f"| mid-4L | {quant} ({m[f'{quant}_bytes'] / 2**30:.2f} GiB) | "
                         f"{median_range(h['ours_rounds'], '{:.1f}')} | {roof:.1f} "
                         f"({bw / 1e9:.1f} GB/s) | {frac:.0%} | llama.cpp {peer} "
                         f"({m[f'llama_{peer}_bytes'] / 2**30:.2f} GiB) | {median_range(h['peer_rounds'], '{:.1f}')} | "
                         f"{median_range(paired_ratios(h['ours_rounds'], h['peer_rounds']), unit='x')} |")
    if "full" in r:
        f = r["full"]
        h = f["int4"]
        frac, roof, bw = roofline(h, f["int4_bytes_per_token"])
        lines.append(f"| 21B-A3B, 28 layers | int4 ({f['int4_bytes'] / 2**30:.2f} GiB) | "
                     f"{median_range(h['ours_rounds'], '{:.1f}')} | "
                     f"{roof:.1f} ({bw / 1e9:.1f} GB/s) | {frac:.0%} | - | - | - |")
    if "mid4l" in r and args.prefill:
        m = r["mid4l"]
        lines += ["", f"Prefill of a {args.prefill}-token prompt (one chunk, to the first token; a new random prompt "
                  f"each round), mid-4L, {ROUNDS} rounds of each alternating after one untimed each:", "",
                  "| ours | tok/s | llama.cpp | tok/s | ours / llama.cpp, paired rounds |", "|---|---|---|---|---|"]
        for quant, _, peer in PAIRS:
            h = m.get(f"{quant}|{peer}|prefill")
            if h:
                lines.append(f"| {quant} | {median_range(h['ours_rounds'], '{:.0f}')} | {peer} | "
                             f"{median_range(h['peer_rounds'], '{:.0f}')} | "
                             f"{median_range(paired_ratios(h['ours_rounds'], h['peer_rounds']), unit='x')} |")
        lines.append("")
    lines.append("")
    for part, vals in r.items():
        extra = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in vals.items()
                 if not isinstance(v, dict)}
        lines.append(f"- {part}: " + json.dumps(extra))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
