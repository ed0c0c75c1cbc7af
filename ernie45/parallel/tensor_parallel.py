"""Tensor parallelism (Megatron-LM layout), applied to a built model by swapping modules.

- Attention: q heads split over the tp ranks; kv heads split too when tp divides them, otherwise
  (fewer kv heads than ranks) each rank keeps the one kv head its query heads read, replicated on
  tp / kv_heads ranks (vLLM does the same). ``o_proj`` is row-parallel: one all-reduce per layer.
- Dense SwiGLU MLPs (dense layers, shared experts, the MTP block): gate/up column-parallel, down
  row-parallel, one all-reduce.
- Embedding and LM head: **vocab-parallel** when tp divides vocab_size (every released checkpoint:
  103424 = 2^9 x 202): each rank holds V/tp rows of both (tied heads stay tied), the embedding masks
  foreign ids and all-reduces, the head all-gathers its logit columns. Otherwise both stay replicated.
- Norms, rotary tables and the router stay replicated; routed experts are handled by
  ``expert_parallel.py``.

Shape suffixes: T tokens, H hidden, V vocab, Vl local vocab.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ernie45.config import ModelConfig
from ernie45.model.attention import Attention
from ernie45.model.layers import Linear, SwiGLU
from ernie45.model.model import ErnieForCausalLM
from ernie45.parallel import comm
from ernie45.parallel.shard import ShardSpec, shard_param


def local_kv_heads(config: ModelConfig, tp: int) -> int:
    """KV heads each rank holds: kv / tp when tp divides them, else one (replicated)."""
    kv = config.num_key_value_heads
    return kv // tp if kv % tp == 0 else 1


def vocab_is_split(config: ModelConfig, tp: int) -> bool:
    return tp > 1 and config.vocab_size % tp == 0


class RowParallelLinear(Linear):
    """Input features split over the group: local matmul, all-reduce of the partial sums, then the
    (replicated) bias once. ``local_linear`` is the matmul between the communications, which an acceleration
    backend overrides (``ernie45.accel.swap``)."""

    group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = comm.all_reduce(self.local_linear(x, self.weight, None), self.group)
        return y if self.bias is None else y + self.bias

    def local_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class TPAttention(Attention):
    """Attention over this rank's heads. The forward is the base class's: it reshapes with the local
    head counts, and a cache's ``attend`` receives only local heads (size the KV cache with
    ``local_kv_heads``)."""

    tp_group: dist.ProcessGroup


class VocabParallelEmbedding(nn.Embedding):
    """Rows [lo, lo + Vl) of the table; ids owned by other ranks give zeros, summed by an all-reduce."""

    group: dist.ProcessGroup
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        local = ids - self.vocab_start
        owned = (local >= 0) & (local < n)
        out = F.embedding(local.clamp(0, n - 1), self.weight) * owned[..., None].to(self.weight.dtype)
        return comm.all_reduce(out, self.group)


class VocabParallelHead(Linear):
    """Logit columns [lo, lo + Vl) computed locally (``local_linear``, as ``RowParallelLinear``'s), gathered to the
    full vocabulary."""

    group: dist.ProcessGroup

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return comm.all_gather_last(self.local_linear(x_TH, self.weight, self.bias), self.group)  # [T, V]

    def local_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def _swap(module: nn.Module, cls: type, **attrs) -> None:
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)


def _split_linear_out(lin: nn.Linear, rank: int, parts: int) -> None:
    """Column-parallel: keep output rows [rank * out/parts, ...)."""
    shard_param(lin, "weight", ShardSpec.split(tuple(lin.weight.shape), 0, rank, parts))
    if lin.bias is not None:
        shard_param(lin, "bias", ShardSpec.split(tuple(lin.bias.shape), 0, rank, parts))
    lin.out_features = lin.weight.shape[0]


def _rows_linear(lin: nn.Linear, start: int, stop: int) -> None:
    """Keep output rows [start, stop) (a replicated kv head)."""
    shape = tuple(lin.weight.shape)
    ranges = ((start, stop), (0, shape[1]))
    shard_param(lin, "weight", ShardSpec(shape, ranges))
    if lin.bias is not None:
        shard_param(lin, "bias", ShardSpec(tuple(lin.bias.shape), ((start, stop),)))
    lin.out_features = stop - start


def _split_linear_in(lin: nn.Linear, rank: int, parts: int, group: dist.ProcessGroup) -> None:
    """Row-parallel: keep input columns [rank * in/parts, ...); the bias stays whole."""
    shard_param(lin, "weight", ShardSpec.split(tuple(lin.weight.shape), 1, rank, parts))
    lin.in_features = lin.weight.shape[1]
    _swap(lin, RowParallelLinear, group=group)


def parallelize_attention(attn: Attention, rank: int, tp: int, group: dist.ProcessGroup) -> None:
    """Split ``attn`` in place for tp rank ``rank``."""
    n, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    _split_linear_out(attn.q_proj, rank, tp)
    if kv % tp == 0:
        _split_linear_out(attn.k_proj, rank, tp)
        _split_linear_out(attn.v_proj, rank, tp)
    else:
        head = rank // (tp // kv)  # the kv head of this rank's query heads (GQA group = n / kv heads)
        _rows_linear(attn.k_proj, head * d, (head + 1) * d)
        _rows_linear(attn.v_proj, head * d, (head + 1) * d)
    _split_linear_in(attn.o_proj, rank, tp, group)
    _swap(attn, TPAttention, num_heads=n // tp, num_kv_heads=kv // tp if kv % tp == 0 else 1, tp_group=group)


def parallelize_swiglu(mlp: SwiGLU, rank: int, tp: int, group: dist.ProcessGroup) -> None:
    _split_linear_out(mlp.gate_proj, rank, tp)
    _split_linear_out(mlp.up_proj, rank, tp)
    _split_linear_in(mlp.down_proj, rank, tp, group)


def parallelize_vocab(model: ErnieForCausalLM, rank: int, tp: int, group: dist.ProcessGroup) -> None:
    emb, head = model.model.embed_tokens, model.lm_head
    vl = model.config.vocab_size // tp
    tied = head.weight is emb.weight
    shard_param(emb, "weight", ShardSpec.split(tuple(emb.weight.shape), 0, rank, tp))
    emb.num_embeddings = vl
    _swap(emb, VocabParallelEmbedding, group=group, vocab_start=rank * vl)
    if tied:
        head.weight = emb.weight
    else:
        shard_param(head, "weight", ShardSpec.split(tuple(head.weight.shape), 0, rank, tp))
    if head.bias is not None:
        shard_param(head, "bias", ShardSpec.split(tuple(head.bias.shape), 0, rank, tp))
    head.out_features = vl
    _swap(head, VocabParallelHead, group=group)


def apply_tp(model: ErnieForCausalLM, rank: int, tp: int, group: dist.ProcessGroup) -> ErnieForCausalLM:
    """Tensor-parallel ``model`` in place: attention, dense MLPs, shared experts, vocabulary.

    Works on a loaded model (each rank keeps its slice of the full weights) and on a meta-device build
    (``sharded_load`` then reads only the slices). Routed experts are left to ``apply_ep``.
    """
    if tp == 1:
        return model
    m = model.model
    blocks = list(m.layers) + (list(m.mtp_block) if model.has_mtp else [])
    for layer in blocks:
        parallelize_attention(layer.self_attn, rank, tp, group)
        if layer.is_moe:
            if layer.mlp.shared_experts is not None:
                parallelize_swiglu(layer.mlp.shared_experts, rank, tp, group)
        else:
            parallelize_swiglu(layer.mlp, rank, tp, group)
    if vocab_is_split(model.config, tp):
        parallelize_vocab(model, rank, tp, group)
    return model
