"""GGUF in and out: block codecs against gguf-py's own dequantization, round trips through our writer and reader,
the tokenizer rebuilt from GGUF metadata, llama.cpp loading our exports, and our loading of llama.cpp's files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ernie45.config import ModelConfig
from ernie45.loading import load_model, save_model
from ernie45.model.checkpoint import CheckpointError, build_empty
from ernie45.quant import QuantConfig, TensorScheme, quantize_model

gguf = pytest.importorskip("gguf")  # the 'gguf' extra; installed with the test extra

from ernie45.formats import ggml  # noqa: E402
from ernie45.formats.gguf import GGUFFile, export_gguf, gguf_tokenizer, load_gguf  # noqa: E402
from ernie45.quant.math import dequantize_mid  # noqa: E402
from ernie45.tokenizer import Tokenizer  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "ernie45", "assets", "demo")
TEXTS = ["Hello world, how are you today?", "  two  spaces\n\nand 12345 digits 中文 ünïcödé",
         "<|begin_of_sentence|>User: hi\nAssistant: fine<|end_of_sentence|>"]


def tiny(seed: int = 0, **changes) -> torch.nn.Module:
    """A random tiny-moe (every layer from 1 on MoE, as llama.cpp requires) with decisive routers."""
    cfg = ModelConfig.from_name("tiny-moe").replace(**changes)
    model = build_empty(cfg, torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if "e_score" in n)]
        for n, p in tensors:
            if "norm" in n:
                p.uniform_(0.5, 1.5, generator=g)
            elif "e_score" in n:
                p.uniform_(-0.1, 0.1, generator=g)
            else:
                p.normal_(0, 0.08 if "gate.weight" in n else 0.04, generator=g)
    return model.eval()


def ids(n: int = 9) -> torch.Tensor:
    return torch.arange(5, 5 + n)[None] * 7 % 500


def file_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as gguf-py dequantizes it (the reference), torch order, fp32."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    return out


def float_model(path: str, **changes) -> torch.nn.Module:
    """The reference: a float tiny model holding gguf-py's dequantization of every tensor of the file."""
    from ernie45.formats.gguf import gguf_to_native

    model = tiny(**changes)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, w in file_weights(path).items():
            native, part = gguf_to_native(name)
            dest = params[native]
            if part is not None:
                half = dest.shape[1] // 2
                dest = dest[:, :half] if part == "gate" else dest[:, half:]
            dest.copy_(w.reshape(dest.shape))
        if model.config.tie_word_embeddings:
            model.tie_weights()
    return model


