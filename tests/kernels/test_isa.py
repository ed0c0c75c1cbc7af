"""The two builds of the native kernels (AVX-512, AVX2): one source, the choice between them, and the AVX2 build's
exported functions against the AVX-512 build's on the same inputs (each build is also tested on its own against
the fp64 references: every native test runs once per build, tests/conftest.py)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, kernels
from ernie45.quant import math as qm
from tests import native

pytestmark = pytest.mark.native(once=True)  # these compare or switch builds themselves


@pytest.fixture
def both() -> None:
    """Both builds must run here (skip with the reason where the CPU lacks one, fail where one does not build)."""
    for isa in kernels.ISAS:
        native.require(isa)


def _on_each(fn, *args, **kw) -> list:  # noqa: ANN001 - any kernels function
    out = []
    for isa in kernels.ISAS:
        with kernels.use_isa(isa):
            assert kernels.active_isa() == isa and kernels._lib is kernels.library(isa)
            out.append(fn(*args, **kw))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, ulps: int = 0) -> None:
    """Equal up to fp32 summation order (the AVX2 build reproduces the AVX-512 one's, so this is rarely used):
    ``ulps`` last places of the output dtype, relative to the row's largest value."""
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = torch.finfo(a.dtype).eps
    scale = a.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    assert float(((a.float() - b.float()).abs() / scale).max()) <= ulps * eps, (a, b)


def test_kernel_sources_name_no_intrinsic() -> None:
    """The kernels use simd.h's names only, so the AVX2 build compiles the very same code (one source)."""
    pattern = re.compile(r"\b(_mm\d*_\w+|__m\d+\w*|__mmask\d+|_CMP_\w+|_MM_\w+)")
    text = kernels.SOURCE.read_text()
    body = text[text.index('#include "cpu/simd.h"'):]
    for name, src in [(kernels.SOURCE.name, body), *((p.name, p.read_text()) for p in kernels.PARTS)]:
        src = re.sub(r"//[^\n]*", "", src)
        assert not pattern.findall(src), (name, sorted(set(pattern.findall(src))))
    simd = kernels.SIMD.read_text()
    avx512, avx2 = simd.split("#else", 1)
    ours = set(re.findall(r"#define (v16\w*)\(", avx512))
    missing = ours - set(re.findall(r"\b(v16\w*)\b", avx2))
    assert len(ours) > 40 and not missing, missing
    assert not re.search(r"_mm512|zmm|__m512", re.sub(r"//[^\n]*", "", avx2))  # the AVX2 half names no AVX-512


def test_isa_choice(both: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.ISAS[0] == "avx512" and set(kernels.ISA_FLAGS) == set(kernels.ISAS)
    monkeypatch.delenv("ERNIE45_ISA", raising=False)
    kernels.set_isa(None)
    assert kernels.active_isa() == "avx512" and kernels.isa_why_not("avx2") == ""  # the first that works
    assert kernels.library("avx2") is not kernels.library("avx512")
    with kernels.use_isa("avx2"):
        assert kernels.active_isa() == "avx2" and kernels._lib is kernels.library("avx2") and kernels.available()
        with kernels.use_kernels(False):
            assert kernels.library() is None and kernels.library("avx2") is None
    assert kernels.active_isa() == "avx512" and kernels._lib is kernels.library("avx512")
    with pytest.raises(ValueError, match="unknown kernel ISA 'sse2'"):
        kernels.set_isa("sse2")
    with pytest.raises(ValueError, match="unknown kernel ISA"):
        kernels.isa_why_not("avx")
    try:
        monkeypatch.setenv("ERNIE45_ISA", "avx2")  # forces one
        kernels.set_isa(None)
        assert kernels.active_isa() == "avx2" and kernels.available()
        monkeypatch.setenv("ERNIE45_ISA", "neon")  # a typo: no kernels, and why (warned once a process)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernels.set_isa(None)
        assert not kernels.available() and "ERNIE45_ISA='neon' is not one of avx512, avx2" in kernels.why_unavailable()
        monkeypatch.delenv("ERNIE45_ISA")
        # A build this CPU cannot run: set_isa refuses it by name; the default skips it.
        monkeypatch.delitem(kernels._libs, "avx512")
        monkeypatch.setitem(kernels._why, "avx512", "this CPU lacks avx512_bf16")
        with pytest.raises(RuntimeError, match="the avx512 kernels cannot run here: this CPU lacks avx512_bf16"):
            kernels.set_isa("avx512")
        kernels.set_isa(None)
        assert kernels.active_isa() == "avx2" and kernels.available()
    finally:
        monkeypatch.undo()
        kernels.set_isa(None)
    assert kernels.active_isa() == "avx512"


@pytest.mark.parametrize("bits,group", [(8, 128), (8, 64), (6, 64), (4, 128), (2, 64)])
@pytest.mark.parametrize("rows", [1, 6, 13])
def test_builds_agree_on_qgemm(both: None, bits: int, group: int, rows: int) -> None:
    g = torch.Generator().manual_seed(bits * 10 + rows)
    k = 768  # three 256-column iterations; 8-bit g64: 64-column activation blocks
    w = torch.randn(112 if bits in kernels.TILED else 100, k, generator=g)  # 8, 4, 2 bits: whole tiles of 16 rows
    codes, scales, offsets = qm.quantize_rtn(w, bits, group, False)
    zeros = offsets + 2 ** (bits - 1) * scales
    span = kernels.to_span(codes, bits)
    scales, zeros = kernels.span_scales(scales, bits), kernels.span_scales(zeros, bits)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)
    for xd, sd in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        a, b = _on_each(kernels.qgemm, x.to(xd), span, bits, scales.to(sd), zeros.to(sd), group)
        _close(a, b)
    a, b = _on_each(kernels.qgemm, x, span, bits, scales, None, group)  # symmetric
    _close(a, b)


@pytest.mark.parametrize("rows,k", [(1, 2560), (9, 96), (7, 96)])  # 16x1, 4x4, 4x3 tiles
def test_builds_agree_on_bgemm(both: None, rows: int, k: int) -> None:
    x, w = torch.randn(rows, k).bfloat16(), torch.randn(72, k).bfloat16()
    a, b = _on_each(kernels.bgemm, x, w)
    _close(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_builds_agree_on_moe(both: None, bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    e, h, i, t = 6, 256, 256, 5
    idx = torch.tensor([[0, 3], [3, 1], [5, 0], [2, 2], [4, 1]])
    wts = torch.rand(t, 2, generator=g)
    x = torch.randn(t, h, generator=g).bfloat16()
    gu = torch.randn(e, 2 * i, h, generator=g) * 0.1
    dn = torch.randn(e, h, i, generator=g) * 0.1
    a, b = _on_each(kernels.bmoe, x, idx, wts.bfloat16(), gu.bfloat16(), dn.bfloat16())
    _close(a, b)
    packed = []
    for wt, grp in ((gu, 128), (dn, 64)):
        c, s, o = qm.quantize_rtn(wt.reshape(-1, wt.shape[-1]), bits, grp, False)
        z = o + 2 ** (bits - 1) * s
        s, z = kernels.span_scales(s, bits), kernels.span_scales(z, bits)  # tiles stay inside an expert (N % 16 == 0)
        packed.append((kernels.to_span(c, bits).reshape(e, wt.shape[1], -1), s.reshape(e, wt.shape[1], -1).bfloat16(),
                       z.reshape(e, wt.shape[1], -1).bfloat16(), grp))
    a, b = _on_each(kernels.qmoe, x, idx, wts.bfloat16(), bits, *packed)
    _close(a, b)
    a, b = _on_each(kernels.qmoe, x.float(), idx, wts, bits, *((p[0], p[1].float(), p[2].float(), p[3])
                                                              for p in packed))
    _close(a, b)


def test_builds_agree_on_attention_and_small_ops(both: None) -> None:
    torch.manual_seed(0)
    kc, vc = torch.randn(10, 4, 2, 64).bfloat16(), torch.randn(10, 4, 2, 64).bfloat16()
    q = torch.randn(3, 8, 64).bfloat16()
    tables, lens = torch.tensor([[3, 7, 1], [2, 9, 0], [5, 0, 0]]), torch.tensor([11, 6, 1])
    for out in (torch.float32, torch.bfloat16):
        a, b = _on_each(kernels.decode_attention, q, kc, vc, tables, lens, 0.125, out)
        _close(a, b)
    x = (torch.randn(5, 512) * torch.logspace(-3, 2, 5)[:, None]).bfloat16()
    x[0, :3] = torch.tensor([1e-39, -1e-39, 3e-40])  # fp32 denormals: VCVTNEPS2BF16 flushes them, so does AVX2
    wn = torch.rand(512).bfloat16() + 0.5
    a, b = _on_each(kernels.rms_norm, x, wn, 1e-5)
    _close(a, b)
    cos, sin = torch.rand(5, 32), torch.rand(5, 32)
    a, b = _on_each(lambda: kernels.rope_(x[:, :320].reshape(5, 5, 64).clone(), cos, sin))
    assert torch.equal(a, b)
    rw, rb = torch.randn(16, 512) * 0.05, torch.randn(16) * 0.02
    for xd in (torch.bfloat16, torch.float32):
        (pa, wa, ia), (pb, wb, ib) = _on_each(kernels.router, x.to(xd), rw, rb, 4, 1e-12)
        _close(pa, pb)
        _close(wa, wb)
        assert torch.equal(ia, ib)
    v = torch.randn(4, 5003)
    v[1, 4000] = float("nan")
    v[2, 7] = v[2, 4001] = 30.0
    for xd in (torch.bfloat16, torch.float32):
        a, b = _on_each(kernels.argmax, v.to(xd))
        assert torch.equal(a, b) and a.tolist() == v.to(xd).argmax(-1).tolist()


def test_builds_agree_on_decode_layers(both: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized tiny MoE model (one dense layer, MoE layers with a shared expert) decoding through whole-layer
    native calls (``kernels.decode_layer``) on each build: the same greedy tokens and every step's logits."""
    from ernie45.accel import accelerate
    from ernie45.engine import LLMEngine, SamplingParams
    from ernie45.engine.model_runner import ModelRunner
    from ernie45.quant import quantize_model

    cfg = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                                    head_dim=64)
    model = accelerate(quantize_model(init_weights(ErnieForCausalLM(cfg), std=0.05, seed=0).bfloat16().eval(), "int4"),
                       "cpu")
    calls, logits, execute, decode_layer = [], [], ModelRunner.execute, kernels.decode_layer

    def record(self: ModelRunner, scheduled: list) -> tuple:
        seqs, out = execute(self, scheduled)
        logits[-1].append(None if out is None else out.float().clone())
        return seqs, out

    monkeypatch.setattr(ModelRunner, "execute", record)
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(kernels.active_isa()) or decode_layer(*a))

    def run() -> list:
        logits.append([])
        eng = LLMEngine(model, max_num_seqs=2, kv_cache_memory="4MB", max_model_len=32, enable_prefix_caching=False)
        for n, p in enumerate([[5, 17, 99, 3], [250, 41, 7]]):
            eng.add_request(str(n), p, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        outs = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
        return [outs[k] for k in sorted(outs)]

    ta, tb = _on_each(run)
    assert ta == tb and calls.count("avx512") == calls.count("avx2") >= 4 * cfg.num_hidden_layers
    assert len(logits[0]) == len(logits[1])
    for a, b in zip(*logits):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b)
