"""The CPU backend's measured choice between the native kernels and torch, per kernel family and bucket of rows: the
bucket lookup, the measuring rules, the per-machine cache, every family's switch in the modules, `info --backend`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from ernie45 import ErnieForCausalLM, ModelConfig, init_weights, kernels
from ernie45.accel import accelerate
from ernie45.accel.cpu import choice
from ernie45.accel.cpu.modules import NativeExperts, NativeLinear, NativeRMSNorm
from ernie45.accel.cpu.quant import NativeQuantExperts, NativeQuantLinear
from ernie45.model.layers import RMSNorm
from ernie45.model.moe import Experts
from ernie45.quant import QuantExperts, QuantLinear, quantize_model
from ernie45.quant.scheme import BASE

needs_kernels = pytest.mark.native


def test_bucket_of_each_row_count() -> None:
    table = {f: tuple(i == 2 for i in range(len(choice.BUCKETS))) for f in choice.FAMILIES}  # only bucket "4"
    with choice.using(table):
        assert [choice.native("qlinear4", r) for r in (0, 1, 2, 3, 4, 5)] == [False, False, False, True, True, False]
    table = {f: tuple(i == len(choice.BUCKETS) - 1 for i in range(len(choice.BUCKETS))) for f in choice.FAMILIES}
    with choice.using(table):  # above the last bucket: the last bucket's verdict
        assert choice.native("small", 512) and choice.native("small", 5000) and not choice.native("small", 256)
    assert choice.current() is choice.DEFAULTS  # restored
    assert choice.qfamily(8) == "qlinear8" and {choice.qfamily(b) for b in (2, 4, 6)} == {"qlinear4"}


class _Clock:
    """A fake ``time`` for ``choice``: a "kernel" advances it by its cost, so the measuring rules see exact times
    whatever else runs on the machine (real sleeps overshoot under load and flip a close verdict)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(choice, "time", c)
    return c


def _costs(clock: _Clock, ms: float):  # noqa: ANN202
    def run() -> None:
        clock.now += ms / 1000
    return run


def test_measure_rules_pick_the_faster_side_and_skip_what_they_can_infer(clock: _Clock) -> None:
    """native costs r ms at r rows, torch 6 ms: native wins up to 4 rows, torch from 8; the factor 6 at one row lets
    2 and 4 be inferred (native at most doubles a bucket), and after two losses the rest goes to torch unmeasured."""
    calls: list[tuple[str, int]] = []

    def nat(r: int):  # noqa: ANN202
        calls.append(("native", r))
        return _costs(clock, r)

    def ref(r: int):  # noqa: ANN202
        calls.append(("torch", r))
        return _costs(clock, 6)

    flags, seen = choice._measure(nat, ref, (1, 2, 4, 8, 16, 32, 64), reps=3)
    assert flags == [True, True, True, False, False, False, False]
    assert [t["rows"] for t in seen] == [1, 8, 16]
    assert {r for _, r in calls} == {1, 8, 16}
    assert seen[0]["torch_us"] > 4 * seen[0]["native_us"]


def test_an_isolated_verdict_is_measured_again(clock: _Clock) -> None:
    """A stall at one bucket (torch 'wins' once by a fluke) is outvoted by two more measurements."""
    count = {"n": 0}

    def nat(r: int):  # noqa: ANN202
        if r == 2:
            count["n"] += 1
            return _costs(clock, 20 if count["n"] == 1 else 1)  # the first measurement at 2 rows stalls
        return _costs(clock, 1)

    flags, _ = choice._measure(nat, lambda r: _costs(clock, 1.6), (1, 2, 4), reps=1)
    assert flags == [True, True, True] and count["n"] == 3


@needs_kernels
def test_calibrate_measures_the_real_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERNIE45_ISA", raising=False)
    try:
        c = choice.calibrate(reps=2, families=("small", "blinear"))
        runs = [i for i in kernels.ISAS if not kernels.isa_why_not(i)]
        if len(runs) > 1:  # several builds run here: the measured faster one is active
            assert set(c.isa_us) == set(runs) and c.isa == min(c.isa_us, key=c.isa_us.get) == kernels.active_isa()
    finally:
        kernels.set_isa(None)
    assert c.source == "measured" and set(c.timings) == {"small", "blinear"}
    for fam in ("small", "blinear"):
        assert c.timings[fam][0]["rows"] == 1
        assert all(t["native_us"] > 0 and t["torch_us"] > 0 for t in c.timings[fam])
        assert len(c.native[fam]) == len(choice.BUCKETS)
    assert c.native["qlinear4"] == choice.DEFAULTS.native["qlinear4"]  # not measured: the defaults
    assert any("blinear" in line and ":" in line for line in c.table())
    assert not c.isa_us or any(line.strip().startswith("isa") for line in c.table())


