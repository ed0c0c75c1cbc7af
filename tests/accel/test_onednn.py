"""The oneDNN paths torch's bf16 matmul takes, forced one at a time (``ONEDNN_MAX_CPU_ISA``), against fp64.

AMX reaches ernie45 through oneDNN (ernie45/accel/cpu/onednn.py says why): on a CPU with AMX the AMX path must be
the one taken and must be right; on a CPU without it the test skips and says so. The AVX-512 BF16 path runs on
every CPU with that feature (this project's AMD and Intel machines both have it)."""

from __future__ import annotations

import pytest

from ernie45 import kernels
from ernie45.accel.cpu import onednn


def _flags() -> set[str]:
    return set(kernels._cpu_info()[1])


# bf16 inputs, fp32 accumulation, a bf16 result: one bf16 rounding of the output (2^-8 relative) dominates
TOL = 2 ** -7


def test_amx_path_when_the_cpu_has_it():
    if not {"amx_tile", "amx_bf16"} <= _flags():
        pytest.skip("this CPU has no AMX (amx_tile/amx_bf16 not in /proc/cpuinfo): the AMX path cannot run here")
    r = onednn.matmul_impl("amx")
    assert r["impl"] is not None and "amx" in r["impl"], r
    assert r["max_rel_err"] < TOL, r


def test_amx_is_what_torch_takes_by_default_on_an_amx_cpu():
    if not {"amx_tile", "amx_bf16"} <= _flags():
        pytest.skip("this CPU has no AMX (amx_tile/amx_bf16 not in /proc/cpuinfo)")
    assert "amx" in (onednn.matmul_impl()["impl"] or ""), onednn.matmul_impl()


def test_avx512_bf16_path():
    if "avx512_bf16" not in _flags():
        pytest.skip("this CPU has no AVX-512 BF16: oneDNN's bf16 brgemm cannot run here")
    r = onednn.matmul_impl("avx512_bf16")
    assert r["impl"] is not None and "avx512_core_bf16" in r["impl"] and "amx" not in r["impl"], r
    assert r["max_rel_err"] < TOL, r


def test_below_avx512_bf16_torch_leaves_onednn_and_is_still_right():
    r = onednn.matmul_impl("avx2")
    assert r["impl"] is None, r  # torch's own bf16 kernels, not oneDNN
    assert r["max_rel_err"] < TOL, r


def test_a_failing_probe_is_reported_clearly(monkeypatch):
    monkeypatch.setattr(onednn, "_PROBE", "raise SystemExit('boom')")
    onednn.matmul_impl.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="oneDNN probe failed"):
            onednn.matmul_impl("avx2")
    finally:
        onednn.matmul_impl.cache_clear()
