"""``v16_exp_ps`` (ernie45/kernels/cpu/simd.h, the exp of the MoE kernels' SiLU) against fp64 ``math.exp``, in each
build's instruction set: a small C program includes the header, the values come back as text."""

from __future__ import annotations

import math
import os
import subprocess

import pytest

from ernie45 import kernels
from tests import native

pytestmark = pytest.mark.native(once=True)  # builds its own program per ISA

PROGRAM = r"""
#include <immintrin.h>
#include <stdio.h>
#include "cpu/simd.h"
int main(void) {
    static const float xs[] = {%s};
    const int n = (int)(sizeof(xs) / sizeof(xs[0]));
    float in[16], out[16];
    for (int i = 0; i < n; i += 16) {
        for (int j = 0; j < 16; j++) in[j] = i + j < n ? xs[i + j] : 0.0f;
        v16_storeu_ps(out, v16_exp_ps(v16_loadu_ps(in)));
        for (int j = 0; j < 16 && i + j < n; j++) printf("%%a\n", out[j]);
    }
    return 0;
}
"""


def _run(isa: str, xs: list[float], tmp_path) -> list[float]:  # noqa: ANN001 - a pathlib.Path
    native.require(isa)
    src, exe = tmp_path / f"exp_{isa}.c", tmp_path / f"exp_{isa}"
    src.write_text(PROGRAM % ", ".join(f"{float.hex(x)}f" for x in xs))
    cc = os.environ.get("CC") or "gcc"
    flags = [f for f in kernels.ISA_CFLAGS[isa]]
    subprocess.run([cc, "-O2", *flags, "-ffp-contract=off", "-I", str(kernels.SOURCE.parent), "-o", str(exe), str(src),
                    "-lm"], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return [float.fromhex(v) for v in out]


def _f32(x: float) -> float:
    import struct
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.parametrize("isa", kernels.ISAS)
def test_exp_within_two_ulp_of_fp64(isa: str, tmp_path) -> None:  # noqa: ANN001
    xs = [_f32(-87.25 + i * 0.0421) for i in range(4168)]  # -87.25 .. 88.20
    xs += [0.0, -0.0, 1.0, -1.0, 2.0**-100, 88.0, -87.0]
    got = _run(isa, xs, tmp_path)
    worst = 0.0
    for x, y in zip(xs, got, strict=True):
        ref = math.exp(x)
        ulp = 2.0 ** (math.frexp(ref)[1] - 24)  # one unit in the last place of a float near ref
        worst = max(worst, abs(y - ref) / ulp)
    assert worst <= 2.0, f"{isa}: v16_exp_ps is {worst:.2f} ulp from exp somewhere in [-87.25, 88]"
    assert got[-7:-5] == [1.0, 1.0]  # exp(+-0) exactly


@pytest.mark.parametrize("isa", kernels.ISAS)
def test_exp_clamps_outside_the_float_range(isa: str, tmp_path) -> None:  # noqa: ANN001
    big, small, over, under = _run(isa, [200.0, -200.0, 88.3, -87.3], tmp_path)
    assert math.isfinite(big) and big == over  # clamped at 88.3, not inf
    assert 0.0 < small == under  # clamped at -87.3: a normal float, never 0 or garbage from the exponent field
