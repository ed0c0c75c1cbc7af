"""The Triton kernels against the torch reference: on CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py before triton is imported) in fp32, on a CUDA device in bf16 as well."""

from __future__ import annotations

import pytest
import torch

from ernie45.kernels import triton as tk
from ernie45.model.layers import RMSNorm, apply_rope
from ernie45.model.moe import Experts
from ernie45.quant import math as qm

pytestmark = pytest.mark.skipif(not tk.available(), reason="triton is not installed (the test extra installs it)")

DEVICE = "cuda" if torch.cuda.is_available() and not tk.interpreting() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _experts(e: int, h: int, i: int, seed: int) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(e, h, i)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.1)
        ex.down_proj.normal_(0, 0.1)
    return ex


def _quantized(w: torch.Tensor, bits: int, group: int):
    from ernie45.kernels.triton.moe import ExpertWeight
    codes, scales, offsets = qm.quantize_rtn(w, bits, group, symmetric=False)
    zeros = offsets + 2 ** (bits - 1) * scales  # the stored middle-code convention
    return ExpertWeight(qm.pack(codes, bits), bits, scales, zeros)


def _routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def test_moe_align_groups_pairs_by_expert_in_padded_blocks():
    from ernie45.kernels.triton.moe import moe_align
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]])
    pair_ids, block_expert, num_blocks = moe_align(idx, 5, 4)
    s = idx.numel()
    nb = int(num_blocks)
    assert nb == 4  # experts 0, 1, 2, 3 hold 1, 3, 1, 3 pairs: one block of 4 each; expert 4 none
    blocks = pair_ids[: nb * 4].view(nb, 4)
    flat = idx.reshape(-1)
    seen = []
    for b in range(nb):
        real = [int(p) for p in blocks[b] if p < s]
        assert real and all(int(flat[p]) == int(block_expert[b]) for p in real)
        assert real == sorted(real)  # stable: the reference's order inside an expert
        seen += real
    assert sorted(seen) == list(range(s))
    assert (pair_ids[nb * 4:] == s).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k", [(1, 2), (5, 3), (19, 4)])
