"""ERNIE 4.5 decoder (spec §2): embeddings, pre-norm decoder layers (dense or MoE by layer index),
final norm, LM head (tied or not), and the optional MTP draft block (spec §3.4).

Shape suffixes: B batch, T tokens, H hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ernie45.config import ModelConfig
from ernie45.model.attention import Attention, AttentionCache, causal_padding_mask
from ernie45.model.layers import Linear, RMSNorm, RotaryEmbedding, SwiGLU
from ernie45.model.moe import MoE, RouterRecords


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, force_dense: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx) and not force_dense
        self.mlp = MoE(config) if self.is_moe else SwiGLU(
            config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: AttentionCache | None, router_records: RouterRecords | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, router_records) if self.is_moe else self.mlp(x))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """[B, T, V] (or [R, V] when logits_indices picks R rows)."""
    hidden_states: torch.Tensor
    """Final hidden states after the last norm, [B, T, H]."""
    router: list = field(default_factory=list)
    """Per MoE layer (probs_TE fp32, idx_TK) when requested; for auxiliary losses and balancing."""


class ErnieModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        shape = (config.vocab_size, config.hidden_size)
        # A meta build (every loader's) has nothing to initialise, and nn.Embedding's normal_ on meta runs a
        # Python decomposition that imports torch._dynamo and triton: ~1 s and ~130 MB of a loading process.
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape)) if meta else nn.Embedding(*shape)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        if config.num_nextn_predict_layers:
            # Checkpoint layout: model.mtp_*.0.* ; the block is dense (index 0 < moe start).
            self.mtp_emb_norm = nn.ModuleList([RMSNorm(config.hidden_size, config.rms_norm_eps)])
            self.mtp_hidden_norm = nn.ModuleList([RMSNorm(config.hidden_size, config.rms_norm_eps)])
            self.mtp_linear_proj = nn.ModuleList([Linear(2 * config.hidden_size, config.hidden_size, bias=False)])
            # Its own cache slot (layer index L) so the engine can keep MTP keys apart from layer 0's.
            self.mtp_block = nn.ModuleList([DecoderLayer(config, config.num_hidden_layers, force_dense=True)])
        self.gradient_checkpointing = False


class ErnieForCausalLM(nn.Module):
    """The one model definition used by parity tests, the engine and the trainer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ErnieModel(config)
        # transformers' MoE class gives the head a bias when use_bias is set; its dense class does not.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.use_bias and config.is_moe)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def has_mtp(self) -> bool:
        return hasattr(self.model, "mtp_block")

    def _positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is not None:
            return position_ids.expand_as(input_ids) if position_ids.dim() == 1 else position_ids
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        logits_indices: torch.Tensor | None = None,
        return_router: bool = False,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput(logits [B, T, V], hidden_states [B, T, H]).

        attention_mask: [B, T] with 1 for real tokens, 0 for padding (dense path only).
        position_ids: [B, T] or [T]; defaults to 0..T-1 per row, like the reference's forward.
        cache: the engine's paged-KV object; input_ids is then [1, T] holding every scheduled token.
        logits_indices: rows of the flattened [B*T] hidden states to project to logits; the LM head
            over a 103k vocabulary is the biggest matmul of a decode step, so the engine asks for the
            last token of each sequence only. Logits are then [R, V].
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids hold a token id outside [0, {vocab}): min "
                             f"{int(input_ids.min())}, max {int(input_ids.max())}")
        m = self.model
        h = m.embed_tokens(input_ids)
        cos, sin = m.rotary(self._positions(input_ids, position_ids))
        mask = None
        if attention_mask is not None and cache is None and not bool(attention_mask.all()):
            mask = causal_padding_mask(attention_mask, h.dtype)
        router = RouterRecords() if return_router else None  # not a list: see RouterRecords
        for layer in m.layers:
            if m.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, mask, cache, router, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, router)
        h = m.norm(h)
        logits = None
        if compute_logits:
            rows = h if logits_indices is None else h.reshape(-1, h.shape[-1])[logits_indices]
            logits = self.lm_head(rows)
        return ModelOutput(logits=logits, hidden_states=h, router=router.records if router is not None else [])

    def mtp_hidden(
        self,
        hidden_BTH: torch.Tensor,
        next_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MTP block's output after the main model's final norm, [B, T, H]: what the head reads for the draft
        of token t+2, and what a recursive draft feeds back as the next hidden state. Inputs: the main model's
        final hidden state at t (after its last norm, as vLLM feeds it) and the token at t+1 (spec §3.4,
        FastDeploy's order): u = proj(cat[norm_e(E[x_{t+1}]), norm_h(h_t)]) -> MTP decoder layer -> final norm.
        With a cache, the block attends over its own layer slot (index ``num_hidden_layers``). ``mask``: without a
        cache, which keys each query sees ([B or 1, 1, T, T], True = visible; default causal): the trainer's
        recursive MTP loss (``ernie45.train.trainer.mtp_depth_logits``) lays several depths out in one row.
        """
        if not self.has_mtp:
            raise RuntimeError("this model has no MTP block (num_nextn_predict_layers=0 or no mtp tensors)")
        m = self.model
        e = m.mtp_emb_norm[0](m.embed_tokens(next_ids))
        u = m.mtp_linear_proj[0](torch.cat([e, m.mtp_hidden_norm[0](hidden_BTH)], dim=-1))
        cos, sin = m.rotary(self._positions(next_ids, position_ids))
        u = m.mtp_block[0](u, cos, sin, mask, cache, None)
        return m.norm(u)

    def mtp_logits(
        self,
        hidden_BTH: torch.Tensor,
        next_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        """Draft logits for token t+2 from the main model's final hidden state at t and the token at t+1
        (:meth:`mtp_hidden`, then the shared head)."""
        return self.lm_head(self.mtp_hidden(hidden_BTH, next_ids, position_ids, cache))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def init_weights(model: ErnieForCausalLM, std: float = 0.02, seed: int | None = None) -> ErnieForCausalLM:
    """Random init for training from scratch and for tests: normal(0, std) matrices, unit norms,
    zero biases and zero correction bias."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".mtp_emb_norm." in name or ".mtp_hidden_norm." in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    return model

