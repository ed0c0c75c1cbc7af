"""Request outputs: detokenization, stop conditions and the deltas each step reports.

The engine hands every sampled token to ``OutputProcessor.append``, which applies the stop rules in
vLLM's order (stop token, stop string, then length) and says whether the sequence finishes and why.
Stop strings are matched on the detokenized text and cut out; while a request streams, the last
``len(longest stop) - 1`` characters are held back so a stop string that spans a token boundary is never
leaked. ``request_output`` turns a request's sequences into the ``RequestOutput`` callers see, with the
text and tokens added since the previous one (``delta_text``, ``delta_token_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


class _Detok:
    """Fallback incremental detokenizer for a tokenizer without ``detokenizer()``: re-decodes the
    output and holds back a trailing replacement character (half of a multi-byte character)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def step(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        new, self.text = full[len(self.text):], full
        return new


@dataclass
class SeqOutput:
    """What one sequence has produced as text so far, and how much of it was already reported."""

    stop_ids: list[int]
    detok: Any = None
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None


Finish = tuple[str, str | int | None]
"""(finish_reason, stop_reason): "stop" with the stop string or token id (None for EOS), or "length"."""


class OutputProcessor:
    """Detokenizes and checks stop conditions for the engine's sequences (one per engine)."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len

    def new_seq(self, prompt_ids: list[int], params: SamplingParams) -> SeqOutput:
        """The output state of a new sequence: its stop ids (EOS unless ``ignore_eos``) and a detokenizer
        primed with the prompt."""
        stop_ids = list(params.stop_token_ids or [])
        if not params.ignore_eos and self.eos_token_id is not None:
            stop_ids.append(self.eos_token_id)
        out = SeqOutput(stop_ids, logprobs=[] if params.logprobs is not None else None)
        if self.tokenizer is not None:
            d = getattr(self.tokenizer, "detokenizer", None)
            if d is None:
                out.detok = _Detok(self.tokenizer)
            else:  # special tokens kept only when asked (the chat parsers see <tool_call>, </think>, ...)
                out.detok = d(prompt_ids) if params.skip_special_tokens else d(prompt_ids, False)
        return out

    def append(self, seq: Sequence, out: SeqOutput, tok: int, lp: dict[int, float] | None) -> Finish | None:
        """Add the sampled token ``tok`` (already appended to ``seq``) to the text; returns why the sequence
        finishes, or None. Stop rules in vLLM's order: stop token, stop string, then length."""
        p = seq.params
        if out.logprobs is not None:
            out.logprobs.append(lp)
        n_out = seq.num_output_tokens
        if tok in out.stop_ids and n_out >= p.min_tokens:
            reason = None if tok == self.eos_token_id and tok not in (p.stop_token_ids or []) else tok
            return self._flush(out, ("stop", reason))
        if out.detok is not None:
            before = len(out.text)
            out.text += out.detok.step([tok])
            if p.stop and n_out >= p.min_tokens:
                longest = max(len(s) for s in p.stop)
                window_start = max(0, before - longest + 1)
                hits = [(out.text.find(s, window_start), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    out.text = out.text[:i]  # cut at the stop string: nothing after it is flushed
                    return "stop", s
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return self._flush(out, ("length", None))
        return None

    @staticmethod
    def _flush(out: SeqOutput, finish: Finish) -> Finish:
        """Finishing without a stop string: add a character the detokenizer still holds."""
        flush = getattr(out.detok, "finish", None)
        if flush is not None:
            out.text += flush()
        return finish

    @staticmethod
    def completion(seq: Sequence, out: SeqOutput) -> CompletionOutput:
        """The sequence's output so far; its deltas are what was not reported before (and are now)."""
        visible = len(out.text)
        if not seq.is_finished and seq.params.stop:  # hold back what could start a stop string
            visible = max(out.emitted_chars, visible - max(len(s) for s in seq.params.stop) + 1)
        out_ids = seq.output_token_ids
        result = CompletionOutput(
            index=seq.index, text=out.text[:visible], token_ids=out_ids, finish_reason=seq.finish_reason,
            logprobs=list(out.logprobs) if out.logprobs is not None else None,
            delta_text=out.text[out.emitted_chars:visible], delta_token_ids=out_ids[out.emitted_tokens:],
            stop_reason=seq.stop_reason)
        out.emitted_chars, out.emitted_tokens = visible, len(out_ids)
        return result
