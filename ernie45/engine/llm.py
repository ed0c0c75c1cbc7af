"""``LLMEngine`` (add_request / step / abort) and the offline ``LLM`` facade.

One step = schedule -> one forward over every scheduled token (the runner the engine was given) -> sample
the sequences that reached their last token -> detokenize and check stop conditions (``engine/output.py``),
free finished sequences -> outputs of the requests that changed. ``add_request`` is where every request is
validated (prompt, token ids, lengths; ``SamplingParams`` checks its own ranges).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from ernie45.accel import accelerate, backend_of
from ernie45.config import ModelConfig
from ernie45.engine.block_manager import BlockManager
from ernie45.engine.errors import QueueFullError, RequestError
from ernie45.engine.kv_cache import KVCache
from ernie45.engine.model_runner import ModelRunner, MTPItem
from ernie45.engine.output import OutputProcessor, RequestOutput, SeqOutput
from ernie45.engine.sampler import Sampler, SeqSampling, make_generator, raw_logprobs
from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.scheduler import Scheduler
from ernie45.engine.sequence import Sequence, SequenceStatus
from ernie45.engine.speculative import Draft, DraftController, draft_tokens, plain_greedy, verify, verify_greedy
from ernie45.engine.structured import build_processors
from ernie45.model.model import ErnieForCausalLM
from ernie45.utils import resolve_dtype

log = logging.getLogger(__name__)

MTP_DEFER_MAX = 128
"""With ``speculative_adaptive`` not drafting: a sequence's deferred MTP pairs run once this many have gathered."""


@dataclass
class _SeqState:
    """What the engine keeps per sequence: the sampler's state (``seq.state.sampling``) and the output's."""

    sampling: SeqSampling
    output: SeqOutput


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: dict


