"""Quantized weight layouts, one class per file (``base.WeightFormat`` says what each offers):

- ``span``: the native CPU kernels' layout (``ernie45.kernels``), chosen where they run and the shape fits;
- ``int8`` (``aten_int8``) / ``int4`` (``aten_int4``): torch's CPU weight-only ops' layouts;
- ``packed``: the portable layout, any bits, any device (what checkpoints hold).

A new layout is a new file with a ``WeightFormat`` subclass, listed in ``FORMATS`` (its kernel, if any, in
``ernie45.kernels`` and the backend that runs it in ``ernie45.accel``).
"""

from __future__ import annotations

import torch

from ernie45.quant.formats.aten_int4 import AtenInt4Format
from ernie45.quant.formats.aten_int8 import AtenInt8Format
from ernie45.quant.formats.base import WeightFormat
from ernie45.quant.formats.packed import PackedFormat
from ernie45.quant.formats.span import SpanFormat
from ernie45.quant.scheme import TensorScheme

FORMATS: tuple[type[WeightFormat], ...] = (SpanFormat, AtenInt8Format, AtenInt4Format, PackedFormat)
"""In order of preference: a weight takes the first that fits it on its device."""


def choose_format(lead: tuple[int, ...], n: int, k: int, scheme: TensorScheme, group: int,
                  device: torch.device | str | None) -> WeightFormat:
    """The layout a new ``lead + (N, K)`` weight with this scheme takes on ``device`` (None: the CPU)."""
    dev = torch.device(device or "cpu")
    cls = next(f for f in FORMATS if f.fits(n, k, scheme, group, dev))
    return cls(lead, n, k, scheme, group)


__all__ = ["FORMATS", "AtenInt4Format", "AtenInt8Format", "PackedFormat", "SpanFormat", "WeightFormat",
           "choose_format"]
