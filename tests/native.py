"""Whether this machine must run the native CPU kernels (``ernie45/kernels``), decided once per build for the suite.

The kernels come in one build per instruction set (:data:`ernie45.kernels.ISAS`: AVX-512 and AVX2). A CPU with a
build's instructions (:data:`ernie45.kernels.ISA_FLAGS`) plus a C compiler (this machine, CI) must build it: an
unbuildable or unloadable library there is a test failure carrying the compiler's error, never a skip. Only a CPU
without those instructions or a machine without a compiler skips that build's tests, with the reason;
``conftest.py`` prints which case applied to each build at the top of the test log, and runs every native test
once per build (the ``native_isa`` fixture).
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest

from ernie45 import kernels


@functools.cache
def state(isa: str | None = None) -> tuple[str, str]:
    """``("built", path)``, ``("skip", reason)`` (this machine cannot run them) or ``("fail", reason)`` for one
    build; ``isa`` None: the first build that is not skipped (the default one the library picks)."""
    if isa is None:
        states = [state(i) for i in kernels.ISAS]
        return next((s for s in states if s[0] != "skip"), states[-1])
    why = kernels.isa_why_not(isa)
    if not why:
        return "built", getattr(kernels._libs[isa], "_name", "?")
    _, flags = kernels._cpu_info()
    need = kernels.ISA_FLAGS[isa]
    missing = [f for f in need if f not in flags]
    if missing:
        return "skip", f"this CPU lacks {', '.join(missing)} (the {isa} kernels need {', '.join(need)})"
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        return "skip", f"no C compiler ({cc!r} not found)"
    return "fail", (f"this CPU has {', '.join(need)} and {cc!r} exists, so the {isa} kernels must build, but they "
                    f"are unavailable: {why}")


def report_line() -> str:
    parts = []
    for isa in kernels.ISAS:
        verdict, detail = state(isa)
        parts.append({"built": f"{isa} built and loaded ({detail}), its tests run",
                      "skip": f"{isa} SKIPPED, this machine cannot run it: {detail}",
                      "fail": f"{isa} REQUIRED but unavailable, its tests FAIL: {detail}"}[verdict])
    return "native CPU kernels: " + "; ".join(parts)


def skip_unless_possible(isa: str | None = None) -> None:
    """Skip when this machine cannot run the kernels (no such CPU, no compiler)."""
    verdict, detail = state(isa)
    if verdict == "skip":
        pytest.skip(f"native kernels{f' ({isa})' if isa else ''}: {detail}")


def require(isa: str | None = None) -> None:
    """Call at the start of a native test (the ``native`` marker does it): returns, skips or fails."""
    verdict, detail = state(isa)
    if verdict == "skip":
        pytest.skip(f"native kernels{f' ({isa})' if isa else ''}: {detail}")
    if verdict == "fail":
        pytest.fail(detail, pytrace=False)


def run(isa: str | None = None) -> bool:
    """For checks inside a larger test that apply only with the kernels: True when they must run (the kernels
    are built), False when this machine cannot run them, a failure when it can but they did not build."""
    verdict, detail = state(isa)
    if verdict == "fail":
        pytest.fail(detail, pytrace=False)
    return verdict == "built"


def item_isa(item: pytest.Item) -> str | None:
    """The build a native test runs on: its ``native_isa`` parameter, or ``pytest.mark.native(isa)``'s argument."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("native_isa"):
        return callspec.params["native_isa"]
    marker = item.get_closest_marker("native")
    return marker.args[0] if marker is not None and marker.args else None
