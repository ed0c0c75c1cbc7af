"""Quantized weight layouts as objects (``ernie45.quant.formats``): each stores the portable form and gives it back
bit-exactly, dequantizes to the same weight, and is chosen by its ``fits`` rule."""

from __future__ import annotations

import pytest
import torch

from ernie45 import kernels
from ernie45.quant import QWeight, TensorScheme
from ernie45.quant import math as qm
from ernie45.quant.formats import FORMATS, AtenInt4Format, AtenInt8Format, PackedFormat, SpanFormat, choose_format

CASES = {  # a scheme each layout fits: [E=2, N=64, K=256] stacks
    "span": TensorScheme(4, 128), "int8": TensorScheme(8, None, True), "int4": TensorScheme(4, 64),
    "packed": TensorScheme(6, 64),
}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_layout_round_trips_the_portable_form(fmt: type, monkeypatch: pytest.MonkeyPatch) -> None:
    if fmt is SpanFormat:  # the span layout exists where the kernels run: fails where they should and do not
        from tests import native

        native.require()
    scheme = CASES[fmt.name]
    monkeypatch.setattr("ernie45.quant.modules.choose_format",
                        lambda lead, n, k, s, g, d: fmt(lead, n, k, s, g))  # force this layout
    qw = QWeight((2,), 64, 256, scheme, torch.bfloat16)
    assert qw.layout == fmt.name and isinstance(qw.format, fmt)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        codes, scales, offsets = qm.quantize_rtn(torch.randn(64, 256, generator=g), scheme.bits,
                                                 scheme.group_for(256), scheme.symmetric)
        qw.set(i, codes, scales, offsets)
        c, s, z = qw.stored(i)
        assert torch.equal(c, codes) and s.dtype == z.dtype == torch.bfloat16
        assert torch.equal(qw.dequantize(i, torch.float32), qm.dequantize_mid(c, s, z, scheme.bits, torch.float32))
        mid = 2 ** (scheme.bits - 1)
        w = qm.dequantize(codes, scales, offsets, torch.float32)  # the quantizer's own weight
        assert (qw.dequantize(i, torch.float32) - w).abs().max() <= 2**-7 * w.abs().max() + 2**-8 * mid * scales.max()
    assert qw.nbytes() == sum(b.numel() * b.element_size() for b in qw.buffers())
    before = qw.version
    qw.float()
    assert qw.version > before and qw.dtype == torch.float32 and torch.equal(qw.stored(1)[0], c)


def test_layout_choice() -> None:
    cpu, meta, other = torch.device("cpu"), torch.device("meta"), torch.device("cuda")
    span = kernels.available()
    assert isinstance(choose_format((), 64, 256, CASES["span"], 128, cpu), SpanFormat if span else AtenInt4Format)
    assert isinstance(choose_format((), 64, 256, CASES["int8"], 256, meta), SpanFormat if span else AtenInt8Format)
    assert type(choose_format((), 64, 256, CASES["packed"], 64, cpu)) is (SpanFormat if span else PackedFormat)
    assert type(choose_format((), 64, 256, CASES["span"], 128, other)) is PackedFormat  # off the CPU: portable
    assert type(choose_format((), 48, 96, TensorScheme(2, 32), 32, cpu)) is PackedFormat  # no kernel shape fits
