"""Scheduler unit tests without a model: budget splitting, decode priority, preemption, forks."""

from __future__ import annotations

from ernie45.engine.block_manager import BlockManager
from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.scheduler import Scheduler
from ernie45.engine.sequence import Sequence, SequenceStatus


def make(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 32,
         prefix: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix), max_seqs, budget)


def step(s: Scheduler, max_out: int = 4, token: int = 7):
    """One step with a fake model: every sequence that samples gets ``token``; finish at max_out."""
    out = s.schedule()
    sampled = s.update(out)
    for q in sampled:
        q.append_token(token)
        if q.num_output_tokens >= max_out:
            s.finish(q, "length")
    return out


def test_long_prompt_is_split_into_chunks_under_the_budget():
    s = make(budget=32)
    q = Sequence("a", list(range(100)))
    s.add(q)
    sizes = [step(s).scheduled[0].num_new_tokens for _ in range(5)]
    assert sizes == [32, 32, 32, 4, 1]          # three full chunks, the tail, then a decode
    assert q.num_output_tokens == 2


def test_decodes_are_scheduled_before_prefill_chunks():
    s = make(budget=8)
    a = Sequence("a", [1, 2, 3])
    s.add(a)
    step(s)                                     # a prefilled, first token sampled
    b = Sequence("b", list(range(40)))
    s.add(b)
    out = step(s)
    got = {x.seq.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"a": 1, "b": 7}
    assert out.scheduled[0].seq is a
    out = step(s)                               # b is now a running prefill: still after a's decode
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs_and_fcfs():
    s = make(max_seqs=2, budget=100)
    seqs = [Sequence(str(i), [1, 2, 3, i]) for i in range(3)]
    for q in seqs:
        s.add(q)
    out = step(s, max_out=100)
    assert [x.seq for x in out.scheduled] == seqs[:2] and list(s.waiting) == [seqs[2]]


def test_preemption_picks_the_newest_and_everything_completes():
    # 6 blocks of 4 tokens; three requests of 8-token prompts each growing to 16 tokens cannot all fit.
    s = make(num_blocks=6, block_size=4, budget=64, prefix=False)
    seqs = [Sequence(str(i), [i] * 8) for i in range(3)]
    for q in seqs:
        s.add(q)
    first_victim = None
    for _ in range(200):
        out = step(s, max_out=8)
        if out.preempted and first_victim is None:
            first_victim = out.preempted[0]
        if not s.has_unfinished():
            break
    assert not s.has_unfinished()
    assert s.num_preemptions > 0 and first_victim is seqs[-1]
    assert all(q.num_output_tokens == 8 and q.finish_reason == "length" for q in seqs)
    assert s.bm.num_free_blocks == 6


def test_the_newest_running_sequence_is_preempted_first():
    s = make(num_blocks=4, block_size=4, budget=64, prefix=False)
    old, new = Sequence("old", [1] * 8), Sequence("new", [2] * 7)
    s.add(old)
    s.add(new)
    step(s, max_out=100)      # old: 2 blocks (8 tok + 1 out needs a 3rd next step), new: 2 blocks
    out = step(s, max_out=100)
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and not new.block_table
    assert [x.seq for x in out.scheduled] == [old]


def test_a_single_oversized_growth_preempts_itself_without_deadlock():
    s = make(num_blocks=2, block_size=4, budget=64, prefix=False)
    q = Sequence("a", [1] * 7)
    s.add(q)
    step(s, max_out=100)
    step(s, max_out=100)      # 8 tokens computed: exactly two full blocks
    out = step(s, max_out=100)  # the 9th needs a 3rd block: nothing else to preempt -> itself, no crash
    assert out.preempted == [q] and out.scheduled == []
    assert q.status is SequenceStatus.WAITING


def test_prefix_hit_skips_computing_the_shared_blocks():
    s = make(block_size=4, budget=100)
    a = Sequence("a", list(range(20)))
    s.add(a)
    step(s)
    b = Sequence("b", list(range(16)) + [50, 51, 52])
    s.add(b)
    out = step(s)
    sch = {x.seq.request_id: x.num_new_tokens for x in out.scheduled}
    assert sch["b"] == 3 and b.num_cached_tokens == 16 and s.prefix_cache_hit_tokens == 16


def test_fork_shares_the_prompt_blocks_and_recomputes_only_the_tail():
    s = make(block_size=4, budget=100)
    params = SamplingParams(n=3)
    parent = Sequence("a", list(range(10)), params)
    kids = [Sequence("a", list(range(10)), params, index=i) for i in (1, 2)]
    for k in kids:
        k.status = SequenceStatus.FORK_PENDING
    parent.children = kids
    s.add(parent)
    step(s, max_out=100)
    assert all(k.status is SequenceStatus.RUNNING for k in kids)
    shared = parent.block_table[:2]
    assert all(k.block_table == shared and k.num_computed_tokens == 8 for k in kids)
    assert [s.bm.blocks[b].ref_count for b in shared] == [3, 3]
    out = step(s, max_out=100)
    got = {(x.seq.index, x.num_new_tokens) for x in out.scheduled}
    assert got == {(0, 1), (1, 2), (2, 2)}
    s.finish(kids[0], "abort")
    assert [s.bm.blocks[b].ref_count for b in shared] == [2, 2]


