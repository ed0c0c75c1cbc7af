"""Per-request sampling parameters (the vLLM names and defaults users already know)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ernie45.engine.errors import RequestError


@dataclass
class SamplingParams:
    """How to sample one request. Every field is validated in ``__post_init__``."""

    n: int = 1
    """Completions per prompt; siblings share the prompt's KV blocks."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p x the most likely token's."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens seen in prompt or output: positive logits / p, negative x p."""
    presence_penalty: float = 0.0
    """OpenAI: subtract this from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract this x (times generated) from each token's logit."""
    seed: int | None = None
    """Per-request generator: the same seed gives the same output whatever else is in the batch."""
    max_tokens: int | None = 16
    """Generated tokens at most; None means until the context (max_model_len) is full."""
    min_tokens: int = 0
    """EOS and stop_token_ids are suppressed until this many tokens are generated."""
    stop: list[str] | str | None = None
    """Stop strings; generation ends at the first one and it is cut out of the text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids, not rendered in the text)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token."""
    logprobs: int | None = None
    """Return top-k logprobs per generated token (0 = only the chosen token's); raw model distribution."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text (vLLM's default); False keeps them, e.g. for tool-call parsers."""
    logit_bias: dict[int, float] | None = None
    """OpenAI: added to the logit of each token id before sampling (-100 bans, +100 forces in practice)."""
    allowed_token_ids: list[int] | None = None
    """vLLM: sample only among these ids."""
    structured: dict[str, Any] | None = None
    """Output constraint, one of {"json": schema} {"json_object": True} {"regex": r} {"choice": [...]}
    {"grammar": lark or GBNF} {"lark": lark}; a token mask per step (ernie45.engine.structured)."""
    reasoning_end: str | None = None
    """Text that closes a thinking section ("</think>"): the constraint starts after it, the budget forces it."""
    max_reasoning_tokens: int | None = None
    """Thinking budget: after this many tokens without `reasoning_end`, its tokens are forced."""

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> RequestError:
            return RequestError(f"SamplingParams.{field}={getattr(self, field)!r}: {rule}", param=field)

        def finite(field: str) -> float:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(field, "must be a finite number")
            return float(v)

        def integer(field: str) -> int:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(field, "must be an integer")
            return v

        if integer("n") < 1:
            raise bad("n", "must be >= 1")
        if finite("temperature") < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < finite("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if integer("top_k") < -1:
            raise bad("top_k", "must be >= 1, or 0 / -1 for no limit")
        if not 0 <= finite("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if finite("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if not -2 <= finite("presence_penalty") <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= finite("frequency_penalty") <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None:
            integer("seed")
        if self.max_tokens is not None and integer("max_tokens") < 1:
            raise bad("max_tokens", "must be >= 1 or None (until the context is full)")
        if integer("min_tokens") < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
                raise bad("stop", "must be a non-empty string or a list of non-empty strings")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise bad("stop_token_ids", "must be a list of non-negative token ids")
            self.stop_token_ids = list(ids)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be True or False")
        if self.logprobs is not None and integer("logprobs") < 0:
            raise bad("logprobs", "must be >= 0 (0 = only the chosen token) or None")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be True or False")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float))
                    and math.isfinite(v) for k, v in self.logit_bias.items()):
                raise bad("logit_bias", "must map token ids (int >= 0) to finite numbers")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise bad("allowed_token_ids", "must be a non-empty list of token ids")
        kinds = ("json", "json_object", "regex", "choice", "grammar", "lark")
        if self.structured is not None and (not isinstance(self.structured, dict) or len(self.structured) != 1
                                            or next(iter(self.structured)) not in kinds):
            raise bad("structured", f"must be one {{kind: value}} with kind in {kinds}")
        if self.max_reasoning_tokens is not None:
            if integer("max_reasoning_tokens") < 1:
                raise bad("max_reasoning_tokens", "must be >= 1")
            if not self.reasoning_end:
                raise bad("max_reasoning_tokens", "needs reasoning_end, the text that closes the thinking section")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
