"""``ernie45 plan --plot out.png``: per-GPU memory against context length, one line per weight format,
with the catalogue's GPU sizes drawn across (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from ernie45.config import ModelConfig
from ernie45.tools.hardware import CATALOGUE, DEFAULT_UTILIZATION, GiB
from ernie45.tools.plan import PlanRequest, load_config, plan_memory
from ernie45.utils import atomic_path

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("bf16", "fp8", "wint8", "wint4", "wint2")


def context_points(max_context: int, start: int = 1024) -> list[int]:
    """Powers of two from ``start`` up to ``max_context`` (which is always included)."""
    points, c = [], min(start, max_context)
    while c < max_context:
        points.append(c)
        c *= 2
    return [*points, max_context]


def memory_curves(model: str | os.PathLike | ModelConfig, request: PlanRequest,
                  formats: tuple[str, ...] = DEFAULT_FORMATS, max_context: int | None = None
                  ) -> dict[str, list[tuple[int, int]]]:
    """{format: [(context, per-GPU total bytes), ...]} for the request's batch and layout."""
    config = load_config(model)
    points = context_points(max_context or config.max_position_embeddings)
    curves: dict[str, list[tuple[int, int]]] = {}
    for fmt in formats:
        base = {**asdict(request), "weights": fmt}
        curves[fmt] = [(c, plan_memory(config, PlanRequest(**{**base, "context": c}), devices=[]).total_bytes)
                       for c in points]
    return curves


def plot_memory(model: str | os.PathLike | ModelConfig, path: str | os.PathLike, request: PlanRequest | None = None,
                formats: tuple[str, ...] = DEFAULT_FORMATS, max_context: int | None = None,
                utilization: float = DEFAULT_UTILIZATION) -> dict[str, list[tuple[int, int]]]:
    """Write a PNG of per-GPU memory vs context length per format; returns the plotted curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    request = request or PlanRequest()
    curves = memory_curves(model, request, formats, max_context)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for fmt, pts in curves.items():
        ax.plot([c for c, _ in pts], [b / GiB for _, b in pts], marker="o", markersize=3, label=fmt)
    top = max(b for pts in curves.values() for _, b in pts) / GiB
    x0 = min(c for pts in curves.values() for c, _ in pts)
    lines: dict[int, list[str]] = {}  # GPUs within a GiB of each other share one line and label
    for dev in CATALOGUE:
        lines.setdefault(round(dev.memory_bytes * utilization / GiB), []).append(dev.name.removeprefix("NVIDIA "))
    for usable, names in sorted(lines.items()):
        if usable <= top * 1.2:
            ax.axhline(usable, color="grey", linewidth=0.6, linestyle="--")
            ax.text(x0, usable, f" {' / '.join(names)} (x{utilization:g})", fontsize=7, va="bottom", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("memory per GPU (GiB)")
    name = model if isinstance(model, str) else "model"
    ax.set_title(f"{name}: batch {request.batch}, tp={request.tp} ep={request.ep} pp={request.pp}, "
                 f"{request.mode}", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(title="weights", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    log.info("wrote %s", path)
    return curves
