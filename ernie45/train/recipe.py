"""Training recipe: one validated dataclass, read from ``recipes/*.yaml``. Each field is a YAML key."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

TASKS = ("pretrain", "sft", "dpo", "upo")
DPO_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class TrainConfig:
    """A training run. Paths in a YAML recipe are relative to the directory the command runs in."""

    task: str = "pretrain"
    """pretrain | sft | dpo | upo (online: ernie45.train.upo)."""
    output_dir: str = "runs/out"
    """Checkpoints, metrics.jsonl, loss.png and the exported model (``final/``) go here."""
    tokenizer: str | None = None
    """Folder with tokenizer.model (+ tokenizer_config.json); defaults to init_from."""
    init_from: str | None = None
    """HF checkpoint folder (or 'demo') to start from; None builds ``model`` from scratch."""
    model: dict[str, Any] = field(default_factory=dict)
    """From scratch: ``preset`` (a ModelConfig preset name) and/or ModelConfig fields."""
    init_std: float = 0.02
    """Std of the normal init when training from scratch."""
    data: list[str] = field(default_factory=list)
    """Data files: .jsonl/.txt text (pretrain), chat JSONL (sft), preference JSONL (dpo)."""
    data_repeat: list[int] | None = None
    """Pretraining: copies of each data file (to balance languages); one entry per file."""
    seq_len: int = 256
    """Pretraining window / SFT and DPO maximum length, in tokens."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x this."""
    warmup_steps: int = 10
    """Linear warmup steps from lr/warmup_steps to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms, biases or embeddings' ... see trainer)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 autocast over fp32 master weights) | fp8 (bf16 autocast + FP8 GEMMs, ernie45.train.fp8;
    needs CUDA capability >= 8.9)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward to save activation memory."""
    recompute: str | list[str] | None = None
    """Fine-grained recomputation: none | attention | experts | mlp | full, or a list (ernie45.train.recompute)."""
    seed: int = 0
    """Seeds initialisation and data order."""
    aux_loss_coef: float = 0.0
    """Weight of the MoE load-balancing auxiliary loss (0 = off)."""
    aux_free_rate: float = 0.0
    """Per-step update of the routers' e_score_correction_bias (aux-loss-free balancing; 0 = off)."""
    mtp_loss_coef: float = 0.0
    """Weight of ERNIE's multi-token-prediction loss: the MTP block predicts token t+2 from the final hidden state
    at t and token t+1 (cross-entropy over the same trained positions, shifted by one). Keeps a checkpoint's MTP
    block useful for speculative decoding through fine-tuning. 0 = off."""
    mtp_distill: bool = False
    """Score the MTP block against the model's own next-position distribution (soft targets from the same forward,
    detached) instead of the data's tokens: what speculative decoding accepts is agreement with the model, so a
    head trained this way drafts more acceptable tokens. Needs mtp_loss_coef > 0."""
    mtp_depth: int = 1
    """How many times the MTP loss applies the block in a row, as speculative decoding drafts with it: depth d reads
    depth d-1's output and token t+d and predicts token t+d+1, attending to what the engine's MTP cache holds when
    draft d is made (``ernie45.train.trainer.mtp_depth_logits``). The loss is the mean over depths. 1 = ERNIE's
    one-step MTP loss."""
    add_mtp: bool = False
    """Give a model without an MTP block a freshly initialised one (num_nextn_predict_layers = 1)."""
    train_only: list[str] | None = None
    """Train only the parameters whose names start with one of these prefixes (e.g. ["model.mtp_"] trains the
    MTP block on a frozen model); None trains everything."""
    freeze_correction_bias: bool = False
    """Keep the loaded correction bias as it is (fine-tuning a released model)."""
    dpo_loss: str = "sigmoid"
    """sigmoid | ipo | simpo."""
    dpo_beta: float = 0.1
    """β of DPO/IPO (SimPO uses simpo_beta)."""
    dpo_label_smoothing: float = 0.0
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    lora: dict[str, Any] | None = None
    """LoRA instead of full fine-tuning: {r, alpha, targets}; see ernie45.train.lora.LoRAConfig."""
    upo: dict[str, Any] | None = None
    """task: upo only: rollouts, rewards and loss weights; see ernie45.train.upo.UPOConfig. batch_size is then
    prompts per step, seq_len the longest prompt."""
    log_every: int = 1
    """Metrics line every N steps."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    export_dtype: str = "bfloat16"
    """dtype of the exported HF model in output_dir/final."""
    plot: bool = True
    """Write loss.png (matplotlib, Agg) at each checkpoint and at the end."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {list(TASKS)}")
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}: choose 'fp32', 'bf16' or 'fp8'")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"dpo_loss={self.dpo_loss!r}: choose one of {list(DPO_LOSSES)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "save_every",
                     "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive and warmup_steps={self.warmup_steps} >= 0")
        if not self.data:
            raise ValueError("data is empty: list at least one data file in the recipe")
        if self.data_repeat is not None and len(self.data_repeat) != len(self.data):
            raise ValueError(f"data_repeat has {len(self.data_repeat)} entries for {len(self.data)} data files")
        if not isinstance(self.mtp_depth, int) or isinstance(self.mtp_depth, bool) or not 1 <= self.mtp_depth <= 8:
            raise ValueError(f"mtp_depth={self.mtp_depth!r} must be an integer in [1, 8] (1 = one-step MTP loss)")
        if self.mtp_depth > 1 and not self.mtp_loss_coef:
            raise ValueError(f"mtp_depth={self.mtp_depth} shapes the MTP loss; it needs mtp_loss_coef > 0")
        if self.init_from is None and not self.model:
            raise ValueError("give init_from (a checkpoint folder or 'demo') or model (a preset and/or fields)")
        if self.lora and self.aux_free_rate:
            raise ValueError("aux_free_rate updates the routers' correction bias, which a LoRA adapter does not "
                             "carry; set aux_free_rate: 0 for a LoRA run")
        if self.task == "upo":
            from ernie45.train.upo import UPOConfig

            u = UPOConfig.from_dict(self.upo)
            if self.batch_size % (u.updates_per_step * self.grad_accum):
                raise ValueError(f"batch_size={self.batch_size} prompts must split evenly into upo.updates_per_step="
                                 f"{u.updates_per_step} x grad_accum={self.grad_accum} parts")
        elif self.upo is not None:
            raise ValueError(f"the upo mapping is for task: upo; this recipe is task: {self.task}")
        if self.recompute is not None:
            from ernie45.train.recompute import parse_recompute

            parse_recompute(self.recompute)
        if self.tokenizer is None and self.init_from is None:
            raise ValueError("tokenizer is not set: give the folder holding tokenizer.model")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "recipe") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> TrainConfig:
        """Read a recipe; ``overrides`` (e.g. output_dir=...) replace its keys."""
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such recipe file")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
