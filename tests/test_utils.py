"""ernie45.utils: huge pages for the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ernie45.quant import QuantLinear, TensorScheme
from ernie45.utils import HUGE_PAGE, advise_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping holding ``addr`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages off")
def test_large_weights_are_advised_before_they_are_written() -> None:
    """The aligned interior of each large CPU tensor is marked for huge pages (VmFlags "hg"), once per storage;
    small tensors are left alone. A quantized linear's buffers are advised where they are allocated."""
    t = torch.empty(8 * HUGE_PAGE, dtype=torch.uint8)
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    assert advise_huge_pages([t, t[3:], torch.empty(16)]) >= 6 * HUGE_PAGE  # the view shares t's storage
    assert "hg" in _vm_flags(start)
    assert advise_huge_pages([torch.empty(HUGE_PAGE // 4, dtype=torch.uint8)]) == 0
    q = QuantLinear(4096, 2048, TensorScheme(8, None, symmetric=True))  # 8 MiB of codes
    assert "hg" in _vm_flags(-(-q.qweight.data_ptr() // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE)
