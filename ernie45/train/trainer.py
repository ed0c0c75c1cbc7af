"""Single-process trainer for pretraining, SFT and DPO (full or LoRA) on the one model definition.

Distributed training plugs in from outside by subclassing: override :meth:`Trainer.build_model`
(wrap/shard the module), :meth:`Trainer.build_optimizer`, :meth:`Trainer.micro_step` or
:meth:`Trainer.optimizer_step`. There is no global state: everything a step needs hangs off the
trainer, and everything a resume needs is in the checkpoint (``ernie45.train.state``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ernie45.config import ModelConfig
from ernie45.model.model import ErnieForCausalLM, init_weights
from ernie45.train import balance, losses, state
from ernie45.train.data import BatchSampler, PackedDataset, PreferenceDataset, SFTDataset, pad_batch
from ernie45.train.recipe import TrainConfig
from ernie45.utils import atomic_write_text, resolve_dtype

log = logging.getLogger(__name__)



def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to lr x min_lr_ratio at max_steps.
    ``step`` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def load_tokenizer(folder: str):
    """The project tokenizer for ``folder`` (a checkpoint or tokenizer folder, or 'demo')."""
    from ernie45.model.checkpoint import resolve_model_path
    from ernie45.tokenizer import Tokenizer

    path = resolve_model_path(folder)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise ValueError(f"{path}: no tokenizer.model; set 'tokenizer' in the recipe to a folder that has one")
    return Tokenizer.from_pretrained(path)


def _with_new_mtp(model: nn.Module, std: float, seed: int) -> nn.Module:
    """``model`` rebuilt with one MTP block (num_nextn_predict_layers = 1), its own weights kept and the block's
    initialised as ``init_weights`` does (normal matrices, unit norms)."""
    new = ErnieForCausalLM(model.config.replace(num_nextn_predict_layers=1))
    init_weights(new, std=std, seed=seed)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".mtp_" in n for n in missing), (missing, unexpected)
    new.tie_weights()
    return new


def mtp_chain_mask(seq_len: int, depth: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which keys each query sees when depths 1..``depth`` of the MTP block are laid out in one row, depth by depth
    (depth d holds chains t = 0 .. seq_len - d - 1). [L, L] bool, True = visible.

    Query (d, t) sees the depth-1 pairs (1, s) for s <= t and its own chain's depths (d', t) for 2 <= d' <= d: when
    the engine drafts token d of a step, its MTP cache slot holds the depth-1 pairs up to the last verified position
    and the chain's own earlier drafts after it (``ernie45.engine.speculative``). Depth 1 alone is causal."""
    dep = torch.cat([torch.full((seq_len - d,), d, device=device) for d in range(1, depth + 1)])      # [L]
    chain = torch.cat([torch.arange(seq_len - d, device=device) for d in range(1, depth + 1)])        # [L]
    dq, dk, cq, ck = dep[:, None], dep[None], chain[:, None], chain[None]
    return ((dk == 1) & (ck <= cq)) | ((dk >= 2) & (dk <= dq) & (ck == cq))