def test_fork_of_a_prompt_on_a_block_boundary_recomputes_at_least_one_token():
    s = make(block_size=4, budget=100, prefix=False)
    params = SamplingParams(n=2)
    parent = Sequence("a", list(range(8)), params)
    kid = Sequence("a", list(range(8)), params, index=1)
    kid.status = SequenceStatus.FORK_PENDING
    parent.children = [kid]
    s.add(parent)
    step(s, max_out=100)
    assert kid.num_computed_tokens == 4 and kid.block_table == parent.block_table[:1]
    out = step(s, max_out=100)
    assert {(x.seq.index, x.num_new_tokens) for x in out.scheduled} == {(0, 1), (1, 4)}


def test_random_load_keeps_ref_counts_consistent_and_frees_everything():
    """Random arrivals (shared prefixes, n > 1), aborts and growth on a cache far too small: every
    step the block ref counts equal the live tables, nothing deadlocks, and all blocks come back."""
    import random

    rng = random.Random(0)
    s = make(num_blocks=24, block_size=4, max_seqs=6, budget=20)
    live: list[Sequence] = []
    prefix = [9] * 12
    for step_i in range(400):
        if step_i < 300 and rng.random() < 0.3:
            n = rng.choice([1, 1, 2, 3])
            ids = (prefix if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randint(1, 20))]
            params = SamplingParams(n=n)
            seqs = [Sequence(f"r{step_i}", ids, params, index=i) for i in range(n)]
            for k in seqs[1:]:
                k.status = SequenceStatus.FORK_PENDING
            seqs[0].children = seqs[1:]
            s.add(seqs[0])
            live += seqs
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            if not victim.is_finished:
                s.finish(victim, "abort")
        step(s, max_out=rng.randint(3, 12))
        refs = [0] * s.bm.num_blocks
        for q in live:
            if not q.is_finished:
                for b in q.block_table:
                    refs[b] += 1
        assert refs == [b.ref_count for b in s.bm.blocks]
        if step_i >= 300 and not s.has_unfinished():
            break
    assert not s.has_unfinished() and s.bm.num_free_blocks == s.bm.num_blocks
    assert s.num_preemptions > 0 and s.prefix_cache_hit_tokens > 0
    assert all(q.is_finished for q in live)


def _fork_family(prompt: list[int], n: int) -> tuple[Sequence, list[Sequence]]:
    """A request with n samples as the engine builds it: the siblings share the parent's arrival."""
    params = SamplingParams(n=n)
    parent = Sequence("p", prompt, params)
    kids = [Sequence("p", prompt, params, index=i, arrival=parent.arrival) for i in range(1, n)]
    for k in kids:
        k.status = SequenceStatus.FORK_PENDING
    parent.children = kids
    return parent, kids


def test_preempting_a_sequence_already_in_this_steps_batch_takes_it_out():
    """Decodes are scheduled before prefills, so a newer request's decode can already be in the batch when an
    older sequence's prefill finds the cache full: here the fork of an n=2 request (the parent's arrival) still
    computes its 2-token tail while a later request decodes. The newer one is preempted and must leave this
    step's batch (its blocks are gone) and give its budget back."""
    s = make(num_blocks=4, block_size=4, budget=100, prefix=False)
    parent, (kid,) = _fork_family(list(range(10)), 2)  # 10 tokens: 3 blocks, the fork shares the 2 full ones
    late = Sequence("late", [1, 2, 3])                 # 1 block: the cache is full after the first step
    s.add(parent)
    s.add(late)
    step(s, max_out=100)
    assert kid.status is SequenceStatus.RUNNING and kid.is_prefill and kid.num_uncomputed_tokens == 2
    assert s.bm.num_free_blocks == 0
    out = s.schedule()
    assert out.preempted == [late]
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [(parent, 1), (kid, 2)]
    assert out.num_batched_tokens == 3  # the victim's decode token is not in the batch any more
    assert late.status is SequenceStatus.WAITING and late.num_computed_tokens == 0 and not late.block_table
    assert list(s.waiting) == [late]
    s.update(out)
    assert late.num_computed_tokens == 0  # update() did not advance a sequence that was not run
    for _ in range(100):  # and everything still completes, every block returned
        step(s, max_out=6)
        if not s.has_unfinished():
            break
    assert all(q.is_finished and q.num_output_tokens == 6 for q in (parent, kid, late))
    assert s.bm.num_free_blocks == 4 and late.num_preemptions == 1


def test_preempted_requests_resume_first_oldest_first():
    """Recompute preemption as in vLLM: victims go back to the front of the waiting queue (ahead of requests that
    never started), the newest preempted first, so they resume in arrival order; nothing new starts in a step
    that had to preempt."""
    s = make(num_blocks=5, block_size=4, budget=100, prefix=False)
    a, b, c = Sequence("a", [1] * 8), Sequence("b", [2] * 8), Sequence("c", [3] * 3)  # 2 + 2 + 1 blocks: full
    for q in (a, b, c):
        s.add(q)
    step(s, max_out=100)
    d = Sequence("d", [9] * 3)
    s.add(d)
    out = step(s, max_out=100)  # a's 9th token needs a 3rd block: c (newest) goes; b's then needs one: b goes
    assert out.preempted == [c, b]
    assert [x.seq for x in out.scheduled] == [a]
    assert list(s.waiting) == [b, c, d]
    started = []
    for _ in range(200):
        out = step(s, max_out=4)
        started += [x.seq.request_id for x in out.scheduled
                    if x.seq.request_id != "a" and x.seq.request_id not in started]
        if not s.has_unfinished():
            break
    assert started == ["b", "c", "d"]
    assert all(q.is_finished and q.num_output_tokens == 4 for q in (a, b, c, d))
