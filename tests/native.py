"""Whether this machine must run the native CPU kernels (``ernie45/kernels``), decided once for the whole suite.

A CPU with the kernels' instructions (:data:`ernie45.kernels.CPU_FLAGS`) plus a C compiler (this machine, CI) must
build them: an unbuildable or unloadable library there is a test failure carrying the compiler's error, never a
skip. Only a CPU without those instructions or a machine without a compiler skips the native tests, with the
reason; ``conftest.py`` prints which case applied at the top of the test log.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

from ernie45 import kernels


@functools.cache
def state() -> tuple[str, str]:
    """``("built", path)``, ``("skip", reason)`` (this machine cannot run them) or ``("fail", reason)``."""
    if kernels.available():
        lib = kernels.library()
        return "built", getattr(lib, "_name", "?")
    _, flags = kernels._cpu_info()
    missing = [f for f in kernels.CPU_FLAGS if f not in flags]
    if missing:
        return "skip", f"this CPU lacks {', '.join(missing)} (the kernels need {', '.join(kernels.CPU_FLAGS)})"
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        return "skip", f"no C compiler ({cc!r} not found)"
    return "fail", (f"this CPU has {', '.join(kernels.CPU_FLAGS)} and {cc!r} exists, so the native kernels must "
                    f"build, but they are unavailable: {kernels.why_unavailable()}")


def report_line() -> str:
    verdict, detail = state()
    return {"built": f"native CPU kernels: built and loaded ({detail}); native tests run",
            "skip": f"native CPU kernels: SKIPPED, this machine cannot run them: {detail}",
            "fail": f"native CPU kernels: REQUIRED but unavailable, native tests FAIL: {detail}"}[verdict]


def skip_unless_possible() -> None:
    """Skip when this machine cannot run the kernels (no such CPU, no compiler)."""
    verdict, detail = state()
    if verdict == "skip":
        pytest.skip(f"native kernels: {detail}")


def require() -> None:
    """Call at the start of a native test (the ``native`` marker does it): returns, skips or fails."""
    verdict, detail = state()
    if verdict == "skip":
        pytest.skip(f"native kernels: {detail}")
    if verdict == "fail":
        pytest.fail(detail, pytrace=False)


def run() -> bool:
    """For checks inside a larger test that apply only with the kernels: True when they must run (the kernels
    are built), False when this machine cannot run them, a failure when it can but they did not build."""
    verdict, detail = state()
    if verdict == "fail":
        pytest.fail(detail, pytrace=False)
    return verdict == "built"