def position_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over positions of max |a - b| / max |b|: a quantized tiny random model flips a near-tied expert
    choice at the odd position, which the median ignores."""
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).median())


# ------------------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("qtype", sorted(ggml.EXACT))
def test_decode_equals_gguf_dequantize(qtype):
    """Random blocks of every exactly-mapped type decode to ggml's own values, bit for bit in fp32."""
    rng = np.random.default_rng(qtype)
    qk, nbytes = ggml.BLOCK[qtype]
    n, k = 4, 2 * qk
    raw = rng.integers(0, 256, size=(n, k // qk, nbytes), dtype=np.uint8)
    f16_at = {ggml.Q8_0: [0], ggml.Q4_0: [0], ggml.Q4_1: [0, 2], ggml.Q5_0: [0], ggml.Q4_K: [0, 2],
              ggml.Q5_K: [0, 2], ggml.Q6_K: [208]}[qtype]
    for off in f16_at:  # finite f16 scales (random bytes could be inf/nan)
        raw[..., off:off + 2] = rng.uniform(-0.02, 0.02, (n, k // qk)).astype(np.float16).view(np.uint8).reshape(
            n, k // qk, 2)
    raw = raw.reshape(n, -1)
    codes, scales, zeros = ggml.decode(torch.from_numpy(raw), qtype, k)
    ours = dequantize_mid(codes, scales, zeros, ggml.EXACT[qtype].bits)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(ours, ref)
    assert torch.equal(ggml.to_float(raw, qtype, (n, k)), ref)  # ggml's own order, not gguf-py's code


@pytest.mark.parametrize("qtype", [ggml.Q4_1, ggml.Q4_K, ggml.Q5_K])
def test_float_weights_are_ggml_arithmetic_for_far_apart_scales(qtype):
    """With d and the min term many binades apart, the middle-code form ((q - mid) * s + zero, zero = mid * s - m)
    rounds where ggml's d * q - m does not: ``to_float`` (the path of weights kept in full precision, such as the
    embedding) must still equal gguf-py bit for bit."""
    rng = np.random.default_rng(qtype)
    qk, nbytes = ggml.BLOCK[qtype]
    n, k = 8, 2 * qk
    raw = rng.integers(0, 256, size=(n, k // qk, nbytes), dtype=np.uint8)
    d = rng.uniform(1e-4, 2e-4, (n, k // qk)).astype(np.float16)
    m = rng.uniform(*((300, 600) if qtype == ggml.Q4_1 else (5, 9)), (n, k // qk)).astype(np.float16)  # Q4_1: m itself
    raw[..., 0:2] = d.view(np.uint8).reshape(n, k // qk, 2)
    raw[..., 2:4] = m.view(np.uint8).reshape(n, k // qk, 2)
    raw = raw.reshape(n, -1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(ggml.to_float(raw, qtype, (n, k)), ref)
    codes, scales, zeros = ggml.decode(torch.from_numpy(raw), qtype, k)
    assert not torch.equal(dequantize_mid(codes, scales, zeros, ggml.EXACT[qtype].bits), ref)  # the case is hard


@pytest.mark.parametrize("qtype, bits", [(ggml.Q8_0, 8), (ggml.Q4_0, 4)])
def test_encode_is_gguf_layout(qtype, bits):
    """Our symmetric g32 codes written as blocks read back (by gguf-py) as the same weights."""
    w = torch.randn(6, 64)
    from ernie45.quant.math import quantize_rtn

    codes, scales, offsets = quantize_rtn(w, bits, 32, symmetric=True)
    zeros = offsets + 2 ** (bits - 1) * scales
    raw = ggml.encode(codes, scales.half().float(), qtype)
    back = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(back, dequantize_mid(codes, scales.half().float(), zeros.half().float() * 0, bits))
    c2, s2, z2 = ggml.decode(torch.from_numpy(raw), qtype, 64)
    assert torch.equal(c2, codes) and torch.equal(s2, scales.half().float()) and not z2.any()


# -------------------------------------------------------------------------------------- round trips
def test_bf16_round_trip_exact(tmp_path):
    model = tiny()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, "bf16")
    back = load_model(path, dtype=torch.float32)  # through load_model's suffix dispatch
    assert getattr(back, "quant_config", None) is None
    ref = tiny()
    with torch.no_grad():
        for n, p in ref.named_parameters():  # the matrices go out as BF16; norms and the router as F32
            if p.dim() >= 2 and ".mlp.gate." not in n:
                p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(back(ids()).logits, ref(ids()).logits, rtol=0, atol=0)
    assert back.config.moe_layer_start_index == 1 and back.config.moe_num_shared_experts == 1
    assert back.config.rms_norm_eps == model.config.rms_norm_eps


@pytest.mark.parametrize("kind, rel", [("q8_0", 0.03), ("q4_0", 0.2)])
def test_quantized_round_trip(tmp_path, kind, rel):
    """ours -> Q8_0/Q4_0 -> ours: every weight equals gguf-py's dequantization of the file (fp32 scales: exact),
    logits within the type's error of the float model, and a second export writes the same blocks."""
    model = tiny()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, kind)
    back = load_gguf(path, dtype=torch.float32)
    qc = back.quant_config
    bits = {"q8_0": 8, "q4_0": 4}[kind]
    assert qc.experts == qc.dense == qc.head == TensorScheme(bits, 32, symmetric=True) and not qc.rules
    ref = file_weights(path)
    layer = back.model.layers[1]
    w_gate = layer.mlp.experts.gate_up_proj.dequantize(3, torch.float32)[:32]
    assert torch.equal(w_gate, ref["blk.1.ffn_gate_exps.weight"][3])
    assert torch.equal(layer.self_attn.k_proj.dequantize(None, torch.float32), ref["blk.1.attn_k.weight"])
    assert torch.equal(back.model.embed_tokens.weight, ref["token_embd.weight"])
    assert torch.equal(back.lm_head.dequantize(None, torch.float32), ref["token_embd.weight"])  # tied: same codes
    with torch.no_grad():
        a = back(ids()).logits
        torch.testing.assert_close(a, float_model(path)(ids()).logits, rtol=1e-4, atol=1e-4)
        err = position_error(a, model(ids()).logits)
    assert err < rel, err
    again = str(tmp_path / "again.gguf")
    export_gguf(back, again, kind)  # lossless second way: our int codes written as the same blocks
    r1, r2 = gguf.GGUFReader(path), gguf.GGUFReader(again)
    for t1, t2 in zip(r1.tensors, r2.tensors):
        assert t1.name == t2.name and np.array_equal(t1.data, t2.data), t1.name


def test_int4_g32_model_exports_losslessly(tmp_path):
    """A model quantized by us as symmetric int4 g32 (bf16 scales: exact in Q4_0's f16) keeps its exact codes and
    scales through Q4_0."""
    model = tiny().to(torch.bfloat16)
    scheme = TensorScheme(4, 32, symmetric=True)
    quantize_model(model, QuantConfig(scheme, scheme, scheme), dtype=torch.bfloat16)
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, "q4_0")
    back = load_gguf(path, dtype=torch.bfloat16)
    mine, theirs = dict(model.named_buffers()), dict(back.named_buffers())
    assert any(n.endswith("qweight") for n in mine)
    for n, a in mine.items():
        if n.endswith(("qweight", "scales")):
            assert torch.equal(a, theirs[n]), n
    # the tied head's codes are token_embd's: the lookup now reads the quantized rows, all else is unchanged
    torch.testing.assert_close(back.model.embed_tokens.weight, model.lm_head.dequantize(), rtol=0, atol=0)


def test_saved_gguf_import_is_our_checkpoint(tmp_path):
    """A GGUF loaded with its per-tensor types saves as our quantized checkpoint and loads back the same."""
    model = tiny()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, "q8_0")
    back = load_gguf(path, dtype=torch.float32)
    save_model(back, tmp_path / "ours")
    again = load_model(tmp_path / "ours", dtype=torch.float32)
    assert again.quant_config == back.quant_config
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, back(ids()).logits, rtol=0, atol=0)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="x.gguf"):
        load_model(str(bad))
    model = tiny(moe_layer_interval=2)
    with pytest.raises(ValueError, match="moe_layer_interval=2"):
        export_gguf(model, str(tmp_path / "y.gguf"))
    with pytest.raises(ValueError, match="q5_k"):
        export_gguf(tiny(), str(tmp_path / "z.gguf"), "q5_k")


# ---------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_from_gguf_metadata(tmp_path):
    """The demo's SentencePiece tokenizer written into GGUF metadata and rebuilt: identical encodings."""
    tok = Tokenizer.from_pretrained(DEMO)
    model = tiny(vocab_size=tok.vocab_size)
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, "bf16", tokenizer=tok)
    back = gguf_tokenizer(path)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    msgs = [{"role": "user", "content": "hi"}]
    assert back.encode_chat(msgs) == tok.encode_chat(msgs)


# -------------------------------------------------------------------------------------- llama.cpp
def _llama_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(tokens)
    out = torch.tensor(np.array(llm.scores[: len(tokens)]))
    llm.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind, rel", [("bf16", 2e-2), ("q8_0", 3e-2), ("q4_0", 3e-2)])
def test_llama_cpp_loads_our_export(tmp_path, kind, rel):
    """llama.cpp runs our file and its logits match ours on the same (loaded-back) weights."""
    pytest.importorskip("llama_cpp")
    model = tiny()
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, kind)
    ours = load_gguf(path, dtype=torch.float32)
    tokens = ids()[0].tolist()
    with torch.no_grad():
        mine = ours(torch.tensor([tokens])).logits[0]
    theirs = _llama_logits(path, tokens)
    # llama.cpp quantizes activations to Q8 for quantized matmuls (we compute in fp32), which flips the odd
    # near-tied expert choice of a random tiny model: the median position
    err = position_error(theirs, mine)
    assert err < rel, ((theirs - mine).abs().amax(-1) / mine.abs().amax(-1)).tolist()


@pytest.mark.slow
def test_llama_cpp_k_quants_load_exactly(tmp_path):
    """llama.cpp's own Q4_K_M (Q4_K + Q6_K tensors) loads with every weight equal to its dequantization."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    model = tiny(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=256)
    src, dst = str(tmp_path / "bf16.gguf"), str(tmp_path / "q4km.gguf")
    export_gguf(model, src, "bf16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0
    types = {t.qtype for t in GGUFFile(dst).tensors.values()}
    assert {ggml.Q4_K, ggml.Q6_K} <= types
    back = load_gguf(dst, dtype=torch.float32)
    ref = file_weights(dst)
    from ernie45.formats.gguf import gguf_to_native

    qweights = dict(back.named_modules())
    for name, w in ref.items():
        native, part = gguf_to_native(name)
        owner, _, leaf = native.rpartition(".")
        mod = qweights.get(owner)
        if w.dim() == 3:
            qw = getattr(mod, leaf)
            rows = slice(0, w.shape[1]) if part != "up" else slice(w.shape[1], None)
            got = torch.stack([qw.dequantize(e, torch.float32)[rows] for e in range(w.shape[0])])
        elif hasattr(mod, "qweight"):
            got = mod.dequantize(None, torch.float32)
        else:
            got = (dict(back.named_parameters()) | dict(back.named_buffers()))[native].float().reshape(w.shape)
        assert torch.equal(got, w), name
    tokens = ids()[0].tolist()
    with torch.no_grad():
        mine = back(torch.tensor([tokens])).logits[0]
    err = position_error(_llama_logits(dst, tokens), mine)
    assert err < 3e-2, err


def _converter() -> str | None:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 sdist ($LLAMA_CPP_SRC, or downloaded
    once into ~/.cache/ernie45)."""
    root = os.environ.get("LLAMA_CPP_SRC")
    if root is None:
        cache = os.path.expanduser("~/.cache/ernie45/llcpp-src")
        root = os.path.join(cache, "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
        if not os.path.isdir(root):
            os.makedirs(cache, exist_ok=True)
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                                  "llama-cpp-python==0.3.36", "-d", cache], capture_output=True)
            if got.returncode:
                return None
            import tarfile

            with tarfile.open(os.path.join(cache, "llama_cpp_python-0.3.36.tar.gz")) as tar:
                tar.extractall(cache, filter="data")
    script = os.path.join(root, "convert_hf_to_gguf.py")
    return script if os.path.isfile(script) else None


@pytest.mark.slow
def test_llama_cpp_converter_output_loads_equal(tmp_path):
    """A GGUF written by llama.cpp's own convert_hf_to_gguf.py from our saved HF folder loads to the logits of
    the HF folder, and its tokenizer encodes as the original."""
    script = _converter()
    if script is None:
        pytest.skip("llama.cpp's converter is not available (set LLAMA_CPP_SRC or allow pip download)")
    tok = Tokenizer.from_pretrained(DEMO)
    model = tiny(vocab_size=tok.vocab_size, intermediate_size=64)  # converter: shared width = inter // kv heads
    folder = tmp_path / "hf"
    save_model(model.to(torch.bfloat16), folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes(open(os.path.join(DEMO, name), "rb").read())
    out = str(tmp_path / "conv.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(script), "gguf-py"))
    run = subprocess.run([sys.executable, script, str(folder), "--outfile", out, "--outtype", "bf16"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    hf, ours = load_model(folder, dtype=torch.float32), load_model(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, hf(ids()).logits, rtol=0, atol=0)
    back = gguf_tokenizer(out)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text


@pytest.mark.slow
def test_generate_from_a_gguf_file(tmp_path, capsys):
    """`ernie45 generate model.gguf`: the engine loads the file and its tokenizer from the metadata; the text equals
    the one generated from the HF folder the GGUF was written from (bf16 file of a bf16 model: same weights)."""
    from ernie45.cli import main

    src = load_model("demo")  # bf16 weights: the BF16 GGUF holds them exactly
    path = str(tmp_path / "demo.gguf")
    export_gguf(src, path, "bf16", tokenizer=Tokenizer.from_pretrained(DEMO))
    flags = ["--temperature", "0", "--max-tokens", "8", "--kv-cache-memory", "16MB", "--dtype", "float32"]
    outs = []
    for model in ("demo", path):
        assert main(["generate", model, "Once upon a time", *flags]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].strip()) > len("Once upon a time")