def _load_tokenizer(folder: str):  # noqa: ANN202 - Tokenizer | None; the module may not exist yet
    try:
        from ernie45.loading import load_tokenizer
    except ImportError:
        log.warning("ernie45.tokenizer is not available: only token-id prompts are accepted")
        return None
    return load_tokenizer(folder)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache. See the module docstring for one step."""

    def __init__(self, model: str | ErnieForCausalLM = "demo", *, tokenizer=None, dtype="bfloat16",  # noqa: ANN001
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_cache_memory: int | str | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, max_waiting: int | None = None,
                 runner: type[ModelRunner] = ModelRunner, max_logprobs: int = 20, strict_max_tokens: bool = False,
                 speculative_tokens: int = 0, speculative_draft_quant: str | None = None,
                 speculative_adaptive: bool = False, backend: str = "auto", **load_options) -> None:
        """speculative_tokens: draft this many tokens a step with the model's MTP block and verify them in one
        forward (``engine/speculative.py``; 0 = off, the output is the same either way).
        speculative_draft_quant: quantize the model's MTP block (its decoder layer and input projection) in place
        with this preset ("int8", "int4": ``ernie45.quant``) before the backend is applied, so that a draft runs
        the backend's quantized kernels (the CPU backend: the whole layer as one native call). Only the drafts
        change (their acceptance may); the output stays exact. None keeps the block as loaded.
        speculative_adaptive: draft only while that is measured to be faster than plain decoding
        (``engine.speculative.DraftController``: windows of steps in each mode, the faster one kept, the other
        re-tried now and then). While it does not draft, the MTP block's pass over each step's new positions is
        deferred and run over up to :data:`MTP_DEFER_MAX` positions at once, or when drafting resumes, so plain
        steps pay nearly nothing for it. The output is the same either way.
        max_logprobs: the most top logprobs a request may ask for (OpenAI's and vLLM's 20).
        strict_max_tokens: refuse a request whose prompt plus ``max_tokens`` exceeds ``max_model_len`` (the
        OpenAI server's rule) instead of ending it there with finish_reason "length".
        runner: the class that runs each step's forward; ``ModelRunner`` on one process,
        ``ernie45.parallel.runner.DistributedModelRunner`` on rank 0 of a model split by ``ernie45.parallel``
        (its KV cache is sized with ``runner.cache_config(model)``: that rank's heads only).
        backend: the acceleration backend ("auto", "cpu", "torch"; ``ernie45.accel.accelerate``), applied to the
        model in place after it is built, quantized, loaded and sharded; "auto" keeps one already applied to a given
        model, else takes the native CPU kernels where they run. The name is ``self.backend``."""
        if isinstance(model, ErnieForCausalLM):
            if load_options:
                raise TypeError(f"load options {sorted(load_options)} need a checkpoint path, not a built model")
            self.model = model
        else:
            from ernie45.loading import load_model
            from ernie45.model.checkpoint import resolve_model_path

            folder = resolve_model_path(model)
            self.model = load_model(folder, dtype=resolve_dtype(dtype), **load_options)
            if tokenizer is None:
                tokenizer = _load_tokenizer(folder)
        self.model.eval()
        if speculative_draft_quant is not None:
            self._quantize_draft(speculative_tokens, speculative_draft_quant)
        accelerate(self.model, backend)  # the last pass: build -> quantize swap -> load -> shard -> accelerate
        accel = backend_of(self.model)
        self.backend: str = accel.name
        self.tokenizer = tokenizer
        self.config: ModelConfig = self.model.config
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} must be >= 2")
        limit = self.config.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
        max_model_len = max_model_len or limit
        param = next(self.model.parameters())
        cache_dtype = self.model.model.embed_tokens.weight.dtype
        if runner is ModelRunner and getattr(self.model, "parallel_mesh", None) is not None:
            raise ValueError("this model is split over ranks by ernie45.parallel: run the engine on rank 0 with "
                             "runner=ernie45.parallel.runner.DistributedModelRunner and worker_loop(model) on the "
                             "other ranks")
        kv_config = runner.cache_config(self.model)
        if (not isinstance(speculative_tokens, int) or isinstance(speculative_tokens, bool)
                or not 0 <= speculative_tokens <= 16):
            raise ValueError(f"speculative_tokens={speculative_tokens!r} must be an integer in [0, 16] (0 = off)")
        if speculative_tokens and not self.model.has_mtp:
            raise ValueError("speculative_tokens needs the checkpoint's MTP block (model.mtp_* tensors, "
                             "num_nextn_predict_layers >= 1); this model has none: use speculative_tokens=0")
        if speculative_tokens and runner is not ModelRunner:
            raise ValueError("speculative decoding runs on the single-process runner only for now; "
                             "use speculative_tokens=0 with --tp/--ep")
        self.speculative_tokens = speculative_tokens
        if speculative_adaptive and not speculative_tokens:
            raise ValueError("speculative_adaptive switches drafting on and off; it needs speculative_tokens > 0")
        self.draft_controller = DraftController() if speculative_adaptive else None
        self._clock = time.perf_counter  # the controller's step timer (tests replace it)
        self.kv_cache = KVCache.from_budget(kv_config, cache_dtype, block_size, kv_cache_memory, param.device,
                                            max_tokens=max_num_seqs * max_model_len,
                                            extra_layers=1 if speculative_tokens else 0)
        if max_model_len > self.kv_cache.capacity_tokens:
            log.warning("max_model_len %d exceeds the KV cache (%d tokens); capping it", max_model_len,
                        self.kv_cache.capacity_tokens)
            max_model_len = self.kv_cache.capacity_tokens
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(self.kv_cache.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = runner(self.model, self.kv_cache, accel.attention(self.kv_cache))
        self.sampler = Sampler(argmax=accel.argmax)
        self.max_waiting = max_waiting
        self.max_logprobs = max_logprobs
        self.strict_max_tokens = strict_max_tokens
        self.requests: dict[str, _Request] = {}
        self._pending: dict[str, _Request] = {}  # aborted: final output due at the next step()
        self.generation_tokens_total = 0
        self.prompt_tokens_total = 0
        self.spec_draft_tokens = 0       # drafts verified
        self.spec_accepted_tokens = 0    # drafts accepted
        self.spec_verify_steps = 0       # verifications (one sequence, one step)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.output = OutputProcessor(tokenizer, eos if eos is not None else self.config.eos_token_id, max_model_len)

    def _quantize_draft(self, speculative_tokens: int, scheme: str) -> None:
        """``speculative_draft_quant``: the MTP block's linears quantized in place (before ``accelerate``)."""
        from ernie45.quant.quantize import quantize_model
        from ernie45.quant.scheme import QuantConfig

        if not speculative_tokens or not self.model.has_mtp:
            raise ValueError(f"speculative_draft_quant={scheme!r} quantizes the MTP block that drafts; it needs "
                             f"speculative_tokens > 0 and a model with an MTP block")
        try:
            config = QuantConfig.from_name(scheme)
        except ValueError as e:
            raise ValueError(f"speculative_draft_quant: {e}") from None
        with torch.no_grad():
            for part in (self.model.model.mtp_linear_proj, self.model.model.mtp_block):
                quantize_model(part, config, progress=False)

    @property
    def eos_token_id(self) -> int | None:
        return self.output.eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value: int | None) -> None:
        self.output.eos_token_id = value

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a prompt (text, or token ids). Raises ValueError for a bad request and QueueFullError
        when ``max_waiting`` requests are already waiting."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests or request_id in self._pending:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if self.max_waiting is not None and len(self.scheduler.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting (max_waiting="
                                 f"{self.max_waiting}); retry later")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer (this checkpoint has no tokenizer.model); "
                                   "pass token ids instead", param="prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        self.check_request(ids, params)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, ids, params, index=i, arrival=seqs[0].arrival if seqs else None)
            out = self.output.new_seq(ids, params)
            procs = build_processors(params, self.tokenizer, self.config.vocab_size, out.stop_ids)
            seq.state = _SeqState(SeqSampling(make_generator(params.seed, i, self.runner.device), out.stop_ids, procs),
                                  out)
            seqs.append(seq)
        for child in seqs[1:]:
            child.status = SequenceStatus.FORK_PENDING
        seqs[0].children = seqs[1:]
        self.requests[request_id] = _Request(request_id, text, ids, params, seqs,
                                             {"arrival_time": time.monotonic(), "first_token_time": None,
                                              "finished_time": None})
        self.scheduler.add(seqs[0])
        self.prompt_tokens_total += len(ids)

    def check_request(self, ids: list[int], params: SamplingParams | None, score_only: bool = False) -> None:
        """Raise ``RequestError`` (naming the field at fault) for a request this engine cannot run: the one
        place requests are validated; ``SamplingParams`` has checked its own ranges already. ``params`` None with
        ``score_only``: a prompt only scored (the server's echo / prompt_logprobs), which may fill the context."""
        vocab = self.config.vocab_size
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab}): token id {bad!r} is outside the "
                               f"vocabulary", param="prompt")
        if not ids:
            raise RequestError("the prompt is empty: it must contain at least one token", param="prompt")
        limit = self.max_model_len
        if len(ids) > limit or (len(ids) == limit and not score_only):
            raise RequestError(f"This model's maximum context length is {limit} tokens, but the prompt has {len(ids)} "
                               f"tokens, which leaves no room to generate: shorten the prompt (or give a larger "
                               f"kv_cache_memory / max_model_len; the KV cache holds {self.kv_cache.capacity_tokens} "
                               f"tokens)", param="prompt", code="context_length_exceeded")
        if params is None:
            return
        room = limit - len(ids)
        if self.strict_max_tokens and params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(f"This model's maximum context length is {limit} tokens; the request asks for "
                               f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} to "
                               f"generate): lower max_tokens to at most {room}", param="max_tokens",
                               code="context_length_exceeded")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise RequestError(f"logprobs={params.logprobs} exceeds this engine's max_logprobs={self.max_logprobs}",
                               param="logprobs")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer to detokenize the output; use stop_token_ids",
                               param="stop")

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its final output (finish_reason "abort") comes from
        the next ``step()``. Unknown or finished ids are ignored (the request may have just ended)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        req.metrics["finished_time"] = time.monotonic()
        self._pending[request_id] = req

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._pending)

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "num_running": len(s.running), "num_waiting": len(s.waiting),
            "kv_blocks_used": self.block_manager.num_used_blocks, "kv_blocks_total": self.block_manager.num_blocks,
            "prompt_tokens_total": self.prompt_tokens_total, "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens, "num_preemptions": s.num_preemptions,
            "prompt_tokens_computed": s.prompt_tokens_computed, "backend": self.backend,
            "spec_draft_tokens": self.spec_draft_tokens, "spec_accepted_tokens": self.spec_accepted_tokens,
            "spec_verify_steps": self.spec_verify_steps,
            "spec_acceptance_rate": self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens
            else None,
            "spec_mean_accepted_length": ((self.spec_accepted_tokens + self.spec_verify_steps) / self.spec_verify_steps
                                          if self.spec_verify_steps else None),
            **self._adaptive_stats(),
        }

    def _adaptive_stats(self) -> dict:
        c = self.draft_controller
        if c is None:
            return {}
        last = c.buckets.get(c.last)
        return {"spec_drafting": c.drafting, "spec_steps_drafting": c.steps[True], "spec_steps_plain": c.steps[False],
                "spec_mode_switches": c.switches,  # the last step's batch-size bucket's measurements:
                "spec_tok_s_drafting": last.rate[True] if last else None,
                "spec_tok_s_plain": last.rate[False] if last else None}

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One scheduler step; returns the outputs of the requests that changed (new tokens, finished,
        aborted)."""
        changed: dict[str, _Request] = dict(self._pending)
        self._pending.clear()
        t0 = self._clock() if self.draft_controller is not None else 0.0  # the adaptive controller's step timer
        tokens0 = self.generation_tokens_total
        out = self.scheduler.schedule()
        if out.is_empty and self.scheduler.waiting and not self.scheduler.running:
            # add_request's length check and the max_model_len cap make this unreachable; fail loudly
            # rather than spin if an invariant breaks.
            raise RuntimeError(f"scheduler stalled: {self.scheduler.waiting[0]!r} cannot be scheduled "
                               f"with {self.block_manager.num_free_blocks} free blocks")
        if not out.is_empty:
            seqs, logits = self.runner.execute(out.scheduled)
            self.scheduler.update(out)
            accepted: dict[int, int] = {}
            if seqs:
                with torch.inference_mode():
                    if self.speculative_tokens and any(sch.num_spec for sch in out.scheduled):
                        accepted = self._sample_speculative(seqs, logits, out)
                    else:
                        tokens, logprobs = self.sampler(logits, seqs)
                        for seq, tok, lp in zip(seqs, tokens, logprobs):
                            self._append(seq, tok, lp)
                now = time.monotonic()
                for seq in seqs:
                    req = self.requests[seq.request_id]
                    if req.metrics["first_token_time"] is None:
                        req.metrics["first_token_time"] = now
                    changed[req.request_id] = req
            if self.speculative_tokens:
                self._propose(accepted, len(out.scheduled))
            if self.draft_controller is not None:
                self.draft_controller.record(self.generation_tokens_total - tokens0, self._clock() - t0,
                                             len(out.scheduled))
        outputs = []
        for req in changed.values():
            finished = all(s.is_finished for s in req.seqs)
            if finished and req.request_id in self.requests:
                del self.requests[req.request_id]
                req.metrics["finished_time"] = time.monotonic()
            outputs.append(self._output(req, finished))
        return outputs

    # ------------------------------------------------------------------ speculative decoding
    def _sample_speculative(self, seqs: list[Sequence], logits: torch.Tensor, out) -> dict[int, int]:  # noqa: ANN001
        """Plain sampling for the sequences without drafts; verification (``engine.speculative.verify``) for the
        others, appending the accepted drafts and the token after them. Returns seq_id -> drafts kept."""
        rows = self.runner.last.logits_rows
        nspec = {sch.seq.seq_id: sch.num_spec for sch in out.scheduled}
        plain = [s for s in seqs if not nspec[s.seq_id]]
        if plain:
            idx = torch.tensor([rows[s.seq_id] for s in plain], device=logits.device)
            tokens, logprobs = self.sampler(logits[idx], plain)
            for seq, tok, lp in zip(plain, tokens, logprobs):
                seq.draft = None
                self._append(seq, tok, lp)
        kept: dict[int, int] = {}
        spec = [s for s in seqs if nspec[s.seq_id]]
        # Plain greedy sequences: one argmax over all their verified rows, then a comparison per sequence.
        fast = [s for s in spec if plain_greedy(s)]
        best: dict[int, list[int]] = {}
        if fast:
            n_rows = sum(nspec[s.seq_id] + 1 for s in fast)
            if n_rows == logits.shape[0]:  # every row: no gather (rows of one sequence are contiguous, in order)
                fast_logits = logits
                order = sorted(fast, key=lambda s: rows[s.seq_id])
            else:
                order = fast
                fast_logits = logits[torch.tensor([r for s in fast for r in range(
                    rows[s.seq_id], rows[s.seq_id] + nspec[s.seq_id] + 1)], device=logits.device)]
            top = self.sampler.argmax(fast_logits) if self.sampler.argmax is not None else None
            top = (top if top is not None else fast_logits.argmax(-1)).tolist()
            start = 0
            for s in order:
                best[s.seq_id] = top[start:start + nspec[s.seq_id] + 1]
                start += nspec[s.seq_id] + 1
        for seq in spec:
            k = nspec[seq.seq_id]
            r = rows[seq.seq_id]
            full = seq.draft
            seq.draft = None
            if seq.seq_id in best:
                a, toks = verify_greedy(best[seq.seq_id], full.tokens[:k])
            else:
                draft = Draft(full.tokens[:k], full.probs[:k] if full.probs is not None else None)
                a, toks = verify(logits[r:r + k + 1], seq, draft)
            self.spec_draft_tokens += k
            self.spec_accepted_tokens += a
            self.spec_verify_steps += 1
            want = seq.params.logprobs
            raw = logits[r:r + k + 1].float().log_softmax(-1) if want is not None else None
            kept[seq.seq_id] = 0
            for j, tok in enumerate(toks):
                lp = raw_logprobs(raw[j:j + 1], [tok], [want])[0] if raw is not None else None
                self._append(seq, tok, lp)
                if seq.is_finished:
                    break
                if j < a:  # an accepted draft: its keys/values were computed by the verification
                    seq.num_computed_tokens += 1
                    kept[seq.seq_id] += 1
            if not seq.is_finished:
                self.block_manager.trim(seq, seq.num_tokens)  # the rejected drafts' cache slots
                self.block_manager.commit(seq)
        return kept

    def _propose(self, kept: dict[int, int], batch: int) -> None:
        """Run the MTP block over the positions this step made valid (filling its cache slot), and draft up to
        ``speculative_tokens`` tokens for each sequence that sampled, to verify at its next step. While an adaptive
        engine does not draft, a decode's pairs wait in ``seq.mtp_pending`` (the block's cache slot is only read by
        drafts) and run with the sequence's next item that does run."""
        layout = self.runner.last
        if layout is None or layout.hidden_TH is None:
            return
        drafting = self.draft_controller is None or self.draft_controller.mode(batch)
        items, budgets = [], []
        for sch, off, start in zip(layout.scheduled, layout.offsets, layout.starts):
            seq = sch.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            valid = sch.num_new_tokens - sch.num_spec + kept.get(seq.seq_id, 0)
            next_ids = seq.token_ids[start + 1:start + valid + 1]
            valid = len(next_ids)
            if not valid:
                continue
            hidden = layout.hidden_TH[off:off + valid]
            pend = seq.mtp_pending
            if pend is not None and pend[0] + pend[2] != start:  # recomputed since (a preemption) from before them
                pend = seq.mtp_pending = None
            if pend is not None or not drafting:
                if not drafting and start >= seq.num_prompt_tokens and valid <= 1 + self.speculative_tokens:
                    first, rows, n = pend if pend is not None else (start, [], 0)
                    pend = seq.mtp_pending = (first, [*rows, hidden.clone()], n + valid)
                    if pend[2] < MTP_DEFER_MAX:
                        continue
                    hidden, start, valid = torch.cat(pend[1]), pend[0], pend[2]
                elif pend is not None:  # the deferred pairs, then this step's
                    hidden, start, valid = torch.cat([*pend[1], hidden]), pend[0], pend[2] + valid
                seq.mtp_pending = None
                next_ids = seq.token_ids[start + 1:start + valid + 1]
            k = 0
            # no drafts under logits processors (grammar masks advance with each accepted token, not per draft)
            if drafting and seq.seq_id in layout.logits_rows and not seq.state.sampling.processors:
                p = seq.params
                k = min(self.speculative_tokens, self.max_model_len - seq.num_tokens - 1)
                if p.max_tokens is not None:
                    k = min(k, p.max_tokens - seq.num_output_tokens - 1)
                while k > 0 and not self.block_manager.can_allocate(seq, seq.num_tokens + k):
                    k -= 1
                if k > 0:
                    self.block_manager.allocate(seq, seq.num_tokens + k)
            items.append(MTPItem(seq, start, hidden, next_ids, k > 0))
            budgets.append(k)
        if not items:
            return
        with torch.inference_mode():
            hidden_IH, logits = self.runner.mtp(items)
            which = [i for i, k in enumerate(budgets) if k > 0]
            if not which:
                return
            seqs = [items[i].seq for i in which]
            ks = [budgets[i] for i in which]
            if len(which) < len(items):
                hidden_IH = hidden_IH[torch.tensor(which, device=hidden_IH.device)]
            argmax = self.sampler.argmax
            tok_S, q = draft_tokens(logits, seqs, argmax)
            tokens, q_rows = [tok_S], [q]
            kmax = max(ks)
            if kmax > 1:  # drafts 2..k: the block on its own output and draft, one decode row per sequence
                at = self.runner.draft_positions(seqs, ks)
                live, rows = list(range(len(seqs))), None
                for j in range(2, kmax + 1):
                    if any(ks[n] < j for n in live):  # some sequences have drafted all they may
                        keep = [m for m, n in enumerate(live) if ks[n] >= j]
                        live = [live[m] for m in keep]
                        idx = torch.tensor(keep, device=hidden_IH.device)
                        hidden_IH, tok_S = hidden_IH[idx], tok_S[idx]
                        rows = torch.tensor(live, device=hidden_IH.device)
                    hidden_IH, logits = self.runner.mtp_draft(at, j - 2, rows, hidden_IH, tok_S)
                    tok_S, q = draft_tokens(logits, [seqs[n] for n in live], argmax)
                    full = torch.zeros(len(seqs), dtype=tok_S.dtype, device=tok_S.device)
                    full[torch.tensor(live, device=tok_S.device)] = tok_S
                    q_full: list = [None] * len(seqs)
                    for m, n in enumerate(live):
                        q_full[n] = q[m]
                    tokens.append(full if len(live) < len(seqs) else tok_S)
                    q_rows.append(q_full if len(live) < len(seqs) else q)
            table = torch.stack(tokens, 1).tolist()  # [S, kmax]
        for n, seq in enumerate(seqs):
            qs = [q_rows[j][n] for j in range(ks[n])]
            seq.draft = Draft(table[n][:ks[n]], None if qs[0] is None else torch.stack(qs))

    def _append(self, seq: Sequence, tok: int, lp: dict | None) -> None:
        seq.append_token(tok)
        self.generation_tokens_total += 1
        finish = self.output.append(seq, seq.state.output, tok, lp)
        if finish is not None:
            self.scheduler.finish(seq, *finish)

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        outs = [self.output.completion(seq, seq.state.output) for seq in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             req.seqs[0].num_cached_tokens, dict(req.metrics))


class LLM:
    """Offline facade: ``LLM(model).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str | ErnieForCausalLM = "demo", **engine_kwargs) -> None:
        self.engine = LLMEngine(model, **engine_kwargs)
        self._counter = 0

    @property
    def tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    @property
    def backend(self) -> str:
        """The acceleration backend the engine runs ("cpu", "torch")."""
        return self.engine.backend

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order. A flat list of ints is one prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and
                                        all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        return self._run(list(prompts), params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the chat template and generate; stops on the tokenizer's stop ids (</s>,
        <|end_of_sentence|>)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this checkpoint has none")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        base = sampling_params or SamplingParams()
        stop_ids = list(dict.fromkeys((base.stop_token_ids or []) + list(tok.stop_token_ids)))
        params = dataclasses.replace(base, stop_token_ids=stop_ids)
        return self._run([tok.encode_chat(c) for c in convs], [params] * len(convs), False)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[r] for r in ids]
