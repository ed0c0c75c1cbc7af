"""Per-sequence logits processors: logit_bias, allowed ids, a thinking budget, and grammar token masks.

The sampler calls `apply_processors(logits [S, V], seqs)` once per step, after penalties and before
any token is picked; each sequence keeps its own processors in `seq.state.sampling.processors`
(built by `build_processors` when a request is added). Processors read the sequence's tokens so far,
so they hold no engine hooks: preemption (recompute) and n>1 forks change nothing for them.

Structured output runs on llguidance (Microsoft's grammar engine; vLLM and FastDeploy offer it beside
xgrammar). Both install here on CPU and both can take a byte-fallback SentencePiece vocabulary; llguidance
was chosen because it is one self-contained wheel (xgrammar pulls in apache-tvm-ffi), it takes our
tokenizer as it is (the bytes of every id from `Tokenizer._bytes`, no HF tokenizer object), and one grammar
language covers every request kind: JSON schema, regex, Lark with JSON schemas nested inside it (the
`<tool_call>` grammar of forced tool calls below) and GBNF through its converter. Masks are computed in
Rust, a fraction of a millisecond per row (benchmarks/results/2026-12-04-structured.md); the masks of all
constrained rows of a step go into one [R, V/32] bitmask applied to the batch at once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

# JSON is emitted compactly (no optional whitespace): a model that is not good at JSON cannot pad
# the output with endless spaces, and every sample parses. Unknown schema keywords are an error (400).
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


class GrammarError(ValueError):
    """A constraint that does not compile (bad schema, regex or grammar); the message says which."""


# --------------------------------------------------------------------------------------- tokenizer
class _TokenTable:
    """What llguidance needs of a tokenizer: each id's bytes, EOS/BOS, the special ids, encode()."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        table = list(tokenizer._bytes)[:vocab_size]
        # ids past the tokenizer (the embedding is padded to 103424 rows) are never produced
        self.tokens = table + [b""] * (vocab_size - len(table))
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(i for i in tokenizer.all_special_ids if i < vocab_size)
        self._tok = tokenizer

    def __call__(self, s: bytes | str) -> list[int]:
        return self._tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)


@lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """The llguidance tokenizer of `tokenizer` for a model with `vocab_size` logits (built once)."""
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokenizer, vocab_size)), n_vocab=vocab_size)


def lark_string(s: str) -> str:
    """A Lark string literal matching exactly `s` (JSON escapes are Lark's)."""
    return json.dumps(s, ensure_ascii=False)