def mtp_depth_logits(model: ErnieForCausalLM, hidden_BTH: torch.Tensor, input_ids_BT: torch.Tensor, depth: int
                     ) -> list[torch.Tensor]:
    """Draft logits of the MTP block applied ``depth`` times in a row, as speculative decoding applies it: depth 1
    reads (h_t, x_{t+1}) at position t; depth d reads depth d-1's output for the same t and the token x_{t+d}, at
    position t+d-1 (teacher forcing: the drafts are the tokens of the text), attending as :func:`mtp_chain_mask`.
    Each depth runs the block over the row of depths 1..d (the earlier depths' keys are what depth d attends to).

    hidden_BTH: the main model's final hidden states; input_ids_BT: the tokens (right padding needs no mask: a
    real query never sees a later position). Returns per depth d = 1..depth logits [B, T-d, V]: row t predicts
    x_{t+d+1} (= labels[:, d:] of the shifted labels).
    """
    b, t, _ = hidden_BTH.shape
    if depth == 1:
        return [model.mtp_logits(hidden_BTH[:, :-1], input_ids_BT[:, 1:])]
    dev = hidden_BTH.device
    prev, hs, ids, pos, out = hidden_BTH, [], [], [], []
    for d in range(1, depth + 1):
        n = t - d
        hs.append(prev[:, :n])
        ids.append(input_ids_BT[:, d:d + n])
        pos.append(torch.arange(d - 1, d - 1 + n, device=dev))
        mask = mtp_chain_mask(t, d, dev)[None, None] if d > 1 else None
        h_BLH = model.mtp_hidden(torch.cat(hs, 1), torch.cat(ids, 1), torch.cat(pos)[None].expand(b, -1), mask=mask)
        prev = h_BLH[:, -n:]
        out.append(model.lm_head(prev))
    return out


