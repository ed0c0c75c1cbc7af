"""`ernie45 plan`: JSON for machines, a table for people, a PNG plot, readable errors."""

from __future__ import annotations

import json

import pytest

from ernie45.cli import main
from ernie45.tools.plan import PlanRequest
from ernie45.tools.plot import context_points, memory_curves


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_has_the_per_gpu_keys_and_fits(capsys):
    rc, out, _ = run(capsys, "ernie-4.5-300b-a47b", "--weights", "int4", "--context", "131072", "--batch", "1",
                     "--json")
    assert rc == 0
    plan = json.loads(out)
    for key in ("weights_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes"):
        assert isinstance(plan[key], int) and plan[key] > 0
    assert plan["kv_cache_bytes"] == 221_184 * 131072
    assert plan["total_bytes"] == sum(plan[k] for k in ("weights_bytes", "kv_cache_bytes", "activation_bytes",
                                                        "gradient_bytes", "optimizer_bytes", "overhead_bytes"))
    fits = {f["device"]: f for f in plan["fits"]}
    assert {"h200", "h100", "h20", "h20-141", "a100-80", "a100-40", "l40s", "rtx4090", "cpu"} <= set(fits)
    assert fits["h100"]["min_gpus"] == 4 and fits["h100"]["layout"] == {"tp": 4, "ep": 1, "pp": 1}


def test_table_for_people(capsys):
    rc, out, _ = run(capsys, "ernie-4.5-21b-a3b", "--weights", "wint4", "--context", "32768", "--tp", "2")
    assert rc == 0
    assert "KV 57,344 B/token" in out and "tp=2" in out
    for word in ("weights", "KV cache", "activations", "overhead", "total", "NVIDIA H100 80 GB", "CPU RAM"):
        assert word in out


def test_training_table_and_custom_device(capsys):
    rc, out, _ = run(capsys, "ernie-4.5-0.3b", "--mode", "lora", "--weights", "int4", "--device", "24GB",
                     "--device", "h100", "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["trainable_params"] > 0 and plan["optimizer_bytes"] > 0
    assert [f["device"] for f in plan["fits"]] == ["24gb", "h100"]


def test_plot_writes_a_png(capsys, tmp_path, artifacts_dir):
    out_png = tmp_path / "plan.png"
    rc, out, _ = run(capsys, "ernie-4.5-300b-a47b", "--tp", "8", "--plot", str(out_png),
                     "--plot-formats", "bf16,wint4,wint2")
    assert rc == 0 and str(out_png) in out
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (tmp_path / "plan.png").replace(f"{artifacts_dir}/plan-300b-tp8.png")


def test_curves_rise_with_context_and_fall_with_bits():
    curves = memory_curves("ernie-4.5-21b-a3b", PlanRequest(), formats=("bf16", "wint4"), max_context=131072)
    assert [c for c, _ in curves["bf16"]] == context_points(131072) == [2**i for i in range(10, 18)]
    for pts in curves.values():
        assert all(a[1] < b[1] for a, b in zip(pts, pts[1:]))
    assert all(b[1] < a[1] for a, b in zip(curves["bf16"], curves["wint4"]))


@pytest.mark.parametrize("argv,word", [(["nope"], "not 'demo' or a preset"),
                                       (["ernie-4.5-300b-a47b", "--tp", "3"], "tp=3"),
                                       (["ernie-4.5-300b-a47b", "--weights", "int5"], "int5"),
                                       (["ernie-4.5-300b-a47b", "--device", "b200"], "catalogue")])
def test_errors_are_one_line(capsys, argv, word):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and word in err and "Traceback" not in err


def test_checkpoint_folder_is_read(capsys, tmp_path):
    from ernie45 import ModelConfig

    ModelConfig.from_name("tiny-moe").save_json(tmp_path)
    rc, out, _ = run(capsys, str(tmp_path), "--json", "--context", "1024")
    plan = json.loads(out)
    assert rc == 0 and plan["params"] == ModelConfig.from_name("tiny-moe").num_params()


def test_each_device_gets_its_own_overhead(capsys):
    rc, out, _ = run(capsys, "ernie-4.5-0.3b", "--cpu", "--device", "h100", "--device", "cpu", "--json")
    plan = json.loads(out)
    fits = {f["device"]: f for f in plan["fits"]}
    assert rc == 0 and plan["overhead_bytes"] == 272 * 2**20  # the requested plan: a CPU process
    # the same model on a GPU carries the CUDA context instead (768 MiB)
    assert fits["h100"]["per_gpu_total_bytes"] - fits["cpu"]["per_gpu_total_bytes"] == (768 - 272) * 2**20