def grammar_of(spec: dict[str, Any]) -> str:
    """llguidance grammar text of a SamplingParams.structured spec."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    (kind, value), = spec.items()
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise GrammarError("choice must be a list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(lark_string(c) for c in value))
    if kind == "grammar":  # vLLM's guided_grammar is GBNF/EBNF; Lark is accepted as well
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
        except Exception as e:  # the converter raises its own errors on bad GBNF
            raise GrammarError(f"grammar: {e}") from None
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise GrammarError(f"unknown constraint kind {kind!r}")


def tool_call_lark(functions: list[dict], *, parallel: bool, open_tag: str = "<tool_call>",
                   close_tag: str = "</tool_call>") -> str:
    """Lark for one (or, with `parallel`, several) `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    blocks, the arguments constrained to each function's JSON schema (ERNIE's Hermes-like wire format)."""
    alts = []
    for f in functions:
        params = f.get("parameters") or {"type": "object"}
        schema = {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": JSON_OPTIONS}
        alts.append("%json " + json.dumps(schema, ensure_ascii=False))
    call = f"call: {lark_string(open_tag + chr(10))} body {lark_string(chr(10) + close_tag)}"
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, call, "body: " + " | ".join(alts)])


# ------------------------------------------------------------------------------------ processors
def _ends_with_text(tokenizer: Any, ids: list[int], text: str, n_ids: int) -> bool:
    """Whether the decoded tail of `ids` (special tokens kept) ends with `text`."""
    if not ids:
        return False
    return tokenizer.decode(ids[-n_ids:], skip_special_tokens=False).endswith(text)


class LogitBias:
    def __init__(self, bias: dict[int, float], vocab_size: int):
        bad = [t for t in bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, seq: Any, logits_V: torch.Tensor) -> None:
        logits_V.index_add_(0, self.ids.to(logits_V.device), self.values.to(logits_V.device))


class AllowedTokens:
    def __init__(self, ids: list[int], vocab_size: int):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"allowed_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        self.keep = torch.zeros(vocab_size, dtype=torch.bool)
        self.keep[ids] = True

    def __call__(self, seq: Any, logits_V: torch.Tensor) -> None:
        logits_V.masked_fill_(~self.keep.to(logits_V.device), float("-inf"))


class ReasoningBudget:
    """After `budget` output tokens with the thinking section still open, force the closing marker's tokens.

    The section counts as closed once the decoded output contains `end_text` (special tokens kept)."""

    def __init__(self, tokenizer: Any, budget: int, end_text: str):
        self.tokenizer, self.budget, self.end_text = tokenizer, budget, end_text
        self.end_ids = tokenizer.encode(end_text)
        self.closed_at: int | None = None  # output length when the marker was seen
        self._checked = 0

    def closed(self, out: list[int]) -> bool:
        if self.closed_at is None:
            window = len(self.end_ids) + 4
            for n in range(self._checked + 1, len(out) + 1):
                if _ends_with_text(self.tokenizer, out[:n], self.end_text, window):
                    self.closed_at = n
                    break
            self._checked = len(out)
        return self.closed_at is not None

    def __call__(self, seq: Any, logits_V: torch.Tensor) -> None:
        out = seq.output_token_ids
        if self.closed(out) or len(out) < self.budget:
            return
        j = len(out) - self.budget
        if j < len(self.end_ids):
            forced = self.end_ids[j]
            logits_V.fill_(float("-inf"))
            logits_V[forced] = 0.0


class GrammarMatcher:
    """One llguidance matcher per sequence; fills its row of the step's bitmask.

    With `start_after` (a thinking template's "</think>"), the grammar applies only to the tokens after
    that text: the reasoning before it is free, as in vLLM's reasoning-aware structured output."""

    batched = True

    def __init__(self, ll_tok: Any, grammar: str, stop_ids: list[int], tokenizer: Any,
                 start_after: str | None = None):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the output constraint does not compile: {self.matcher.get_error()}")
        self.stop_ids = list(stop_ids)
        self.start = None if start_after else 0
        self.gate = ReasoningBudget(tokenizer, 1 << 30, start_after) if start_after else None
        self.consumed = 0  # output tokens already given to the matcher (from self.start on)

    def active(self, seq: Any) -> bool:
        out = seq.output_token_ids
        if self.start is None:
            if not self.gate.closed(out):
                return False
            self.start = self.gate.closed_at
        new = out[self.start + self.consumed:]
        if new:
            # a token the mask did not allow (e.g. a forced stop) puts the matcher in its error state
            self.matcher.consume_tokens(new)
            self.consumed += len(new)
        return True

    def fill(self, bitmask_row: torch.Tensor) -> None:
        # (llguidance.torch would do the same, but importing it pulls in torch.compile's inductor: seconds)
        if self.matcher.is_error():  # nothing can continue: let the sequence stop
            bitmask_row.zero_()
        else:
            assert bitmask_row.is_contiguous() and bitmask_row.dtype == torch.int32
            self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        if self.matcher.is_error() or self.matcher.is_accepting():
            # the grammar may end here: every stop token of the request ends it, not only llguidance's EOS
            for t in self.stop_ids:
                bitmask_row[t // 32] |= _bit(t % 32)


def _bit(i: int) -> int:
    return -(1 << 31) if i == 31 else 1 << i  # int32 bit pattern


def apply_bitmask_(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor) -> None:
    """-inf where the bit of a token is 0; bitmask [R, ceil(V/32)] int32, bit t%32 of word t//32."""
    v = logits_RV.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask_RW.unsqueeze(-1) >> shifts) & 1).reshape(bitmask_RW.shape[0], -1)[:, :v]
    logits_RV.masked_fill_(bits.to(logits_RV.device) == 0, float("-inf"))


def apply_processors(logits_SV: torch.Tensor, seqs: list[Any]) -> None:
    """Run every sequence's processors on its row of `logits_SV` (in place); grammar masks as one batch."""
    rows, matchers = [], []
    for i, q in enumerate(seqs):
        procs = q.state.sampling.processors if q.state is not None else ()
        for p in procs:
            if getattr(p, "batched", False):
                if p.active(q):
                    rows.append(i)
                    matchers.append(p)
            else:
                p(q, logits_SV[i])
    if rows:
        bitmask = torch.empty(len(rows), (logits_SV.shape[-1] + 31) // 32, dtype=torch.int32)
        for j, m in enumerate(matchers):
            m.fill(bitmask[j])
        idx = torch.tensor(rows, device=logits_SV.device)
        sub = logits_SV[idx]
        apply_bitmask_(sub, bitmask)
        logits_SV[idx] = sub


def build_processors(params: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> list:
    """The processors a SamplingParams asks for (empty for plain sampling). Raises ValueError (a 400)
    for ids outside the vocabulary or a constraint that does not compile."""
    procs: list = []
    if params.logit_bias:
        procs.append(LogitBias(params.logit_bias, vocab_size))
    if params.allowed_token_ids:
        procs.append(AllowedTokens(params.allowed_token_ids, vocab_size))
    if params.max_reasoning_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_reasoning_tokens needs a tokenizer")
        procs.append(ReasoningBudget(tokenizer, params.max_reasoning_tokens, params.reasoning_end))
    if params.structured is not None:
        if tokenizer is None or not hasattr(tokenizer, "_bytes"):
            raise ValueError("structured output needs the checkpoint's SentencePiece tokenizer")
        try:
            grammar = grammar_of(params.structured)
        except ValueError as e:
            raise GrammarError(f"the output constraint is invalid: {e}") from None
        procs.append(GrammarMatcher(ll_tokenizer(tokenizer, vocab_size), grammar, stop_ids, tokenizer,
                                    start_after=params.reasoning_end))
    return procs
