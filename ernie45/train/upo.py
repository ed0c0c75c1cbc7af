"""Online post-training, UPO: rollouts from our engine, rewards, a GRPO-style clipped objective with a KL
term, plus a DPO term on each group's best and worst completion (docs/upo.md has our reading of ERNIE
4.5's "Unified Preference Optimization" and the sources).

One step (one metrics row):
1. the next ``batch_size`` prompts; each is sampled G = ``upo.group_size`` times by ``LLMEngine`` over the
   trainer's own module (``ernie45.train.rollout``);
2. rewards (``ernie45.train.rewards``) -> group-relative advantages A (reward - group mean) / group std;
3. the completions are split by prompt into ``updates_per_step`` minibatches, one optimizer step each
   (the first is on-policy, the later ones see a moved policy: that is what the ratio clip is for),
   each minibatch in ``grad_accum`` micro-batches. The loss of a minibatch is

     L = 1/N_tok Σ_tokens [ -min(ρ A, clip(ρ, 1±ε) A) + β_kl · k3(π, π_ref) ]
         + λ_dpo · mean over groups of -log σ(β_dpo [(log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-))])

   with ρ = π/π_old per token, k3 = exp(ref - logp) - (ref - logp) - 1, y+ / y- the highest / lowest
   reward completion of the group (a group whose rewards are all equal has no pair), N_tok the completion
   tokens of the minibatch (a token-level mean, as DAPO). A truncated completion (hit max_new_tokens)
   keeps its reward in its group's statistics but none of its tokens enters the loss (``mask_truncated``).
4. MoE: the router load of the update forwards drives aux-loss-free balancing after each optimizer step,
   and ``aux_loss_coef`` adds the load-balancing loss, as in SFT.

On --ep/--fsdp ranks the same step runs in ``ernie45.train.upo_distributed``: each rank takes its share of the
prompts, the sums it needs go over the ranks through the seams below (identity on one process).

Shape suffixes: P prompts, G samples per prompt, N completions of a micro-batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ernie45.train import balance, losses
from ernie45.train.data import IGNORE, DataError, pad_batch, read_jsonl
from ernie45.train.recipe import TrainConfig
from ernie45.train.rewards import Rewards
from ernie45.train.rollout import Completion, RolloutEngine, rollout_seed
from ernie45.train.trainer import Trainer, lr_at

log = logging.getLogger(__name__)


@dataclass
class UPOConfig:
    """The ``upo:`` mapping of a recipe (task: upo)."""

    group_size: int = 8
    """G: completions sampled per prompt (the group the advantages are relative to)."""
    max_new_tokens: int = 64
    """Longest completion; one that reaches it is truncated (see mask_truncated)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1.0 samples from the policy the ratio is taken of)."""
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    """Stop strings (besides the tokenizer's EOS); e.g. ["\\n"] for one-line answers."""
    clip_eps: float = 0.2
    """ε of the clipped ratio clip(π/π_old, 1-ε, 1+ε)."""
    kl_coef: float = 0.04
    """β_kl, weight of the k3 KL estimate to the frozen reference (GRPO's default 0.04; 0 = off)."""
    dpo_coef: float = 0.1
    """λ_dpo, weight of the DPO term on each group's best vs worst completion (0 = plain GRPO)."""
    dpo_beta: float = 0.1
    """β of that DPO term."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); False keeps reward - mean (Dr. GRPO)."""
    mask_truncated: bool = True
    """Leave completions that hit max_new_tokens out of the loss (their reward still counts in the group)."""
    updates_per_step: int = 1
    """Optimizer steps per rollout batch (the batch split by prompt; > 1 makes the ratio clip matter)."""
    rewards: list[dict[str, Any]] = field(default_factory=list)
    """Reward functions with weights; see ernie45.train.rewards."""
    prompt_field: str = "prompt"
    """Record field holding the prompt: a string (sent as is) or chat messages (chat template applied)."""
    kv_cache_memory: int | str | None = None
    """Rollout engine KV cache budget (bytes or '256MB'); default: what batch x G sequences need."""

    def __post_init__(self) -> None:
        for name in ("group_size", "max_new_tokens", "updates_per_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"upo.{name}={v!r} must be a positive integer")
        if self.group_size < 2:
            raise ValueError(f"upo.group_size={self.group_size}: group-relative advantages need at least 2 samples")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"upo.clip_eps={self.clip_eps} must be in (0, 1)")
        for name in ("kl_coef", "dpo_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"upo.{name}={getattr(self, name)} must be >= 0")
        if self.dpo_beta <= 0 or self.temperature <= 0:
            raise ValueError(f"upo.dpo_beta={self.dpo_beta} and upo.temperature={self.temperature} must be > 0")
        if not self.rewards:
            raise ValueError("upo.rewards is empty: list at least one reward, e.g. [{type: exact, field: answer}]")
        self.stop = list(self.stop)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> UPOConfig:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"upo: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**raw)


@dataclass
class Prompt:
    ids: list[int]
    text: str
    record: dict[str, Any]


class PromptDataset:
    """Prompt records from JSONL: ``{"prompt": str | messages, ...any fields the rewards read}``."""

    def __init__(self, prompts: list[Prompt]) -> None:
        self.examples = prompts

    @classmethod
    def from_file(cls, path: str, tokenizer, field_name: str = "prompt", max_len: int | None = None) -> PromptDataset:  # noqa: ANN001
        out = []
        for n, obj in read_jsonl(path):
            p = obj.get(field_name)
            if isinstance(p, list):
                text = tokenizer.apply_chat_template(p, add_generation_prompt=True)
            elif isinstance(p, str) and p:
                text = p
            else:
                raise DataError(f"{path}:{n}: a prompt record needs {field_name!r}: a non-empty string or chat "
                                f"messages; got keys {sorted(obj)}")
            ids = tokenizer.encode(text, add_special_tokens=False)
            if max_len is not None and len(ids) >= max_len:
                raise DataError(f"{path}:{n}: the prompt has {len(ids)} tokens, seq_len={max_len} leaves no room "
                                f"for upo.max_new_tokens; raise seq_len or shorten the prompt")
            out.append(Prompt(ids, text, obj))
        if not out:
            raise DataError(f"{path}: no prompt records")
        return cls(out)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Prompt:
        return self.examples[i]


def best_worst_pairs(rewards_PG: torch.Tensor, keep_PG: torch.Tensor) -> list[tuple[int, int, int]]:
    """(prompt, best sample, worst sample) per group among the kept samples, when their rewards differ.
    Ties go to the lowest index."""
    pairs = []
    for p in range(rewards_PG.shape[0]):
        idx = [g for g in range(rewards_PG.shape[1]) if keep_PG[p, g]]
        if len(idx) < 2:
            continue
        r = [float(rewards_PG[p, g]) for g in idx]
        hi, lo = idx[max(range(len(r)), key=lambda j: (r[j], -j))], idx[min(range(len(r)), key=lambda j: (r[j], j))]
        if rewards_PG[p, hi] > rewards_PG[p, lo]:
            pairs.append((p, hi, lo))
    return pairs


def upo_loss(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor | None,
             adv_N: torch.Tensor, mask_NT: torch.Tensor, pairs: list[tuple[int, int]], cfg: UPOConfig,
             num_tokens: int, num_pairs: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The UPO loss of one micro-batch, scaled so that micro-batches sum to the minibatch's loss.

    ``num_tokens`` / ``num_pairs``: loss tokens and DPO pairs of the whole minibatch; ``pairs``: (best, worst)
    rows of this micro-batch. Returns (loss, sums for the metrics)."""
    pg_sum, n_clip = losses.clipped_policy_loss(logp_NT, old_logp_NT, adv_N, mask_NT, cfg.clip_eps)
    loss = pg_sum / max(1, num_tokens)
    stats = {"pg_sum": float(pg_sum.detach()), "clip_count": int(n_clip), "tokens": int(mask_NT.sum())}
    if ref_logp_NT is not None:
        kl_sum = losses.k3_kl(logp_NT, ref_logp_NT, mask_NT)
        stats["kl_sum"] = float(kl_sum.detach())
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl_sum / max(1, num_tokens)
    if pairs and cfg.dpo_coef:
        seq_N = (logp_NT * mask_NT).sum(-1)
        ref_N = (ref_logp_NT * mask_NT).sum(-1)
        c, r = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
        dpo, rc, rr = losses.dpo_loss(seq_N[c], seq_N[r], ref_N[c], ref_N[r], cfg.dpo_beta)
        loss = loss + cfg.dpo_coef * dpo * len(pairs) / num_pairs
        stats["dpo_sum"] = float(dpo.detach()) * len(pairs)
        stats["dpo_margin_sum"] = float((rc - rr).sum())
    return loss, stats


class UPOTrainer(Trainer):
    """The Trainer with a rollout step: same model, optimizer, checkpoints, resume, LoRA, export."""

    def __init__(self, cfg: TrainConfig, tokenizer=None) -> None:  # noqa: ANN001
        self.upo = UPOConfig.from_dict(cfg.upo)
        super().__init__(cfg, tokenizer)
        self.rewards = Rewards.from_config(self.upo.rewards, self.tokenizer, cfg.device)
        longest = max(len(p.ids) for p in self.dataset.examples)
        slots = len(self.prompt_positions(cfg.batch_size)) * self.upo.group_size
        self.rollout = RolloutEngine(self.rollout_module(), self.tokenizer, max_num_seqs=slots,
                                     max_model_len=longest + self.upo.max_new_tokens + 1,
                                     kv_cache_memory=self.upo.kv_cache_memory)

    def needs_reference(self) -> bool:
        return self.upo.kl_coef > 0 or self.upo.dpo_coef > 0

    def build_dataset(self) -> PromptDataset:
        parts = [PromptDataset.from_file(p, self.tokenizer, self.upo.prompt_field, self.cfg.seq_len)
                 for p in self.cfg.data]
        return PromptDataset([ex for part in parts for ex in part.examples])

    # ------------------------------------------------------------------------------------ the rank seams
    # On one process these are the identity; ernie45.train.upo_distributed overrides them for --ep/--fsdp.
    world = 1
    """Data ranks the step's prompts are split over (the loss is scaled by it: ernie45.parallel.fsdp)."""

    def prompt_positions(self, n: int) -> list[int]:
        """Places in the step's batch of ``n`` prompts that this process samples and trains on (whole groups)."""
        return list(range(n))

    def rollout_module(self) -> nn.Module:
        """The module the rollout engine runs: here the trainer's own (shared tensors, nothing to sync)."""
        return self.model

    def sync_rollout(self) -> None:
        """Bring the rollout module to the trained weights before a rollout (shared module: nothing to do)."""

    def _sum(self, *values: float) -> list[float]:
        """Each value summed over the data ranks."""
        return list(values)

    def _sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0, in rank order."""
        return t

    def _max(self, v: float) -> float:
        return v

    # ------------------------------------------------------------------------------------ one step
    def _sequences(self, prompts: list[Prompt], groups: list[list[Completion]]) -> list[dict[str, torch.Tensor]]:
        """prompt + completion as (input_ids, labels) with labels only on the completion (shifted)."""
        items = []
        for p, group in zip(prompts, groups):
            for c in group:
                full = p.ids + c.token_ids
                labels = [IGNORE] * (len(p.ids) - 1) + c.token_ids
                items.append({"input_ids": torch.tensor(full[:-1]), "labels": torch.tensor(labels)})
        return items

    def _logps(self, model, batch: dict[str, torch.Tensor], router: bool = False):  # noqa: ANN001, ANN202
        with self.autocast():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_router=router)
            return losses.token_logprobs(out.logits, batch["labels"]), out

    def _micro_batches(self, prompts_idx: list[int], items: list[dict[str, torch.Tensor]], adv_PG: torch.Tensor,
                       keep_PG: torch.Tensor, pairs: list[tuple[int, int, int]], need_old: bool) -> list[dict]:
        """Pad one micro-batch per group of prompts and attach what its loss needs: advantages, the loss
        mask, its DPO pairs as rows, and (no grad, before any update of this step) π_ref and π_old."""
        g = self.upo.group_size
        per = len(prompts_idx) // self.cfg.grad_accum
        out = []
        for k in range(self.cfg.grad_accum):
            ps = prompts_idx[k * per:(k + 1) * per]
            rows = [p * g + j for p in ps for j in range(g)]
            batch = {key: v.to(self.device) for key, v in pad_batch([items[r] for r in rows], self.pad_id).items()}
            mask_NT = (batch["labels"] != IGNORE) & keep_PG[ps].reshape(-1)[:, None].to(self.device)
            local = {p: i for i, p in enumerate(ps)}
            mp = [(local[p] * g + hi, local[p] * g + lo) for p, hi, lo in pairs if p in local]
            with torch.no_grad():
                ref = self._logps(self.reference, batch)[0] if self.reference is not None else None
                old = self._logps(self.model, batch)[0] if need_old else None
            out.append({"batch": batch, "rows": rows, "mask": mask_NT, "pairs": mp, "ref": ref, "old": old,
                        "adv": adv_PG[ps].reshape(-1).to(self.device)})
        return out

    def train_step(self) -> dict[str, Any]:
        cfg, u = self.cfg, self.upo
        t0 = time.perf_counter()
        batch_idx = self.sampler.next_indices()  # the global batch, the same on every rank
        mine = self.prompt_positions(len(batch_idx))  # this rank's share, whole groups
        prompts = [self.dataset[batch_idx[i]] for i in mine]
        n_p, g = len(prompts), u.group_size
        self.sync_rollout()
        seeds = [rollout_seed(cfg.seed, self.step, i) for i in mine]  # by place in the global batch: any layout
        groups, rstats = self.rollout.generate([p.ids for p in prompts], g, seeds, max_new_tokens=u.max_new_tokens,
                                               temperature=u.temperature, top_p=u.top_p, top_k=u.top_k, stop=u.stop)
        comps = [c for grp in groups for c in grp]
        rewards_N, parts = self.rewards([p.text for p in prompts for _ in range(g)], [c.text for c in comps],
                                        [p.record for p in prompts for _ in range(g)],
                                        [p.ids + c.token_ids for p, grp in zip(prompts, groups) for c in grp])
        rewards_PG = rewards_N.view(n_p, g)
        adv_PG = losses.group_advantages(rewards_PG, scale=u.scale_rewards)
        truncated_PG = torch.tensor([[c.finish_reason == "length" for c in grp] for grp in groups])
        keep_PG = ~truncated_PG if u.mask_truncated else torch.ones_like(truncated_PG)
        pairs = best_worst_pairs(rewards_PG, keep_PG) if u.dpo_coef else []
        items = self._sequences(prompts, groups)

        # minibatches (one optimizer step each), split by prompt; π_old and π_ref of all of them first.
        # With one update per step π_old is the current policy itself (ratio 1, detached), as in GRPO.
        per_mb = n_p // u.updates_per_step
        minibatches = [self._micro_batches(list(range(m * per_mb, (m + 1) * per_mb)), items, adv_PG, keep_PG, pairs,
                                           need_old=u.updates_per_step > 1) for m in range(u.updates_per_step)]
        sums: dict[str, float] = {}
        loads, norms, mb_losses, mb_aux = [], [], [], []
        logp_diff = 0.0
        lr = lr_at(self.step, cfg)
        for m, micro in enumerate(minibatches):
            # the loss is normalised by the minibatch's tokens and pairs over every rank (the global minibatch)
            n_tok, n_pairs = (int(v) for v in self._sum(sum(int(b["mask"].sum()) for b in micro),
                                                         sum(len(b["pairs"]) for b in micro)))
            mb_loss, aux_part, mb_loads = 0.0, 0.0, []
            for b in micro:
                batch = b["batch"]
                logp_NT, out = self._logps(self.model, batch, router=self.num_experts > 0)
                if m == 0:  # the engine sampled from these very weights: a live weight-sync check
                    logp_diff = max(logp_diff, self._engine_diff(logp_NT, batch, b["rows"], comps))
                old_NT = b["old"] if b["old"] is not None else logp_NT.detach()
                loss, st = upo_loss(logp_NT, old_NT, b["ref"], b["adv"], b["mask"], b["pairs"], u, n_tok, n_pairs)
                mb_loss += float(loss.detach())  # this rank's share of the minibatch's loss
                if self.world > 1:  # the data-parallel reduction averages over ranks (ernie45.parallel.fsdp)
                    loss = loss * self.world
                rec = self._router_terms(out.router, batch["attention_mask"])
                if "aux" in rec:
                    aux = cfg.aux_loss_coef * rec.pop("aux_t") / cfg.grad_accum
                    loss = loss + aux
                    aux_part += float(aux.detach())
                    st["aux_sum"] = rec["aux"]
                if "load" in rec:
                    mb_loads.append(rec["load"])
                loss.backward()
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
            norms.append(self.optimizer_step())
            mb_losses.append(mb_loss)
            mb_aux.append(aux_part)
            if mb_loads:
                load_LE = self._sum_tensor(sum(mb_loads))  # every rank's tokens: the bias stays the same on all
                loads.append(load_LE)
                if cfg.aux_free_rate and not cfg.freeze_correction_bias:
                    balance.update_correction_bias(self.model, load_LE, cfg.aux_free_rate)
        self.step += 1
        dt = time.perf_counter() - t0

        # metrics of the global batch: sums over the ranks (identity on one process), rewards gathered
        lens = [len(c.token_ids) for c in comps]
        kept = [n for n, k in zip(lens, keep_PG.reshape(-1).tolist()) if k]
        keys = ("pg_sum", "clip_count", "tokens", "kl_sum", "dpo_sum", "dpo_margin_sum", "aux_sum")
        tot = self._sum(*(sums.get(k, 0.0) for k in keys), *mb_losses, *mb_aux, len(pairs), sum(lens), len(lens),
                        sum(kept), len(kept), rstats["tokens"])
        s = dict(zip(keys, tot))
        n_mb = len(mb_losses)
        losses_mb = [a + b / self.world for a, b in zip(tot[len(keys):len(keys) + n_mb], tot[len(keys) + n_mb:])]
        n_pairs_all, len_sum, len_n, kept_sum, kept_n, roll_tok = tot[len(keys) + 2 * n_mb:]
        rewards_all = self._gather(rewards_N)
        roll_s = self._max(rstats["seconds"])
        tok = max(1.0, s["tokens"])
        row: dict[str, Any] = {
            "step": self.step, "loss": sum(losses_mb) / n_mb, "lr": lr, "grad_norm": sum(norms) / len(norms),
            "reward_mean": float(rewards_all.mean()), "reward_std": float(rewards_all.std()),
            "reward_group_std": float(self._gather(rewards_PG.std(-1)).mean()),
            **{f"reward_{k}": float(self._gather(v).mean()) for k, v in parts.items()},
            "pg_loss": s["pg_sum"] / tok, "clip_fraction": s["clip_count"] / tok,
            "completion_len": len_sum / len_n,
            "accepted_len": kept_sum / max(1, int(kept_n)),
            "truncated_frac": float(self._gather(truncated_PG.reshape(-1).float()).mean()),
        }
        if self.reference is not None:
            row["kl"] = s["kl_sum"] / tok
        if u.dpo_coef:
            n_pairs_all = int(n_pairs_all)
            row["dpo_pairs"] = n_pairs_all
            row["dpo_loss"] = s["dpo_sum"] / n_pairs_all if n_pairs_all else 0.0
            row["dpo_margin"] = s["dpo_margin_sum"] / n_pairs_all if n_pairs_all else 0.0
        if loads:
            row["expert_imbalance"] = balance.imbalance(sum(loads))
            if "aux_sum" in sums:
                row["aux_loss"] = s["aux_sum"] / (self.world * sum(len(micro) for micro in minibatches))
        row.update(engine_logp_diff=self._max(logp_diff), rollout_tokens=int(roll_tok), rollout_s=roll_s,
                   rollout_tokens_per_s=roll_tok / roll_s if roll_s > 0 else 0.0,
                   rollout_share=roll_s / dt if dt else 0.0, step_s=dt, tokens=int(s["tokens"]),
                   tokens_per_s=s["tokens"] / dt if dt else 0.0)
        return row

    @staticmethod
    def _engine_diff(logp_NT: torch.Tensor, batch: dict[str, torch.Tensor], rows: list[int],
                     comps: list[Completion]) -> float:
        """Largest |trainer log p - engine log p| over the sampled tokens of these rows."""
        worst = 0.0
        for i, r in enumerate(rows):
            lp = comps[r].logprobs
            if not lp:
                continue
            pos = (batch["labels"][i] != IGNORE).nonzero()[:, 0]
            ours = logp_NT[i, pos].detach()
            worst = max(worst, float((ours - torch.tensor(lp, dtype=ours.dtype)).abs().max()))
        return worst

    # ------------------------------------------------------------------------------------ plotting
    def plot(self) -> str | None:
        path = super().plot()
        if not self.history:
            return path
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ernie45.utils import atomic_path

        steps = [r["step"] for r in self.history]
        mean = torch.tensor([r["reward_mean"] for r in self.history])
        std = torch.tensor([r["reward_std"] for r in self.history])
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        ax.plot(steps, mean, lw=1, label="reward mean")
        if len(steps) >= 10:
            k = max(5, len(steps) // 20)
            smooth = torch.nn.functional.avg_pool1d(mean[None, None], k, 1, padding=0)[0, 0]
            ax.plot(steps[k - 1:], smooth, lw=2, label=f"mean of {k} steps")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, label="± std over samples")
        ax.set_ylabel("reward")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title(f"UPO: {os.path.basename(os.path.abspath(self.cfg.output_dir))}")
        ax2.plot(steps, [r["completion_len"] for r in self.history], lw=1, label="completion length (tokens)")
        if "kl" in self.history[0]:
            ax3 = ax2.twinx()
            ax3.plot(steps, [r["kl"] for r in self.history], lw=1, color="tab:red", label="KL (k3)")
            ax3.set_ylabel("KL to reference", color="tab:red")
        ax2.set_xlabel("step")
        ax2.set_ylabel("tokens")
        ax2.grid(alpha=0.3)
        out = os.path.join(self.cfg.output_dir, "reward.png")
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path