def test_fused_moe_dense_equals_experts_forward(dtype, t, k):
    from ernie45.kernels.triton.moe import ExpertWeight, fused_moe
    ex = _experts(8, 64, 32, seed=t).to(DEVICE, dtype)
    idx, w = _routing(t, 8, k, seed=t)
    x = torch.randn(t, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    idx, w = idx.to(DEVICE), w.to(DEVICE, dtype)
    ref = ex(x, idx, w)
    out = fused_moe(x, idx, w, ExpertWeight(ex.gate_up_proj.data), ExpertWeight(ex.down_proj.data),
                    block_n=32, block_k=32)
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fused_moe_quantized_dequantizes_in_registers(bits):
    """The codes stay packed; the result equals the reference experts on the dequantized weights."""
    from ernie45.kernels.triton.moe import fused_moe
    ex = _experts(6, 64, 32, seed=bits)
    gu, dn = _quantized(ex.gate_up_proj.data, bits, 16), _quantized(ex.down_proj.data, bits, 16)
    ref_ex = Experts(6, 64, 32)
    with torch.no_grad():
        ref_ex.gate_up_proj.copy_(gu.dequantize(torch.float32))
        ref_ex.down_proj.copy_(dn.dequantize(torch.float32))
    idx, w = _routing(7, 6, 2, seed=bits)
    x = torch.randn(7, 64)
    ref = ref_ex(x, idx, w)
    gu_d, dn_d = (type(gu)(t.data.to(DEVICE), bits, t.scales.to(DEVICE), t.zeros.to(DEVICE)) for t in (gu, dn))
    out = fused_moe(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), gu_d, dn_d, block_n=32, block_k=32).cpu()
    assert (out - ref).abs().max().item() <= 2e-5 * max(ref.abs().max().item(), 1.0)
    # the dequantization matches the portable layout's own (quant.math), so a wrong shift or zero fails here
    c, s, o = qm.quantize_rtn(ex.down_proj.data, bits, 16, symmetric=False)
    assert torch.allclose(dn.dequantize(torch.float32), qm.dequantize(c, s, o), atol=1e-6)


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_triton_linear(bits):
    from ernie45.kernels.triton.moe import ExpertWeight, linear
    torch.manual_seed(bits)
    w = torch.randn(1, 48, 64) * 0.1
    wt = ExpertWeight(w) if bits == 16 else _quantized(w, bits, 32)
    x = torch.randn(5, 64)
    ref = x @ wt.dequantize(torch.float32)[0].T
    wd = ExpertWeight(wt.data.to(DEVICE), bits, *(None if t is None else t.to(DEVICE) for t in (wt.scales, wt.zeros)))
    out = linear(x.to(DEVICE), wd, block_n=32, block_k=32).cpu()
    assert (out - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def _cache(num_blocks, block_size, kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, block_size, kv, d, generator=g).to(DEVICE, dtype),
            torch.randn(num_blocks, block_size, kv, d, generator=g).to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv", [(6, 2), (8, 8), (4, 1)])
def test_paged_attention_mixed_query_lengths(dtype, heads, kv):
    """Decodes (1 token), a 4-token verification over a cached prefix and a fresh 3-token prefill in one call,
    scattered blocks, against a per-sequence reference."""
    from ernie45.kernels.triton.attention import paged_attention, paged_attention_reference
    kc, vc = _cache(16, 4, kv, 32, dtype)
    ctx, ql = [5, 13, 3, 1], [1, 4, 3, 1]
    tables = torch.tensor([[3, 7, 0, 0], [1, 2, 5, 11], [9, 0, 0, 0], [14, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(ql), heads, 32).to(DEVICE, dtype)
    qs = torch.tensor([0, 1, 5, 8, 9], dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, kc, vc, tables, torch.tensor(ctx, dtype=torch.int32, device=DEVICE), qs, 32 ** -0.5,
                          block_n=16)
    ref = paged_attention_reference(q, kc, vc, tables, ctx, ql, 32 ** -0.5)
    assert (out.float() - ref.float()).abs().max().item() <= TOL[dtype] * 4


def test_verify_step_equals_one_token_at_a_time():
    """The k+1 query positions of a speculative verification give what k+1 successive decode steps give."""
    from ernie45.kernels.triton.attention import paged_attention
    kc, vc = _cache(8, 4, 2, 16, torch.float32, seed=3)
    tables = torch.tensor([[6, 2, 4]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(4, 4, 16).to(DEVICE)
    together = paged_attention(q, kc, vc, tables, torch.tensor([11], dtype=torch.int32, device=DEVICE),
                               torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), 0.25, block_n=16)
    for i in range(4):
        one = paged_attention(q[i:i + 1], kc, vc, tables, torch.tensor([8 + i], dtype=torch.int32, device=DEVICE),
                              torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 0.25, block_n=16)
        assert torch.allclose(together[i], one[0], atol=1e-6)


@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm(residual):
    from ernie45.kernels.triton.small_ops import add_rms_norm
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    h = torch.randn(5, 96)
    x = torch.randn(5, 96)
    ref_h = h + x if residual else h.clone()
    ref = norm(ref_h)
    hd = h.to(DEVICE)
    out = add_rms_norm(hd, norm.weight.data.to(DEVICE), 1e-5, x.to(DEVICE) if residual else None).cpu()
    assert torch.allclose(hd.cpu(), ref_h, atol=1e-6)  # the residual stream updated in place
    assert torch.allclose(out, ref, atol=1e-5)


def test_rope_kv_write():
    from ernie45.kernels.triton.small_ops import rope_kv_write
    torch.manual_seed(0)
    t, n, kv, d = 3, 6, 2, 16
    q, k, v = torch.randn(t, n, d), torch.randn(t, kv, d), torch.randn(t, kv, d)
    pos = torch.tensor([4, 9, 2])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv
    cos, sin = ang.cos(), ang.sin()
    kc, vc = torch.zeros(5, 4, kv, d), torch.zeros(5, 4, kv, d)
    slots = torch.tensor([17, 3, 9])
    qd, kcd, vcd = q.clone().to(DEVICE), kc.to(DEVICE), vc.to(DEVICE)
    rope_kv_write(qd, k.to(DEVICE), v.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), slots.to(DEVICE), kcd, vcd)
    assert torch.allclose(qd.cpu(), apply_rope(q, cos[:, None], sin[:, None]), atol=1e-6)
    assert torch.allclose(kcd.cpu().flatten(0, 1)[slots], apply_rope(k, cos[:, None], sin[:, None]), atol=1e-6)
    assert torch.equal(vcd.cpu().flatten(0, 1)[slots], v)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots] = False
    assert (kcd.cpu().flatten(0, 1)[untouched] == 0).all()


def test_bad_shapes_are_clear_errors():
    from ernie45.kernels.triton.attention import paged_attention
    from ernie45.kernels.triton.moe import ExpertWeight, fused_moe
    kc, vc = _cache(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(torch.randn(1, 4, 8), kc, vc, torch.zeros(1, 1, dtype=torch.int32),
                        torch.tensor([1]), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        fused_moe(torch.randn(2, 32), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                  ExpertWeight(torch.randn(2, 16, 64)), ExpertWeight(torch.randn(2, 64, 8)))
    with pytest.raises(ValueError, match="bits"):
        ExpertWeight(torch.zeros(1, 2, 2, dtype=torch.uint8), bits=6, scales=torch.ones(1, 2, 1),
                     zeros=torch.zeros(1, 2, 1))
