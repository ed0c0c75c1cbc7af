"""The device catalogue the planner fits a model into: common datacenter and consumer GPUs, and the CPU
RAM of the machine the planner runs on.

Capacities are what the driver reports as total memory (``nvidia-smi --query-gpu=memory.total``), not
the marketing figure: an "80 GB" H100 SXM reports 81559 MiB, an RTX 4090 24564 MiB. A serving engine
then claims only a fraction of it (vLLM's and FastDeploy's ``gpu_memory_utilization`` default 0.9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ernie45.utils import meminfo_bytes

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_UTILIZATION = 0.9
"""Fraction of a GPU's memory the model may use (vLLM / FastDeploy default gpu_memory_utilization)."""


@dataclass(frozen=True)
class Device:
    """One kind of accelerator (or the host's RAM) the planner can place a model on."""

    key: str
    name: str
    memory_bytes: int
    """Total memory the driver reports."""
    kind: str = "gpu"
    """gpu | cpu; a cpu entry is this machine's RAM, so at most one of it."""
    max_count: int = 512
    """Largest count the planner tries (1 for the host's RAM)."""


CATALOGUE: tuple[Device, ...] = (
    Device("h200", "NVIDIA H200 141 GB", 143771 * MiB),
    Device("h20-141", "NVIDIA H20 141 GB", 143771 * MiB),
    Device("h20", "NVIDIA H20 96 GB", 97871 * MiB),
    Device("h100", "NVIDIA H100 80 GB", 81559 * MiB),
    Device("a100-80", "NVIDIA A100 80 GB", 81920 * MiB),
    Device("l40s", "NVIDIA L40S 48 GB", 46068 * MiB),
    Device("a100-40", "NVIDIA A100 40 GB", 40960 * MiB),
    Device("rtx4090", "NVIDIA RTX 4090 24 GB", 24564 * MiB),
)


def host_memory_bytes() -> int:
    """MemTotal of this machine (Linux /proc/meminfo; sysconf elsewhere)."""
    total = meminfo_bytes("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_device() -> Device:
    """This machine's RAM as a device with room for one model copy."""
    return Device("cpu", f"CPU RAM of this machine ({host_memory_bytes() / GiB:.1f} GiB)", host_memory_bytes(),
                  kind="cpu", max_count=1)


def catalogue(include_host: bool = True) -> list[Device]:
    """The built-in GPUs, plus this machine's RAM."""
    return [*CATALOGUE, host_device()] if include_host else list(CATALOGUE)


def find_device(key: str) -> Device:
    """A catalogue entry by key (``h100``) or a custom size (``80GiB``, ``24GB``)."""
    for d in catalogue():
        if d.key == key.lower():
            return d
    low = key.lower().replace(" ", "")
    for suffix, unit in (("gib", GiB), ("gb", 10**9)):
        if low.endswith(suffix):
            try:
                size = float(low[: -len(suffix)])
            except ValueError:
                break
            if size > 0:
                return Device(low, f"GPU with {key}", int(size * unit))
    keys = [d.key for d in catalogue()]
    raise ValueError(f"device {key!r} is not in the catalogue {keys}; or give a size such as 80GiB or 24GB")
