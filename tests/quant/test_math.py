"""Pure quantization math: exact round trips, packing, the int4 kernel layout, HQQ against RTN."""

from __future__ import annotations

import pytest
import torch

from ernie45.quant import math as qm


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = qm.pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(qm.unpack(packed, bits), codes)


def test_pack_bit_order_is_first_column_lowest() -> None:
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert qm.pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert qm.pack(codes, 4).tolist() == [[1 | 2 << 4, 3]]


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_dequantize_is_exact_on_the_grid(bits: int, group: int | None, symmetric: bool) -> None:
    """A weight that already lies on a quantization grid comes back exactly, and its codes too."""
    torch.manual_seed(bits * 1000 + (group or 0))
    n, k = 8, 256
    g = group or k
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, k // g) + 0.5
    offsets = -(2 ** (bits - 1)) * scales if symmetric else torch.randn(n, k // g)
    if symmetric:  # the symmetric grid never uses the lowest code (int8: -127..127), except at 2 bits
        codes = codes.clamp(min=1 if bits > 2 else 0)
        # and its scale comes from max |w|: make one code in each group hit the edge of the range
        top = 2 ** (bits - 1) + (2 ** (bits - 1) - 1 if bits > 2 else 2 ** (bits - 1))
        codes.view(n, k // g, g)[..., 0] = min(top, 2**bits - 1)
    else:  # asymmetric grids come from min and max: put both in each group
        codes.view(n, k // g, g)[..., 0] = 0
        codes.view(n, k // g, g)[..., 1] = 2**bits - 1
    w = qm.dequantize(codes, scales, offsets)
    c2, s2, o2 = qm.quantize_rtn(w, bits, g, symmetric)
    if not (symmetric and bits == 2):
        assert torch.equal(c2, codes)
        torch.testing.assert_close(qm.dequantize(c2, s2, o2), w, rtol=1e-5, atol=1e-4)  # fp32 ulps at |w|~250


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_rtn_error_is_bounded_by_half_a_step(bits: int) -> None:
    w = torch.randn(16, 256)
    codes, scales, offsets = qm.quantize_rtn(w, bits, 64, symmetric=False)
    err = (qm.dequantize(codes, scales, offsets) - w).abs().view(16, 4, 64)
    assert bool((err <= scales[..., None] / 2 + 1e-6).all())
    assert codes.max() <= 2**bits - 1


def test_groups_must_divide_the_row() -> None:
    with pytest.raises(ValueError, match="groups of 48"):
        qm.quantize_rtn(torch.randn(4, 64), 4, 48, False)
    with pytest.raises(ValueError, match="bits=3"):
        qm.quantize_rtn(torch.randn(4, 64), 3, 32, False)


@pytest.mark.parametrize("n,k", [(64, 64), (128, 256), (192, 96)])
def test_int4_kernel_layout_matches_torch_and_inverts(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    ours = qm.to_int4_kernel_layout(codes)
    torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(ours, torch_packed)
    assert torch.equal(qm.from_int4_kernel_layout(ours), codes)
    stacked = torch.stack([codes, codes.flip(0)])
    assert torch.equal(qm.from_int4_kernel_layout(qm.to_int4_kernel_layout(stacked)), stacked)


def test_int4_kernel_computes_our_dequantized_weight() -> None:
    n, k, g = 128, 256, 64
    w = torch.randn(n, k)
    codes, s, o = qm.quantize_rtn(w, 4, g, symmetric=False)
    sz = qm.int4_scale_zeros(s, o + 8 * s)
    x = torch.randn(3, k)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qm.to_int4_kernel_layout(codes), g, sz)
    torch.testing.assert_close(y, x @ qm.dequantize(codes, s, o).t(), rtol=1e-4, atol=1e-4)
    s2, z2 = qm.int4_split_scale_zeros(sz)
    assert torch.equal(s2, s) and torch.equal(z2, o + 8 * s)
    torch.testing.assert_close(qm.dequantize_mid(codes, s2, z2, 4), qm.dequantize(codes, s, o), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,group", [(2, 64), (2, 32), (4, 128), (4, 32)])
@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_mse_method_lowers_the_squared_error(bits: int, group: int, dist: str) -> None:
    """Per group the range search + refit can only lower the squared error; overall, clearly at 2 bits."""
    torch.manual_seed(1)
    w = (torch.randn(128, 256) if dist == "normal" else torch.distributions.StudentT(3.0).sample((128, 256))) * 0.02
    codes, s, o = qm.quantize_mse(w, bits, group)
    rtn = qm.dequantize(*qm.quantize_rtn(w, bits, group, symmetric=False)) - w
    mse = qm.dequantize(codes, s, o) - w
    per_group = lambda e: e.view(128, -1, group).pow(2).sum(-1)  # noqa: E731
    assert bool((per_group(mse) <= per_group(rtn) * (1 + 1e-5) + 1e-12).all())
    assert mse.norm() < rtn.norm() * (0.85 if bits == 2 else 0.99)
    assert codes.max() <= 2**bits - 1 and codes.dtype == torch.uint8


@pytest.mark.parametrize("bits,group,gain", [(2, 64, 0.9), (2, 32, 0.93), (4, 128, 0.99)])
def test_hqq_beats_rtn_on_heavy_tailed_weights(bits: int, group: int, gain: float) -> None:
    """Trained weights are heavy-tailed; HQQ's lp objective must lower the reconstruction error there
    (mean |error|, its objective, and the relative Frobenius error)."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02
    rtn = qm.dequantize(*qm.quantize_rtn(w, bits, group, symmetric=False))
    hqq = qm.dequantize(*qm.quantize_hqq(w, bits, group))
    e_rtn, e_hqq = (rtn - w).abs().mean(), (hqq - w).abs().mean()
    assert e_hqq < gain * e_rtn, (e_hqq, e_rtn)
    assert (hqq - w).norm() < (rtn - w).norm()
