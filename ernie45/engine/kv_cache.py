"""Paged KV cache: per-layer K/V tensors ``[num_blocks, block_size, kv_heads, head_dim]`` sized from a
memory budget. Storage and sizing only: attention over it is the backend's (``ernie45.accel.attention``, chosen
with the accelerator: ``backend_of(model).attention(cache)``), the step's metadata travels with each step.
"""

from __future__ import annotations

import logging
import os

import torch

from ernie45.accel.attention import AttentionMetadata  # noqa: F401 - re-exported for the runners
from ernie45.config import ModelConfig
from ernie45.model.checkpoint import parse_size
from ernie45.utils import advise_huge_pages, meminfo_bytes

log = logging.getLogger(__name__)

DEFAULT_RAM_FRACTION = 0.3
"""Share of MemAvailable (CPU) or of free GPU memory the cache takes when no budget is given."""


def parse_budget(kv_cache_memory: int | str) -> int:
    """``kv_cache_memory`` as bytes: an int, or a size string like "2GB" / "512MiB"."""
    try:
        n = parse_size(kv_cache_memory)
    except (ValueError, TypeError):
        raise ValueError(f"kv_cache_memory={kv_cache_memory!r}: give bytes or a size like '2GB', '512MB'") from None
    if n <= 0:
        raise ValueError(f"kv_cache_memory={kv_cache_memory!r} must be positive")
    return n


def available_memory(device: torch.device) -> int:
    """Free bytes now: MemAvailable from /proc/meminfo on CPU, cudaMemGetInfo on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = meminfo_bytes("MemAvailable")
    return free if free is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_num_blocks(config: ModelConfig, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    """Blocks that fit in ``budget_bytes``, by the same formula the hardware planner uses."""
    per_block = config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size
    return budget_bytes // per_block


class KVCache:
    """The per-layer K/V tensors of the engine's paged cache."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_layers: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget holds {num_blocks} blocks of {block_size} tokens; "
                             f"give a larger kv_cache_memory")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        layers = num_layers if num_layers is not None else config.num_hidden_layers
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        advise_huge_pages(self.k + self.v)  # decode attention streams the cache: 2 MiB pages, before the first write
        for t in self.k + self.v:
            t.zero_()
        log.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                 2 * layers * self.k[0].numel() * self.k[0].element_size() / 2**20)

    @classmethod
    def from_budget(cls, config: ModelConfig, dtype: torch.dtype, block_size: int,
                    kv_cache_memory: int | str | None = None, device: torch.device | str = "cpu",
                    max_tokens: int | None = None) -> KVCache:
        """Size the cache from ``kv_cache_memory`` (bytes or "2GB"), or by default from a fraction of
        free memory, capped at ``max_tokens`` (what the engine can ever use at once)."""
        device = torch.device(device)
        if kv_cache_memory is None:
            budget = int(available_memory(device) * DEFAULT_RAM_FRACTION)
            if max_tokens is not None:
                budget = min(budget, config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
                             * (max_tokens + block_size))
        else:
            budget = parse_budget(kv_cache_memory)
        num_blocks = plan_num_blocks(config, dtype, block_size, budget)
        return cls(config, num_blocks, block_size, dtype, device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size