@needs_kernels
def test_the_table_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERNIE45_CACHE", str(tmp_path))
    made = []
    fake = {f: tuple(b <= 4 for b in choice.BUCKETS) for f in choice.FAMILIES}

    def calibrate() -> choice.Choice:
        made.append(1)
        return choice.Choice(dict(fake), "measured", {"small": [{"rows": 1, "native_us": 1.0, "torch_us": 2.0}]})

    monkeypatch.setattr(choice, "calibrate", calibrate)
    old = choice.current()
    try:
        got = choice.ensure("auto")
        assert made == [1] and got.native == fake and not choice.native("qexperts", 5)
        files = list((tmp_path / "calibration").glob("cpu-*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text())["native"]["small"] == list(fake["small"])
        choice.set_choice(choice.DEFAULTS)  # a new process: read, not measured
        got = choice.ensure("auto")
        assert made == [1] and got.source == "cache" and got.timings["small"][0]["torch_us"] == 2.0
        choice.ensure("measure")
        assert made == [1, 1]
        files[0].write_text("{not json")  # a damaged file is measured again, never an error
        choice.set_choice(choice.DEFAULTS)
        choice.ensure("auto")
        assert made == [1, 1, 1]
        monkeypatch.setattr(torch, "__version__", "0.0.0-other")  # another torch: another file, measured again
        choice.set_choice(choice.DEFAULTS)
        choice.ensure("auto")
        assert made == [1, 1, 1, 1] and len(list((tmp_path / "calibration").glob("cpu-*.json"))) == 2
        assert choice.ensure("defaults") is choice.DEFAULTS
        with pytest.raises(ValueError, match="ERNIE45_CALIBRATION='fast'"):
            choice.ensure("fast")
    finally:
        choice.set_choice(old)


def _count(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    calls: list = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@needs_kernels
@pytest.mark.parametrize("rows", [1, 40])
def test_each_family_follows_the_table(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family's module runs its kernel where the table says native and the reference where it says torch, at
    decode and at prefill row counts alike, with the same result up to the kernels' rounding."""
    torch.manual_seed(0)
    blin = NativeLinear(256, 128, bias=False).bfloat16()
    nn.init.normal_(blin.weight, std=0.05)
    qlin = NativeQuantLinear.from_linear(nn.Linear(256, 128, bias=False).bfloat16(), BASE[4])
    qlin8 = NativeQuantLinear.from_linear(nn.Linear(256, 128, bias=False).bfloat16(), BASE[8])
    norm = NativeRMSNorm(256).bfloat16()
    bex = Experts(4, 256, 128)
    nn.init.normal_(bex.gate_up_proj, std=0.05)
    nn.init.normal_(bex.down_proj, std=0.05)
    qex = QuantExperts.from_experts(bex, BASE[4], torch.bfloat16)
    qex.__class__ = NativeQuantExperts
    bex = bex.bfloat16()
    bex.__class__ = NativeExperts
    x = torch.randn(rows, 256).bfloat16()
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(rows)])
    w = torch.full((rows, 2), 0.5).bfloat16()
    counts = {n: _count(monkeypatch, n) for n in ("linear", "qgemm_ptrs", "fused_linears", "qmoe", "bmoe", "rms_norm")}
    cases = {  # family: (the call, the kernel it uses natively, the reference)
        "blinear": (lambda: blin(x), "linear", lambda: torch.nn.functional.linear(x, blin.weight)),
        "qlinear4": (lambda: qlin(x), "qgemm_ptrs", lambda: QuantLinear.forward(qlin, x)),
        "qlinear8": (lambda: qlin8(x), "qgemm_ptrs", lambda: QuantLinear.forward(qlin8, x)),
        "small": (lambda: norm(x), "rms_norm", lambda: RMSNorm.forward(norm, x)),
        "bexperts": (lambda: bex(x, idx, w), "bmoe", lambda: Experts.forward(bex, x, idx, w)),
        "qexperts": (lambda: qex(x, idx, w), "qmoe", lambda: QuantExperts.forward(qex, x, idx, w)),
    }
    with torch.no_grad():
        for fam, (call, kernel, ref) in cases.items():
            for flag in (True, False):
                table = choice.everywhere(False)
                table[fam] = (flag,) * len(choice.BUCKETS)
                with choice.using(table):
                    before = len(counts[kernel])
                    y = call()
                    used = len(counts[kernel]) > before
                    expect = ref()
                assert used == flag, (fam, flag, rows)
                if not flag:
                    assert torch.equal(y, expect), fam  # torch's side is the reference itself
                else:
                    torch.testing.assert_close(y.float(), expect.float(), rtol=5e-2, atol=5e-2 * expect.abs().max())


@needs_kernels
def test_a_model_with_torch_everywhere_is_the_reference_bit_for_bit() -> None:
    cfg = ModelConfig.from_name("tiny-moe").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                                    head_dim=64)
    ref = quantize_model(init_weights(ErnieForCausalLM(cfg), std=0.05, seed=0).bfloat16().eval(), "int4")
    ids = torch.tensor([[5, 17, 99, 3, 8]])
    with torch.no_grad():
        want = ref(ids).logits
        model = accelerate(ref, "cpu")
        with choice.using(choice.everywhere(False)):
            got = model(ids[:, :1]).logits, model(ids).logits
        native_ = model(ids[:, :1]).logits  # the defaults: native at one row
    assert torch.equal(got[1], want)
    assert torch.equal(got[0], want[:, :1]) and not torch.equal(native_, got[0])


def test_info_backend_names_the_cpu_features_and_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "ernie45.cli", "info", "--backend", "--json"], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "ERNIE45_CALIBRATION": "defaults"})
    info = json.loads(out.stdout)
    assert set(info["backends"]) >= {"torch", "cpu"} and info["features"].keys() >= {"avx2", "avx512_bf16", "amx_bf16"}
    # the torch side of the choice names oneDNN's implementation (AMX on an AMX CPU: tests/accel/test_onednn.py)
    want = "amx" if info["features"]["amx_bf16"] else "avx512_core_bf16" if info["features"]["avx512_bf16"] else "not"
    assert want in info["onednn_bf16_matmul"], info["onednn_bf16_matmul"]
    if kernels.available():
        assert info["choice"]["source"] == "defaults"
        assert info["choice"]["native_rows"]["qlinear4"] == [1, 2, 4, 8, 16]
    bad = subprocess.run([sys.executable, "-m", "ernie45.cli", "info"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--backend" in bad.stderr
