"""Block manager edge cases, no model: boundaries, prefix hits, ref counts, eviction."""

from __future__ import annotations

from ernie45.engine.block_manager import BlockManager
from ernie45.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens)


def compute(bm: BlockManager, s: Sequence, cached: list[int] = ()) -> None:
    """What the scheduler + runner do for a whole prompt: allocate, compute, register."""
    bm.allocate(s, s.num_tokens, cached)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


def test_exact_block_boundary_allocates_no_extra_block():
    bm = BlockManager(8, 4)
    s = seq(list(range(8)))
    bm.allocate(s, 8)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    bm.allocate(s, 9)  # one more token crosses into a third block
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5


def test_prefix_hit_then_divergence():
    bm = BlockManager(16, 4)
    a = seq(list(range(12)))            # 3 full blocks
    compute(bm, a)
    b = seq(list(range(8)) + [99, 98, 97, 96, 95])   # shares 2 blocks, then diverges
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    compute(bm, b, hits)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq(list(range(8)))
    compute(bm, a)
    again = seq(list(range(8)))
    assert len(bm.match_prefix(again)) == 1   # not 2: the last token's logits are needed
    longer = seq(list(range(9)))
    assert len(bm.match_prefix(longer)) == 2


def test_same_block_content_at_a_different_position_is_not_a_hit():
    bm = BlockManager(16, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    compute(bm, a)
    b = seq([5, 6, 7, 8, 1, 2, 3, 4, 0])   # same blocks, other order: hashes chain on the parent
    assert bm.match_prefix(b) == []


def test_ref_counts_after_abort_and_after_fork():
    bm = BlockManager(10, 4)
    parent = seq(list(range(10)))     # 3 blocks, the last partial
    compute(bm, parent)
    child = seq(list(range(10)))
    bm.fork(parent, child, 2)
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 2, 1]
    bm.free(parent)   # abort the parent: the child keeps the shared blocks alive
    assert [bm.blocks[i].ref_count for i in child.block_table] == [1, 1]
    assert bm.num_free_blocks == 10 - 2
    bm.free(child)
    assert bm.num_free_blocks == 10 and all(b.ref_count == 0 for b in bm.blocks)


def test_freed_cached_blocks_are_reused_on_a_hit_and_evicted_lru_when_needed():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5])            # 3 blocks, 2 full -> cached
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2
    b = seq([1, 2, 3, 4, 9])
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    compute(bm, b, hits)                 # revives both cached blocks
    assert len(bm.evictable) == 0
    bm.free(b)
    # Now fill the cache with unrelated tokens: the free list empties, then the LRU cached block goes.
    c = seq([7, 7, 8, 8, 6, 6, 5])       # 4 blocks: 2 free + 2 evicted
    compute(bm, c)
    assert bm.hash_to_block.get(bm.blocks[c.block_table[0]].hash) == c.block_table[0]
    assert bm.match_prefix(seq([1, 2, 3, 4, 0])) == []   # the old prefix was evicted
    assert bm.num_free_blocks == 0


def test_eviction_takes_the_tail_of_a_freed_sequence_first():
    bm = BlockManager(3, 2)
    a = seq([1, 2, 3, 4, 5, 6])         # 3 full blocks, all cached
    compute(bm, a)
    tail = a.block_table[-1]
    assert len(bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 0]))) == 3
    bm.free(a)
    d = seq([9, 9])
    compute(bm, d)                       # the free list is empty: evicts one cached block
    assert d.block_table == [tail]
    assert len(bm.match_prefix(seq([1, 2, 3, 4, 5, 6, 0]))) == 2


def test_can_allocate_counts_revived_blocks():
    bm = BlockManager(3, 2)
    a = seq([1, 2, 3, 4])
    compute(bm, a)
    bm.free(a)                           # 2 cached evictable + 1 free
    b = seq([1, 2, 3, 4, 5, 6, 7])       # hits 2 blocks, needs 2 more -> 4 > 3
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert not bm.can_allocate(b, 7, hits)
    assert bm.can_allocate(b, 6, hits)
