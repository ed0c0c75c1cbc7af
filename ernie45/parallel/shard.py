"""Which part of a global weight a rank holds: one description shared by the module swaps
(slice a loaded model) and by sharded loading (read only those bytes from the safetensors file).

A rank's tensor is a box of the global tensor: a [start, stop) range on each dim. The one exception is
the stacked expert ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows): tensor parallelism takes the
same row range from each half, so that dim is marked ``halves`` and the range is relative to a half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SPECS_ATTR = "shard_specs"
"""Modules swapped by ``parallel/`` keep {local parameter name: ShardSpec} under this attribute."""


@dataclass(frozen=True)
class ShardSpec:
    """The box of a global tensor of shape ``global_shape`` held locally."""

    global_shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    halves_dim: int | None = None

    @classmethod
    def split(cls, shape: tuple[int, ...], dim: int, rank: int, parts: int, halves: bool = False) -> ShardSpec:
        """Even split of ``dim`` into ``parts``; with ``halves`` each half of the dim is split alike."""
        size = shape[dim] // 2 if halves else shape[dim]
        assert size % parts == 0, (shape, dim, parts)
        step = size // parts
        ranges = [(0, s) for s in shape]
        ranges[dim] = (rank * step, (rank + 1) * step)
        return cls(tuple(shape), tuple(ranges), dim if halves else None)

    def then(self, dim: int, rank: int, parts: int, halves: bool = False) -> ShardSpec:
        """Split a further (so far unsplit) dim of this box, e.g. experts by ep then widths by tp."""
        other = ShardSpec.split(self.global_shape, dim, rank, parts, halves)
        ranges = list(self.ranges)
        ranges[dim] = other.ranges[dim]
        return ShardSpec(self.global_shape, tuple(ranges), dim if halves else self.halves_dim)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple((b - a) * (2 if d == self.halves_dim else 1) for d, (a, b) in enumerate(self.ranges))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The local box of a full tensor (contiguous copy; works on meta tensors too)."""
        assert tuple(full.shape) == self.global_shape, (tuple(full.shape), self.global_shape)
        out = full
        for d, (a, b) in enumerate(self.ranges):
            if d == self.halves_dim:
                half = self.global_shape[d] // 2
                out = torch.cat([out.narrow(d, a, b - a), out.narrow(d, half + a, b - a)], dim=d)
            elif (a, b) != (0, self.global_shape[d]):
                out = out.narrow(d, a, b - a)
        return out.contiguous()


def shard_param(module: nn.Module, name: str, spec: ShardSpec) -> None:
    """Replace ``module.<name>`` by its local box and record the spec (for loading and saving)."""
    old = getattr(module, name)
    with torch.no_grad():
        local = spec.take(old.detach())
    setattr(module, name, nn.Parameter(local, requires_grad=old.requires_grad))
    specs = getattr(module, SPECS_ATTR, None)
    if specs is None:
        specs = {}
        setattr(module, SPECS_ATTR, specs)
    specs[name] = spec


def collect_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """{full parameter name: ShardSpec} over the model; parameters absent are replicated."""
    out: dict[str, ShardSpec] = {}
    for prefix, m in model.named_modules():
        for name, spec in (getattr(m, SPECS_ATTR, None) or {}).items():
            out[f"{prefix}.{name}" if prefix else name] = spec
    return out
