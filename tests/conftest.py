"""Shared fixtures: tiny checkpoints written by transformers' save_pretrained (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The native-vs-torch table of the CPU backend without timing runs: results must not depend on the machine's load.
# tests/accel/test_choice.py measures it.
os.environ.setdefault("ERNIE45_CALIBRATION", "defaults")
if not torch.cuda.is_available():
    # The Triton kernels run on CPU under Triton's interpreter; triton reads this when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


@pytest.fixture(scope="session")
def artifacts_dir() -> str:
    """Where tests leave files people may want to look at (screenshots, plots)."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


def pytest_report_header(config: pytest.Config) -> list[str]:
    from tests import native

    return [native.report_line()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test marked ``native`` runs once per kernel build (AVX-512, AVX2): see the ``native_isa`` fixture.
    ``pytest.mark.native(once=True)``: once, on the default build (tests of the build machinery itself)."""
    marker = metafunc.definition.get_closest_marker("native")
    if "native_isa" in metafunc.fixturenames and marker is not None and not marker.kwargs.get("once"):
        from ernie45 import kernels

        metafunc.parametrize("native_isa", kernels.ISAS, indirect=True)


@pytest.fixture(autouse=True)
def native_isa(request: pytest.FixtureRequest):  # noqa: ANN201 - a generator fixture
    """The kernel build a native test runs on, active (``kernels.use_isa``) for the test; None for other tests.
    Tests with ``pytest.mark.native(isa)`` on one parameter get that build."""
    from tests import native

    isa = getattr(request, "param", None) or native.item_isa(request.node)
    if isa is None or native.state(isa)[0] != "built":
        yield isa  # a build this machine lacks: skipped in setup, or failed with the reason in pytest_runtest_call
        return
    from ernie45 import kernels

    with kernels.use_isa(isa):
        yield isa


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``native`` need the C kernels: skipped before their fixtures where this machine cannot run them."""
    if item.get_closest_marker("native") is not None:
        from tests import native

        native.skip_unless_possible(native.item_isa(item))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """...and a failure (not a skip) where it could build them and they are unavailable."""
    if item.get_closest_marker("native") is not None:
        from tests import native

        native.require(native.item_isa(item))


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    """The same line at the end too: `pytest -q` (scripts/test.sh) hides the header."""
    from tests import native

    terminalreporter.write_line(native.report_line())