class Trainer:
    """Runs a TrainConfig. ``tokenizer`` may be passed in (tests); else it is loaded from the recipe."""

    def __init__(self, cfg: TrainConfig, tokenizer=None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.tokenizer_dir = cfg.tokenizer or cfg.init_from
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.tokenizer_dir)
        self.model = self.build_model()
        self.reference = self.build_reference() if self.needs_reference() else None
        self.lora_config = None
        if cfg.lora:
            from ernie45.train import lora

            self.lora_config = lora.LoRAConfig(**cfg.lora)
            lora.apply_lora(self.model, self.lora_config)
        if cfg.gradient_checkpointing:
            self.model.model.gradient_checkpointing = True
        if cfg.precision == "fp8":  # before recompute: both swap module classes, FP8 first
            from ernie45.train.fp8 import enable_fp8

            enable_fp8(self.model)
        if cfg.recompute:  # after the subclasses' parallelize: the experts' class is swapped there
            from ernie45.train.recompute import apply_recompute

            apply_recompute(self.model, cfg.recompute)
        self.optimizer = self.build_optimizer(self.model)
        self.dataset = self.build_dataset()
        self.sampler = BatchSampler(len(self.dataset), cfg.batch_size, seed=cfg.seed, shuffle=True)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.num_experts = self.model.config.moe_num_experts

    # ------------------------------------------------------------------------------------ building
    def build_model(self) -> nn.Module:
        """fp32 master weights: loaded from init_from, or built from ``model`` and initialised."""
        cfg = self.cfg
        if cfg.init_from:
            from ernie45.loading import load_model

            model = load_model(cfg.init_from, dtype=torch.float32, device="cpu", progress=False)
        else:
            fields = dict(cfg.model)
            preset = fields.pop("preset", None)
            mcfg = ModelConfig.from_name(preset).replace(**fields) if preset else ModelConfig(**fields)
            model = init_weights(ErnieForCausalLM(mcfg), std=cfg.init_std, seed=cfg.seed)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and vocab > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}; set model.vocab_size >= {vocab}")
        if cfg.freeze_correction_bias and cfg.aux_free_rate:
            raise ValueError("freeze_correction_bias and aux_free_rate > 0 contradict each other; pick one")
        if cfg.add_mtp and not model.has_mtp:
            model = _with_new_mtp(model, cfg.init_std, cfg.seed)
        if cfg.mtp_distill and not cfg.mtp_loss_coef:
            raise ValueError("mtp_distill changes the MTP loss's targets; it needs mtp_loss_coef > 0")
        if cfg.mtp_loss_coef and not model.has_mtp:
            raise ValueError("mtp_loss_coef > 0 needs a model with an MTP block (num_nextn_predict_layers >= 1 and "
                             "its model.mtp_* tensors); set add_mtp: true to start one")
        if cfg.train_only is not None:
            names = [n for n, _ in model.named_parameters()]
            for prefix in cfg.train_only:
                if not any(n.startswith(prefix) for n in names):
                    raise ValueError(f"train_only: no parameter name starts with {prefix!r} (e.g. {names[0]!r})")
            for n, p in model.named_parameters():
                p.requires_grad_(any(n.startswith(prefix) for prefix in cfg.train_only))
        return model.to(self.device).train()

    def needs_reference(self) -> bool:
        """A frozen reference is kept for DPO/IPO (subclasses such as UPO decide for themselves)."""
        return self.cfg.task == "dpo" and self.cfg.dpo_loss != "simpo"

    def build_reference(self) -> nn.Module:
        """Frozen copy of the starting policy for DPO/IPO (built before LoRA is applied)."""
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW; decay on matrices only (norm weights and biases are not shrunk), trainable params only."""
        decay, no_decay = [], []
        for _, p in sorted({id(p): (n, p) for n, p in model.named_parameters()}.values(), key=lambda t: t[0]):
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps)

    def build_dataset(self):
        cfg, tok = self.cfg, self.tokenizer
        if cfg.task == "pretrain":
            return PackedDataset.from_files(cfg.data, tok, cfg.seq_len, cfg.data_repeat)
        cls = SFTDataset if cfg.task == "sft" else PreferenceDataset
        parts = [cls.from_file(p, tok, cfg.seq_len) for p in cfg.data]
        return cls([ex for part in parts for ex in part.examples])

    # ------------------------------------------------------------------------------------ stepping
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision in ("bf16", "fp8"))

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        return [self.dataset[i] for i in self.sampler.next_indices()]

    def micro_step(self, items: list[dict[str, torch.Tensor]], token_scale: float) -> dict[str, Any]:
        """Forward + backward of one micro-batch; the loss is scaled so that the accumulated gradient is
        the step's mean. Returns sums for the metrics (loss_sum, tokens, expert load, ...)."""
        if self.cfg.task == "dpo":
            return self._dpo_micro_step(items)
        batch = {k: v.to(self.device) for k, v in pad_batch(items, self.pad_id).items()}
        with self.autocast():
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                             return_router=self.num_experts > 0)
            loss_sum = losses.masked_cross_entropy(out.logits, batch["labels"], reduction="sum")
            mtp_sum = None
            if self.cfg.mtp_loss_coef:  # pairs (h_t, x_{t+1}) predict x_{t+2} = labels[t + 1]; depth d: labels[t + d]
                depths = mtp_depth_logits(self.model, out.hidden_states, batch["input_ids"], self.cfg.mtp_depth)
                mtp_sum = 0
                for d, mtp_logits in enumerate(depths, 1):
                    if self.cfg.mtp_distill:  # the model's own distribution at t + d is the target of chain t
                        mtp_sum = mtp_sum + losses.soft_cross_entropy(mtp_logits, out.logits[:, d:].detach(),
                                                                      batch["labels"][:, d:])
                    else:
                        mtp_sum = mtp_sum + losses.masked_cross_entropy(mtp_logits, batch["labels"][:, d:],
                                                                        reduction="sum")
                mtp_sum = mtp_sum / len(depths)
        loss = loss_sum * token_scale
        rec = {"loss_sum": float(loss_sum.detach()), "tokens": int((batch["labels"] != -100).sum())}
        if mtp_sum is not None:
            loss = loss + self.cfg.mtp_loss_coef * mtp_sum * token_scale
            rec["mtp_loss_sum"] = float(mtp_sum.detach())
        rec.update(self._router_terms(out.router, batch["attention_mask"]))
        if "aux" in rec:
            loss = loss + self.cfg.aux_loss_coef * rec.pop("aux_t") / self.cfg.grad_accum
        loss.backward()
        return rec

    def _router_terms(self, router: list, mask_BT: torch.Tensor) -> dict[str, Any]:
        if not router:
            return {}
        n = len(balance.moe_modules(self.model))  # checkpointing appends recomputed records in backward
        router = router[:n]
        rec: dict[str, Any] = {"load": balance.expert_load(router, self.num_experts, mask_BT)}
        if self.cfg.aux_loss_coef:
            aux = losses.load_balancing_loss(router, self.num_experts, mask_BT)
            rec["aux"], rec["aux_t"] = float(aux.detach()), aux
        return rec

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            return losses.sequence_logprobs(out.logits, batch["labels"])

    def _dpo_micro_step(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        cfg = self.cfg
        b = len(items)
        both = [{"input_ids": it[f"{k}_input_ids"], "labels": it[f"{k}_labels"]} for k in ("chosen", "rejected")
                for it in items]
        batch = {k: v.to(self.device) for k, v in pad_batch(both, self.pad_id).items()}
        logp, n = self._logps(self.model, batch)
        if cfg.dpo_loss == "simpo":
            avg = logp / n.clamp(min=1)
            loss, rc, rr = losses.simpo_loss(avg[:b], avg[b:], cfg.simpo_beta, cfg.simpo_gamma)
        else:
            with torch.no_grad():
                ref, _ = self._logps(self.reference, batch)
            if cfg.dpo_loss == "ipo":  # IPO on per-token means (as TRL)
                logp, ref = logp / n.clamp(min=1), ref / n.clamp(min=1)
            loss, rc, rr = losses.dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], cfg.dpo_beta, cfg.dpo_loss,
                                           cfg.dpo_label_smoothing)
        (loss / cfg.grad_accum).backward()
        margin = rc - rr
        return {"loss_sum": float(loss.detach()) * b, "tokens": b, "margin_sum": float(margin.sum()),
                "acc_sum": float((margin > 0).float().sum()), "tokens_real": int(n.sum())}

    def optimizer_step(self) -> float:
        """Clip, set this step's learning rate, step AdamW; returns the pre-clip gradient norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pid is None else pid

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics row."""
        t0 = time.perf_counter()
        micro = [self.next_batch() for _ in range(self.cfg.grad_accum)]
        if self.cfg.task == "dpo":
            scale = 0.0
        else:
            total = sum(int((it["labels"] != -100).sum()) for items in micro for it in items)
            scale = 1.0 / max(1, total)
        recs = [self.micro_step(items, scale) for items in micro]
        lr = lr_at(self.step, self.cfg)
        norm = self.optimizer_step()
        self.step += 1
        tokens = sum(r["tokens"] for r in recs)
        row: dict[str, Any] = {"step": self.step, "loss": sum(r["loss_sum"] for r in recs) / max(1, tokens),
                               "lr": lr, "grad_norm": norm}
        if "mtp_loss_sum" in recs[0]:
            row["mtp_loss"] = sum(r["mtp_loss_sum"] for r in recs) / max(1, tokens)
        if self.cfg.task == "dpo":
            row["reward_margin"] = sum(r["margin_sum"] for r in recs) / tokens
            row["reward_accuracy"] = sum(r["acc_sum"] for r in recs) / tokens
            tokens = sum(r["tokens_real"] for r in recs)
        if "load" in recs[0]:
            load_LE = sum(r["load"] for r in recs)
            row["expert_imbalance"] = balance.imbalance(load_LE)
            if "aux" in recs[0]:
                row["aux_loss"] = sum(r["aux"] for r in recs) / len(recs)
            if self.cfg.aux_free_rate and not self.cfg.freeze_correction_bias:
                balance.update_correction_bias(self.model, load_LE, self.cfg.aux_free_rate)
        dt = time.perf_counter() - t0
        row.update(tokens=tokens, tokens_per_s=tokens / dt if dt > 0 else 0.0, step_s=dt)
        return row

    # ------------------------------------------------------------------------------------ the loop
    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "metrics.jsonl")

    def train(self, resume: bool = False, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run to max_steps (or stop after ``stop_after`` steps of this call, without saving: what a kill
        leaves behind). ``resume`` continues from the newest checkpoint in output_dir."""
        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume:
            self.resume()
        else:
            atomic_write_text(self.metrics_path, "")
        atomic_write_text(os.path.join(cfg.output_dir, "recipe.json"), json.dumps(cfg.to_dict(), indent=1) + "\n")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.task, unit="step", disable=None)
        done = 0
        with open(self.metrics_path, "a", encoding="utf-8") as mf:
            while self.step < cfg.max_steps:
                if stop_after is not None and done >= stop_after:
                    bar.close()
                    return self.history
                row = self.train_step()
                done += 1
                self.history.append(row)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
        bar.close()
        self.export()
        return self.history

    # ------------------------------------------------------------------------------------ state
    def save(self) -> str:
        ckpt = state.save_checkpoint(
            os.path.join(self.cfg.output_dir, "checkpoints"), self.step, self.model, self.optimizer,
            {"sampler": self.sampler.state_dict(), "scheduler": {"step": self.step, "lr": lr_at(self.step, self.cfg)},
             "recipe": self.cfg.to_dict()}, keep=self.cfg.keep_checkpoints)
        if self.cfg.plot:
            self.plot()
        return ckpt

    def resume(self) -> None:
        """Restore the newest checkpoint; metrics.jsonl is cut back to the checkpoint's step."""
        ckpt = state.latest_checkpoint(os.path.join(self.cfg.output_dir, "checkpoints"))
        if ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {self.cfg.output_dir}/checkpoints; start without --resume")
        st = state.load_checkpoint(ckpt, self.model, self.optimizer)
        self.step = int(st["step"])
        self.sampler.load_state_dict(st["sampler"])
        rows = []
        if os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        self.history = [r for r in rows if r["step"] <= self.step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        log.info("resumed from %s at step %d", ckpt, self.step)

    def plot(self) -> str | None:
        """loss.png of the metrics so far (matplotlib, Agg backend). A plot that fails is a warning: the run, its
        checkpoints and metrics.jsonl never depend on it."""
        if not self.history:
            return None
        try:
            return self._plot()
        except Exception as e:  # any plotting failure (missing backend, fonts, disk) is not fatal
            warnings.warn(f"could not draw {os.path.join(self.cfg.output_dir, 'loss.png')} ({type(e).__name__}: "
                          f"{e}); training goes on, metrics.jsonl has the same numbers", stacklevel=2)
            return None

    def _plot(self) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in self.history], [r["loss"] for r in self.history], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.cfg.task} loss")
        ax.set_title(f"{self.cfg.task}: {os.path.basename(os.path.abspath(self.cfg.output_dir))}")
        ax.grid(alpha=0.3)
        path = os.path.join(self.cfg.output_dir, "loss.png")
        from ernie45.utils import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path

    def export(self) -> str:
        """HF-format model in output_dir/final (LoRA merged; the adapter alone in output_dir/adapter),
        with the tokenizer files beside it."""
        from ernie45.loading import save_model

        out = os.path.join(self.cfg.output_dir, "final")
        model = self.model
        if self.lora_config is not None:
            from ernie45.train import lora

            lora.save_adapter(model, os.path.join(self.cfg.output_dir, "adapter"), self.lora_config,
                              base=self.cfg.init_from)
            model = lora.merge_lora(copy.deepcopy(model))
        export = copy.deepcopy(model).to(resolve_dtype(self.cfg.export_dtype)).eval()
        save_model(export, out, tokenizer=self.tokenizer_dir or self.tokenizer)  # with the tokenizer's files
        gen = os.path.join(out, "generation_config.json")
        if not os.path.isfile(gen):  # the official sampling defaults (spec §4)
            tok = self.tokenizer
            atomic_write_text(gen, json.dumps({
                "bos_token_id": getattr(tok, "bos_token_id", 1), "eos_token_id": getattr(tok, "eos_token_id", 2),
                "pad_token_id": self.pad_id, "do_sample": True, "top_p": 0.8, "temperature": 0.8,
                "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}, indent=2) + "\n")
        if self.cfg.plot:
            self.plot()
        log.info("exported %s", out)
        return out
