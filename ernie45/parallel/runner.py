"""The engine on several ranks: rank 0 schedules and samples, every rank runs the same forward.

Rank 0 runs ``LLMEngine(model, runner=DistributedModelRunner)``: each step it broadcasts the step's token
ids, positions, sampled rows and the per-sequence query/context lengths and block tables (int64
tensors over torch.distributed; no pickling, no RPC). The other ranks sit in ``worker_loop``: they
rebuild the same ``AttentionMetadata`` and run the same forward on their shard (their KV cache holds
only their kv heads). Block ids mean the same on every rank because every rank's cache has the
``num_blocks`` rank 0 chose, sent once at start.

Message layout: header int64 [kind, T, S, R, B] then one int64 payload of
ids[T] | positions[T] | rows[R] | query_lens[S] | context_lens[S] | table_lens[S] | tables[B].
"""

from __future__ import annotations

import atexit
import logging

import torch
import torch.distributed as dist

from ernie45.accel import AttentionMetadata, PagedAttention, accelerate, backend_of
from ernie45.config import ModelConfig
from ernie45.engine.kv_cache import KVCache
from ernie45.engine.model_runner import ModelRunner
from ernie45.engine.scheduler import ScheduledSeq
from ernie45.engine.sequence import Sequence
from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel.tensor_parallel import local_kv_heads

log = logging.getLogger(__name__)

STOP, STEP, INIT = 0, 1, 2
HEADER = 5


def local_attention_config(model: ErnieForCausalLM) -> ModelConfig:
    """The config a rank's KV cache is sized with: its own heads only."""
    mesh = getattr(model, "parallel_mesh", None)
    if mesh is None or mesh.tp == 1:
        return model.config
    cfg = model.config
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // mesh.tp,
                       num_key_value_heads=local_kv_heads(cfg, mesh.tp))


def _device(model: ErnieForCausalLM) -> torch.device:
    return next(model.parameters()).device


def _broadcast(header: list[int] | None, payload: torch.Tensor | None, device: torch.device
               ) -> tuple[list[int], torch.Tensor]:
    """Rank 0 sends (header, payload); the others receive them."""
    h = torch.tensor(header if header is not None else [0] * HEADER, dtype=torch.long, device=device)
    dist.broadcast(h, src=0)
    kind, t, s, r, b = h.tolist()
    n = 2 * t + r + 3 * s + b
    if payload is None:
        payload = torch.empty(n, dtype=torch.long, device=device)
    if n:
        dist.broadcast(payload, src=0)
    return [kind, t, s, r, b], payload


class DistributedModelRunner(ModelRunner):
    """``ModelRunner`` for rank 0 of a parallel model: broadcasts each step before running it.
    ``LLMEngine(model, runner=DistributedModelRunner)`` on rank 0, ``worker_loop(model)`` on the others."""

    @classmethod
    def cache_config(cls, model: ErnieForCausalLM) -> ModelConfig:
        return local_attention_config(model)

    def __init__(self, model: ErnieForCausalLM, kv_cache: KVCache, attention: PagedAttention | None = None) -> None:
        super().__init__(model, kv_cache, attention)
        if dist.get_rank() != 0:
            raise RuntimeError("only rank 0 runs the engine; the other ranks run ernie45.parallel.runner.worker_loop")
        self._send_init()
        self._stopped = False
        # A server that exits (Ctrl-C, an error) must release the workers or torchrun waits forever.
        atexit.register(self.shutdown)

    def _send_init(self) -> None:
        h = torch.tensor([INIT, 0, 0, 0, self.kv.num_blocks], dtype=torch.long, device=self.device)
        dist.broadcast(h, src=0)
        blk = torch.tensor([self.kv.block_size], dtype=torch.long, device=self.device)
        dist.broadcast(blk, src=0)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> tuple[list[Sequence], torch.Tensor | None]:
        input_ids, pos, meta, rows, sample_seqs = self.prepare(scheduled)
        order = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)  # prepare()'s order: decodes first
        tables = [list(s.seq.block_table) for s in order]
        assert meta.query_lens == [s.num_new_tokens for s in order], "prepare() changed its sequence order"
        flat = [b for t in tables for b in t]
        payload = torch.cat([
            input_ids[0], pos,
            torch.tensor(rows + meta.query_lens + meta.context_lens + [len(t) for t in tables] + flat,
                         dtype=torch.long, device=self.device)])
        _broadcast([STEP, input_ids.shape[1], len(order), len(rows), len(flat)], payload, self.device)
        return sample_seqs, _forward(self.model, self.attention, input_ids, pos, meta, rows)

    def shutdown(self) -> None:
        """Release the workers from ``worker_loop`` when the engine is done (idempotent)."""
        if self._stopped or not dist.is_initialized():
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        _broadcast([STOP, 0, 0, 0, 0], None, self.device)


def _forward(model: ErnieForCausalLM, attention: PagedAttention, input_ids: torch.Tensor, pos: torch.Tensor,
             meta: AttentionMetadata, rows: list[int]) -> torch.Tensor | None:
    out = model(input_ids, position_ids=pos[None], cache=attention.step(meta),
                logits_indices=torch.tensor(rows, dtype=torch.long, device=input_ids.device),
                compute_logits=bool(rows))
    return out.logits.float() if rows else None


@torch.inference_mode()
def worker_loop(model: ErnieForCausalLM, dtype: torch.dtype | None = None, backend: str = "auto") -> int:
    """Run rank 0's steps on this rank until it calls ``shutdown``; returns the number of steps run. The model gets
    ``backend`` (``ernie45.accel.accelerate``) as rank 0's engine gives its own."""
    device = _device(model)
    h = torch.zeros(HEADER, dtype=torch.long, device=device)
    dist.broadcast(h, src=0)
    if h[0].item() != INIT:
        raise RuntimeError(f"worker expected the engine's INIT message, got kind {h[0].item()}")
    blk = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(blk, src=0)
    num_blocks, block_size = int(h[4]), int(blk.item())
    kv = KVCache(local_attention_config(model), num_blocks, block_size,
                 dtype or model.model.embed_tokens.weight.dtype, device)
    attention = backend_of(accelerate(model, backend)).attention(kv)
    steps = 0
    while True:
        (kind, t, s, r, _), p = _broadcast(None, None, device)
        if kind == STOP:
            return steps
        ids, pos = p[:t], p[t:2 * t]
        rest = p[2 * t:].tolist()
        rows, qlens, clens, tlens = rest[:r], rest[r:r + s], rest[r + s:r + 2 * s], rest[r + 2 * s:r + 3 * s]
        flat, tables = rest[r + 3 * s:], []
        for n in tlens:
            tables.append(flat[:n])
            flat = flat[n:]
        meta = AttentionMetadata.build(tables, qlens, clens, block_size, device)
        _forward(model, attention, ids[None], pos, meta, rows)
        steps += 1
