"""The native CPU decode kernels against independent fp64 references, their layout, dispatch and build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ernie45 import kernels
from ernie45.quant import math as qm
from tests.reference import act_quant_ref

pytestmark = pytest.mark.native  # run, fail when this machine could build them and did not, skip otherwise


@pytest.mark.native(once=True)
def test_kernels_build_wherever_the_cpu_and_a_compiler_allow() -> None:
    """CI's machine has AVX-512 BF16/VNNI, AVX2 and gcc: a silent fallback to torch's slower ops would fail here."""
    _, flags = kernels._cpu_info()
    for isa in kernels.ISAS:
        if all(f in flags for f in kernels.ISA_FLAGS[isa]) and shutil.which(os.environ.get("CC") or "gcc"):
            assert kernels.isa_why_not(isa) == "", (isa, kernels.isa_why_not(isa))
    assert kernels.available() == any(not kernels.isa_why_not(isa) for isa in kernels.ISAS)


def test_one_openmp_runtime_shared_with_torch() -> None:
    """The library must reuse torch's libgomp (one thread pool), not load the system's as a second one.
    (Wheels that bundle a renamed copy, such as sentencepiece's libgomp-<hash>, are not ours to fix.)"""
    assert kernels.available()
    gomp = {line.split()[-1] for line in open("/proc/self/maps") if os.path.basename(line.split()[-1])
            .startswith("libgomp.so")}
    assert len(gomp) == 1 and "torch" in next(iter(gomp)), gomp


@pytest.mark.native(once=True)  # Python only
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_span_layout_round_trips(bits: int) -> None:
    n = 32 if bits in kernels.TILED else 5  # 8, 4 and 2 bits: tiles of 16 rows
    codes = torch.randint(0, 2**bits, (3, n, 512), dtype=torch.uint8)
    packed = kernels.to_span(codes, bits)
    assert packed.shape == (3, n, 512 * bits // 8)
    assert torch.equal(kernels.from_span(packed, bits), codes)
    into = torch.full_like(packed, 255)
    assert kernels.to_span(codes, bits, out=into) is into and torch.equal(into, packed)  # straight into a buffer
    if bits in kernels.TILED:  # tile t, chunk c (64 bytes), P planes: byte 4l + b = row 16t + l's columns 4Pc + 4p + b
        with pytest.raises(ValueError, match="contiguous uint8"):
            kernels.to_span(codes, bits, out=into[..., 1:])
        p = 8 // bits
        flat = packed[0].reshape(-1)
        for t, c, lane, b in [(0, 0, 0, 0), (0, 3, 5, 2), (1, 512 // (4 * p) - 1, 15, 3), (1, 10, 7, 1)]:
            r = 16 * t + lane
            byte = flat[t * 16 * 512 * bits // 8 + c * 64 + 4 * lane + b]
            want = sum(int(codes[0, r, 4 * p * c + 4 * q + b]) << (bits * q) for q in range(p))
            assert byte == want, (t, c, lane, b)
        s = torch.randn(3, n, 4)
        tiled = kernels.span_scales(s, bits)
        assert torch.equal(tiled[1].reshape(-1)[16 * 4 + 2 * 16 + 5], s[1, 16 + 5, 2])  # tile 1, group 2, lane 5
        assert torch.equal(kernels.from_span_scales(tiled, bits), s)
        with pytest.raises(ValueError, match="tiles of 16"):
            kernels.to_span(codes[:, :24], bits)
        assert not kernels.span_ok(512, bits, 128, 24) and kernels.span_ok(512, bits, 128, 32)
    if bits == 6:  # per 256 columns: the low 4 bits in the 4-bit layout, then the high 2 bits (4 planes a byte)
        assert packed[0, 0, 0] == (codes[0, 0, 0] & 15) | ((codes[0, 0, 64] & 15) << 4)
        assert packed[0, 0, 128] == (codes[0, 0, 0] >> 4) | ((codes[0, 0, 64] >> 4) << 2) | (
            (codes[0, 0, 128] >> 4) << 4) | ((codes[0, 0, 192] >> 4) << 6)
        assert packed[0, 0, 192] == (codes[0, 0, 256] & 15) | ((codes[0, 0, 320] & 15) << 4)


def _qweight(n: int, k: int, bits: int, group: int, symmetric: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    codes, scales, offsets = qm.quantize_rtn(w, bits, group, symmetric)
    zeros = offsets + 2 ** (bits - 1) * scales
    return codes, scales, zeros


def test_activation_block_rule_is_the_c_one() -> None:
    for k, g in [(512, 512), (512, 64), (512, 128), (384, 128), (192, 64), (2560, 2560), (1536, 128), (512, 32),
                 (384, 96), (512, 16)]:
        for bits in (8, 6, 4, 2):
            assert kernels.xblock(k, g, bits) == kernels.library().ernie45_qgemm_xblock(k, g, bits), (k, g, bits)
    assert [kernels.xblock(512, 32, b) for b in (8, 6, 4, 2)] == [32, 64, 32, 32]


@pytest.mark.parametrize("bits,group,k", [(8, 512, 512), (8, 64, 512), (8, 192, 384), (4, 128, 512), (4, 128, 384),
                                          (4, 64, 512), (2, 64, 512), (2, 256, 512), (2, 128, 768),
                                          (6, 128, 512), (6, 64, 768), (6, 256, 512),
                                          # GGUF's groups: Q8_0 / Q4_K / Q4_0 (32), Q6_K (6-bit 16), Q5_K (6-bit 32)
                                          (8, 32, 512), (4, 32, 512), (4, 96, 384), (2, 32, 512), (6, 16, 512),
                                          (6, 32, 768)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 15, 16])  # 15: a tile of 8 (AVX-512), one of 4, then 3
def test_qgemm_matches_fp64_reference(bits: int, group: int, k: int, symmetric: bool, rows: int) -> None:
    """fp32 in and out: the only approximation is the documented int8 activation quantization (errors of
    ~1e-3 of the largest output, which this tolerance would catch); the rest is fp32 accumulation, whose
    offset correction per group (mid * scale * sum x) leaves up to ~3e-5 of it for 8-bit codes."""
    n = 96  # k: whole 256-column iterations, and (384, 768) a remainder; 8-bit g192: 64-column blocks
    codes, scales, zeros = _qweight(n, k, bits, group, symmetric, seed=bits * rows)
    x = torch.randn(rows, k) * torch.logspace(-2, 1, k)  # columns of very different size: per-block scales matter
    w = qm.dequantize_mid(codes, scales, zeros, bits, dtype=torch.float64)
    ref = act_quant_ref(x, kernels.xblock(k, group, bits)) @ w.t()
    y = kernels.qgemm(x, kernels.to_span(codes, bits), bits, kernels.span_scales(scales, bits),
                      None if symmetric else kernels.span_scales(zeros, bits), group)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    err_act = (x.double() @ w.t() - ref).abs().max() / ref.abs().max()
    assert err_act > 3e-4  # the activation quantization is visible at this tolerance
    if symmetric:
        assert bool((zeros == 0).all())  # what lets the kernel skip them


def test_qgemm_bf16_in_and_out_and_scales() -> None:
    codes, scales, zeros = _qweight(64, 256, 4, 128, False)
    x = torch.randn(3, 256).bfloat16()
    w = qm.dequantize_mid(codes, scales.bfloat16(), zeros.bfloat16(), 4, dtype=torch.float64)
    ref = act_quant_ref(x, 128) @ w.t()
    y = kernels.qgemm(x, kernels.to_span(codes, 4), 4, kernels.span_scales(scales.bfloat16(), 4),
                      kernels.span_scales(zeros.bfloat16(), 4), 128)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=2**-8, atol=1e-3 * ref.abs().max().item())


def test_qgemm_rows_are_independent_of_their_batch() -> None:
    """A row's result must not depend on which rows share its call (seeded sampling, batch == solo)."""
    codes, scales, _ = _qweight(128, 512, 4, 128, True)
    packed, scales = kernels.to_span(codes, 4), kernels.span_scales(scales, 4)
    x = torch.randn(15, 512).bfloat16()  # rows 0-7 in a tile of 8 (AVX-512), 8-11 in one of 4, 12-14 in one of 3
    batch = kernels.qgemm(x, packed, 4, scales.bfloat16(), None, 128)
    for i in (0, 5, 9, 14):
        assert torch.equal(kernels.qgemm(x[i:i + 1], packed, 4, scales.bfloat16(), None, 128), batch[i:i + 1])


@pytest.mark.parametrize("group", [512, 128])
def test_qgemm_int8_small_tiles_match_single_rows(group: int) -> None:
    """8 bits, 48 weight rows (three tiles of 16: two threads take 32 and 16) and 7 x rows (a tile of 4, then 3):
    every output must equal the fp64 reference and, bit for bit, the row computed alone (a verify step's rows
    against decode's)."""
    n, k = 48, 512
    codes, scales, zeros = _qweight(n, k, 8, group, False)
    packed = kernels.to_span(codes, 8)
    ts, tz = kernels.span_scales(scales, 8), kernels.span_scales(zeros, 8)
    x = torch.randn(7, k) * torch.logspace(-2, 1, k)  # a tile of 4, then 3
    y = kernels.qgemm(x, packed, 8, ts, tz, group)
    w = qm.dequantize_mid(codes, scales, zeros, 8, dtype=torch.float64)
    ref = act_quant_ref(x, kernels.xblock(k, group, 8)) @ w.t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    for i in range(7):
        assert torch.equal(kernels.qgemm(x[i:i + 1], packed, 8, ts, tz, group), y[i:i + 1]), i
    assert torch.equal(kernels.qgemm(x[:2], packed, 8, ts, tz, group), y[:2])


def test_qgemm_zero_rows_and_blocks() -> None:
    codes, scales, zeros = _qweight(64, 256, 8, 256, False)
    x = torch.zeros(2, 256)
    x[1, 128:256] = 3.0  # one non-zero block
    y = kernels.qgemm(x, kernels.to_span(codes, 8), 8, scales, zeros, 256)
    ref = act_quant_ref(x, 128) @ qm.dequantize_mid(codes, scales, zeros, 8, dtype=torch.float64).t()
    assert torch.equal(y[0], torch.zeros(64))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
@pytest.mark.parametrize("k", [64, 96, 2560])
def test_bgemm_matches_fp64_reference(rows: int, k: int) -> None:
    x = torch.randn(rows, k).bfloat16()
    w = torch.randn(80, k).bfloat16()
    ref = x.double() @ w.double().t()  # bf16 products are exact; only the sum order and the rounding differ
    y = kernels.bgemm(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=2**-8, atol=1e-6 * k)
    # the same bits as fp32 accumulation rounded once, up to fp32 summation order
    assert (y.float() - (x.float() @ w.float().t()).bfloat16().float()).abs().max() <= ref.abs().max() * 2**-8


def test_bgemm_rows_are_independent_of_their_batch() -> None:
    """The tiles (4x4 and 16x1 here) and single rows must sum each (weight row, x row) pair in the same order."""
    w = torch.randn(70, 160).bfloat16()  # 70 rows: whole tiles and a remainder in each thread's share
    x = torch.randn(13, 160).bfloat16()  # 13: three 4-row tiles and one row left
    batch = kernels.bgemm(x, w)
    for i in (0, 5, 12):
        assert torch.equal(kernels.bgemm(x[i:i + 1], w), batch[i:i + 1])
    torch.testing.assert_close(batch.double(), x.double() @ w.double().t(), rtol=2**-8, atol=1e-4)


def _dpbf16_tree_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bgemm's sum, emulated in fp32 torch: per (x row, weight row) 16 lanes, each 32-column step adding the odd then
    the even product of its pair (VDPBF16PS; bf16 products are exact in fp32), then the halves / quarters / pairs
    tree of the lane reduction (fp32; the kernel rounds that to bf16 once)."""
    xf, wf = x.float(), w.float()
    m, k = xf.shape
    acc = torch.zeros(m, w.shape[0], 16)
    for c in range(0, k, 32):
        xs, ws = xf[:, c:c + 32].reshape(m, 1, 16, 2), wf[:, c:c + 32].reshape(1, -1, 16, 2)
        acc = acc + xs[..., 1] * ws[..., 1]
        acc = acc + xs[..., 0] * ws[..., 0]
    t3 = acc[..., 8:] + acc[..., :8]
    t6 = t3[..., 4:] + t3[..., :4]
    t8 = t6[..., :2] + t6[..., 2:]
    return t8[..., 0] + t8[..., 1]


def _bgemm_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel's fp32 sums before the bf16 rounding (its fp32-output form, the one the bf16 MoE uses)."""
    out = torch.empty(x.shape[0], w.shape[0])
    assert kernels._lib.ernie45_bgemm(x.data_ptr(), x.shape[0], x.shape[1], w.shape[0], w.data_ptr(), out.data_ptr(),
                                      0, torch.get_num_threads()) == 0
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_bgemm_is_the_one_summation_order_for_every_tiling(threads: int) -> None:
    """Every tile shape (16x1, 8x2, 4x3, 4x4, single rows for a partial block) gives each output exactly the
    reference order's bits: a tile that sums in another order fails here, not only as a batch difference."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 96, generator=g).bfloat16()  # 37: 16-row blocks and a partial one
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 6, 7, 9):
            x = (torch.randn(rows, 96, generator=g) * torch.logspace(-2, 2, 96)).bfloat16()
            ref = _dpbf16_tree_reference(x, w)
            assert torch.equal(_bgemm_fp32(x, w).view(torch.int32), ref.view(torch.int32)), rows
            assert torch.equal(kernels.bgemm(x, w).view(torch.int16), ref.bfloat16().view(torch.int16)), rows
    finally:
        torch.set_num_threads(old)


def test_linear_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kernels._lib.ernie45_bgemm
    monkeypatch.setattr(kernels._lib, "ernie45_bgemm", lambda *a: calls.append((a[1], a[2])) or real(*a))
    w = torch.randn(48, 64).bfloat16()
    x = torch.randn(2, 2, 64).bfloat16()
    with torch.no_grad():
        y = kernels.linear(x, w, torch.ones(48).bfloat16())
    assert calls == [(4, 64)] and y.shape == (2, 2, 48)
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, w).float() + 1, rtol=2**-7, atol=2e-2)
    with torch.no_grad():
        kernels.linear(x.float(), w.float())  # fp32: torch
        kernels.linear(torch.randn(kernels.BF16_MAX_ROWS + 1, 64).bfloat16(), w)  # oneDNN is faster there
        with kernels.use_kernels(False):
            kernels.linear(x, w)
    wp = torch.nn.Parameter(w.clone())
    y = kernels.linear(x, wp)  # autograd needs torch's op
    y.sum().backward()
    assert wp.grad is not None and len(calls) == 1


@pytest.mark.native(once=True)  # the build machinery: both builds fail the same way
def test_missing_compiler_falls_back_with_a_reason(tmp_path) -> None:
    code = ("import warnings, torch\nfrom ernie45 import kernels\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    ok = kernels.available()\nprint(ok, '|', kernels.why_unavailable(), '|', len(w))\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), ERNIE45_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    ok, why, warned = (s.strip() for s in out.split("|"))
    assert ok == "False" and warned == "1"
    assert all(f"{isa}: no C compiler ('{tmp_path / 'no-such-cc'}' not found" in why for isa in kernels.ISAS), why
    env = dict(os.environ, ERNIE45_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "turned off" in out


def test_bmoe_equals_the_per_expert_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Experts.forward`` at decode sizes in bf16 runs ``kernels.bmoe``; it must equal the per-expert torch path
    (F.linear per expert, bf16 roundings, ascending fp32 sum) up to silu's last bit, and be batch invariant."""
    from ernie45.accel.cpu import NATIVE
    from ernie45.accel.swap import swap
    from ernie45.model.moe import Experts

    torch.manual_seed(0)
    ex = Experts(8, 128, 96)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    ex = ex.bfloat16()
    swap(ex, NATIVE)  # the cpu backend's NativeExperts
    x = torch.randn(6, 128).bfloat16()
    idx = torch.tensor([[0, 3], [3, 1], [7, 0], [5, 5], [2, 6], [1, 4]])
    w = torch.rand(6, 2).bfloat16()
    calls = []
    real = kernels.bmoe
    monkeypatch.setattr(kernels, "bmoe", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = ex(x, idx, w)
        with kernels.use_kernels(False):
            ref = ex(x, idx, w)
        alone = ex(x[1:2], idx[1:2], w[1:2])
    assert len(calls) == 2
    torch.testing.assert_close(fused.float(), ref.float(), rtol=2**-7, atol=1e-2)
    assert torch.equal(alone, fused[1:2])
    ex.gate_up_proj.requires_grad_(True)
    ex(x, idx, w)  # autograd: the torch path
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="out of range"):
        real(x, torch.full((6, 2), 8), w, ex.gate_up_proj.detach(), ex.down_proj.detach())


@pytest.mark.parametrize("n,kv,d", [(20, 4, 128), (4, 2, 16), (8, 1, 64)])
def test_decode_attention_reads_the_paged_cache_in_place(n: int, kv: int, d: int) -> None:
    """Against an fp64 reference that gathers each sequence's blocks in table order; lengths that end mid-block,
    a one-token context, and blocks shared between sequences (a cached prefix)."""
    torch.manual_seed(0)
    blocks, p = 12, 4
    kc = torch.randn(blocks, p, kv, d).bfloat16()
    vc = torch.randn(blocks, p, kv, d).bfloat16()
    tables = torch.tensor([[3, 7, 1, 0], [3, 9, 0, 0], [11, 0, 0, 0]])
    lens = torch.tensor([15, 6, 1])
    q = torch.randn(3, n, d).bfloat16()
    assert kernels.decode_attention_ok(q, kc)
    out = kernels.decode_attention(q, kc, vc, tables, lens, d ** -0.5)
    for s in range(3):
        keys = kc[tables[s]].flatten(0, 1)[:lens[s]].double()          # [L, KV, D]
        vals = vc[tables[s]].flatten(0, 1)[:lens[s]].double()
        kk = keys.repeat_interleave(n // kv, dim=1).transpose(0, 1)     # [N, L, D]
        vv = vals.repeat_interleave(n // kv, dim=1).transpose(0, 1)
        probs = (torch.einsum("nd,nld->nl", q[s].double(), kk) * d ** -0.5).softmax(-1)
        ref = torch.einsum("nl,nld->nd", probs, vv)
        torch.testing.assert_close(out[s].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.decode_attention(q, kc, vc, tables, lens, d ** -0.5, torch.bfloat16), out.bfloat16())
    with pytest.raises(RuntimeError, match="context length"):
        kernels.decode_attention(q, kc, vc, tables, torch.tensor([15, 6, 17]), d ** -0.5)


@pytest.mark.parametrize("n,kv,d", [(20, 4, 128), (16, 2, 64), (8, 1, 32)])
def test_decode_attention_over_many_blocks_of_16_positions(n: int, kv: int, d: int) -> None:
    """Contexts of several 16-position blocks (the kernel's score blocks, the next block prefetched) ending mid-block
    and on a block boundary, through a shuffled table; a NaN query gives NaNs for its sequence only, as torch."""
    torch.manual_seed(3)
    blocks, p = 64, 4
    kc = torch.randn(blocks, p, kv, d).bfloat16()
    vc = torch.randn(blocks, p, kv, d).bfloat16()
    tables = torch.randperm(blocks)[:60].reshape(3, 20)
    lens = torch.tensor([37, 64, 79])
    q = (torch.randn(3, n, d) * 2).bfloat16()
    out = kernels.decode_attention(q, kc, vc, tables, lens, d ** -0.5)
    for s in range(3):
        keys = kc[tables[s]].flatten(0, 1)[:lens[s]].double()
        vals = vc[tables[s]].flatten(0, 1)[:lens[s]].double()
        kk = keys.repeat_interleave(n // kv, dim=1).transpose(0, 1)
        vv = vals.repeat_interleave(n // kv, dim=1).transpose(0, 1)
        probs = (torch.einsum("nd,nld->nl", q[s].double(), kk) * d ** -0.5).softmax(-1)
        torch.testing.assert_close(out[s].double(), torch.einsum("nl,nld->nd", probs, vv), rtol=1e-5, atol=1e-5)
    q[1, 0, 0] = float("nan")
    out2 = kernels.decode_attention(q, kc, vc, tables, lens, d ** -0.5)
    assert out2[1, 0].isnan().all() and not out2[1, 1:].isnan().any()
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])


def test_decode_attention_takes_a_verify_steps_tokens_together() -> None:
    """Consecutive tokens with lengths growing by one over the same blocks (a verify step's rows) are read as one
    group: each token's output is bit for bit the one it gets alone. Tokens whose lengths grow by one but whose tables
    differ in a block they read, and a group longer than the kernel's 8, come out right too."""
    torch.manual_seed(5)
    blocks, p, n, kv, d = 40, 4, 20, 4, 128
    kc = torch.randn(blocks, p, kv, d).bfloat16()
    vc = torch.randn(blocks, p, kv, d).bfloat16()
    a, b = torch.randperm(blocks)[:10], torch.randperm(blocks)[:10]
    b[:2] = a[:2]  # b shares a's first two blocks, then differs
    rows = [(a, 30), (a, 31), (a, 32), (a, 33),            # one verify step of 4
            (b, 34), (a, 35),                              # lengths still grow by one, other tables
            (b, 9), (a, 10),                               # differ in block 2, which 9 and 10 read
            *[(b, 12 + i) for i in range(11)]]             # 11 tokens: groups of 8 and 3
    tables = torch.stack([t for t, _ in rows])
    lens = torch.tensor([ln for _, ln in rows])
    q = torch.randn(len(rows), n, d).bfloat16()
    out = kernels.decode_attention(q, kc, vc, tables, lens, d ** -0.5)
    for i in range(len(rows)):
        alone = kernels.decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], d ** -0.5)
        assert torch.equal(out[i:i + 1], alone), i
        keys = kc[tables[i]].flatten(0, 1)[:lens[i]].double().repeat_interleave(n // kv, dim=1).transpose(0, 1)
        vals = vc[tables[i]].flatten(0, 1)[:lens[i]].double().repeat_interleave(n // kv, dim=1).transpose(0, 1)
        probs = (torch.einsum("nd,nld->nl", q[i].double(), keys) * d ** -0.5).softmax(-1)
        torch.testing.assert_close(out[i].double(), torch.einsum("nl,nld->nd", probs, vals), rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_attention_equals_the_torch_path() -> None:
    """Paged attention at decode: the cpu backend's native in-place read against the torch backend's gather +
    matmul, same cache."""
    from ernie45 import ModelConfig
    from ernie45.accel import AttentionMetadata, PagedAttention
    from ernie45.accel.cpu.attention import CPUPagedAttention
    from ernie45.engine.kv_cache import KVCache

    cfg = ModelConfig.from_name("tiny-moe")
    outs = []
    for backend in (CPUPagedAttention, PagedAttention):
        torch.manual_seed(1)  # the same cache contents for both paths
        cache = KVCache(cfg, num_blocks=8, block_size=4, dtype=torch.bfloat16, num_layers=1)
        cache.k[0].copy_(torch.randn_like(cache.k[0], dtype=torch.float32))
        cache.v[0].copy_(torch.randn_like(cache.v[0], dtype=torch.float32))
        step = backend(cache).step(AttentionMetadata.build([[2, 5, 1], [4, 0]], [1, 1], [10, 7], 4))
        g = torch.Generator().manual_seed(2)
        q = torch.randn(2, cfg.num_attention_heads, cfg.head_dim, generator=g).bfloat16()
        k = torch.randn(2, cfg.num_key_value_heads, cfg.head_dim, generator=g).bfloat16()
        v = torch.randn(2, cfg.num_key_value_heads, cfg.head_dim, generator=g).bfloat16()
        outs.append(step.attend(0, q, k, v).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2**-7, atol=1e-2)


def test_the_header_is_the_one_boundary() -> None:
    """ernie45_kernels.h declares every exported function and struct; the ctypes side declares each function with
    as many arguments as its prototype, and its struct mirrors have the C sizes (checked at load, again here)."""
    import ctypes
    import re

    header = kernels.HEADER.read_text()
    protos = dict(re.findall(r"^(?:int|int64_t) (ernie45_\w+)\(([^;]*)\);", header, flags=re.M))
    lib = kernels.library()
    assert len(protos) == 15 and "ernie45_decode_layer" in protos
    for name, params in protos.items():
        assert len(getattr(lib, name).argtypes) == len(params.split(",")), name
    for struct in (kernels.QSet, kernels.LayerPlan):
        assert f"}} {struct.__name__};" in header
        assert lib.ernie45_sizeof(struct.__name__.encode()) == ctypes.sizeof(struct)
    assert lib.ernie45_sizeof(b"Nothing") == -1
    source = "\n".join(p.read_text() for p in (kernels.SOURCE, *kernels.PARTS))
    assert len(kernels.PARTS) == 7  # split by concern, one translation unit
    exported = set(re.findall(r"^(?:int|int64_t) (ernie45_\w+)\(", source, flags=re.M))
    assert exported == set(protos), exported ^ set(protos)  # nothing exported past the header


@pytest.mark.parametrize("nbytes", [256, 4096 * 3 + 256, 1 << 20])
def test_stream_read_reads_every_byte(nbytes: int) -> None:
    """The bandwidth ceiling of benchmarks/bench_int4_bw.py: every 4-byte word summed (int32 wrap-around), so a
    byte it skipped or read twice changes the result."""
    buf = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32)
    want = int(buf.to(torch.int64).sum()) % 2**32
    assert kernels.stream_read(buf) % 2**32 == want
    buf[-1] += 1  # the last word too
    assert kernels.stream_read(buf) % 2**32 == (want + 1) % 2**32
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.stream_read(buf[:-1])
