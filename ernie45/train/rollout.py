"""Rollouts for online post-training from the trainer's own model through ``LLMEngine``.

On one process the engine is built over the *same module object* the optimizer updates: its parameters
are the trainer's tensors (no copy, no file), so every optimizer step is visible to the next rollout without
a sync. On several ranks (``ernie45.train.upo_distributed``) it runs a plain replica of the sharded policy
that the trainer copies the gathered weights into, in place, after updates: the engine and its KV cache
stay. With LoRA the engine runs the LoRA-wrapped modules as they are (adapter applied on the fly, in
``inference_mode``). Prefix caching is off: a cached prompt block computed before an update would hold
the old weights' keys and values. The module is switched to ``eval()`` for a rollout and back after, so
activation checkpointing (a training-only path) never runs inside the engine.

Each prompt's G samples are one request with ``n=G`` and its own seed, derived from the run's seed, the
step and the prompt's place in the batch: a resumed run samples exactly what an uninterrupted one does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from ernie45.engine.llm import LLMEngine
from ernie45.engine.sampling_params import SamplingParams


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled tokens, the stop token included when the completion ended on one."""
    text: str
    """Detokenized text (a matched stop string cut off)."""
    finish_reason: str
    """'stop' (stop token or string) or 'length' (hit max_new_tokens: truncated)."""
    logprobs: list[float]
    """The engine's log-probability of each sampled token under the raw (temperature 1) distribution."""


def rollout_seed(run_seed: int, step: int, index: int) -> int:
    """Sampling seed of prompt ``index`` at ``step`` (a fixed mix; distinct prompts get distinct streams)."""
    return ((run_seed + 1) * 0x9E3779B1 + (step + 1) * 0x85EBCA77 + (index + 1) * 0xC2B2AE3D) % (2**63)


class RolloutEngine:
    """``generate(prompt_ids, n, seeds, ...)`` -> per prompt, its n completions; ``model`` is used as it is
    (the trainer's module, or a replica the trainer keeps in sync)."""

    def __init__(self, model: nn.Module, tokenizer, *, max_num_seqs: int, max_model_len: int,  # noqa: ANN001
                 kv_cache_memory: int | str | None = None, max_num_batched_tokens: int = 2048) -> None:
        was_training = model.training
        self.model = model
        self.engine = LLMEngine(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
                                kv_cache_memory=kv_cache_memory, enable_prefix_caching=False)
        model.train(was_training)  # LLMEngine puts its model in eval mode
        # a chat prompt's answer ends with <|end_of_sentence|>, not the checkpoint's EOS: stop on every stop id
        # of the tokenizer, as LLM.chat does
        self.stop_token_ids = list(getattr(tokenizer, "stop_token_ids", None) or [])
        self._counter = 0
        self.tokens_total = 0
        self.seconds_total = 0.0

    def generate(self, prompt_ids: list[list[int]], n: int, seeds: list[int], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop: list[str] | None = None) -> tuple[list[list[Completion]], dict[str, float]]:
        """Sample ``n`` completions of every prompt in one continuous batch. Returns the completions and
        {'tokens': generated tokens, 'seconds': wall time, 'tokens_per_s'}."""
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        try:
            ids = []
            for p, seed in zip(prompt_ids, seeds):
                rid = f"rollout-{self._counter}"
                self._counter += 1
                params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, seed=seed, logprobs=0, stop=list(stop or []) or None,
                                        stop_token_ids=self.stop_token_ids or None)
                self.engine.add_request(rid, p, params)
                ids.append(rid)
            final = {}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            self.model.train(was_training)
        dt = time.perf_counter() - t0
        groups, tokens = [], 0
        for rid in ids:
            outs = sorted(final[rid].outputs, key=lambda c: c.index)
            group = []
            for c in outs:
                lps = [lp[tok] for tok, lp in zip(c.token_ids, c.logprobs or [])]
                group.append(Completion(list(c.token_ids), c.text, c.finish_reason or "length", lps))
                tokens += len(c.token_ids)
            groups.append(group)
        self.tokens_total += tokens
        self.seconds_total += dt
        return groups, {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
