"""Paged KV allocator: free list, reference counts, prefix caching with LRU eviction.

Plain Python (no tensors). A block holds ``block_size`` consecutive token positions of one or more
sequences. A full block whose keys/values are computed is registered under a hash of its token ids
chained with the previous block's hash, so a later prompt with the same prefix reuses it instead of
recomputing (vLLM's automatic prefix caching). A block nobody references keeps its hash and sits in
an LRU list; it is only evicted (its hash forgotten) when the free list of never-cached blocks is
empty and a fresh block is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from ernie45.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of one full block: its token ids chained with the parent block's hash. A 128-bit digest
    (not Python's hash) so two different prefixes never share a cache entry in practice."""
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, cached={self.hash is not None})"


class BlockManager:
    """Owns ``num_blocks`` KV blocks; sequences hold them through ``seq.block_table``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))   # never cached, or evicted
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached; oldest first
        self.hash_to_block: dict[bytes, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones plus unreferenced cached ones (evictable)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq.token_ids`` (no references taken).

        At most ``(num_tokens - 1) // block_size`` blocks: at least one token must still be computed,
        because its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs, parent, hits = self.block_size, None, []
        for i in range((seq.num_tokens - 1) // bs):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            bid = self.hash_to_block.get(parent)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` positions (after taking the ``cached`` blocks)."""
        have = len(seq.block_table) + len(cached)
        need_new = max(0, self.blocks_for(num_tokens) - have)
        # Reviving an unreferenced cached block takes it out of the evictable pool.
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return need_new + revived <= self.num_free_blocks

    # ------------------------------------------------------------------ changes
    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] = ()) -> None:
        """Grow ``seq.block_table`` to cover ``num_tokens`` positions, first with the ``cached``
        prefix blocks (only when the table is empty). Call ``can_allocate`` first."""
        assert self.can_allocate(seq, num_tokens, cached), "allocate() without can_allocate()"
        if cached:
            assert not seq.block_table, "prefix blocks only go at the start of an empty table"
            parent = None
            for bid in cached:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    del self.evictable[bid]
                block.ref_count += 1
                seq.block_table.append(bid)
                parent = block.hash
                seq.block_hashes.append(parent)
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:  # evict the least recently freed cached block
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash = None
        block = self.blocks[bid]
        assert block.ref_count == 0
        block.ref_count = 1
        return bid

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose keys/values are now computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block and block.hash is None:
                self.hash_to_block[h] = block.block_id
                block.hash = h
            # else: an identical block is already cached (computed twice in one step); keep that one.

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Tail blocks are released first so LRU evicts them before the
        shared prefix (which is the part most likely to be hit again)."""
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.block_hashes = []

    def _release(self, bid: int) -> None:
        """Drop one reference; an unreferenced block becomes evictable (cached) or free."""
        block = self.blocks[bid]
        assert block.ref_count > 0, f"double free of block {bid}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[bid] = None
            else:
                self.free_ids.append(bid)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release ``seq``'s tail blocks beyond those ``num_tokens`` positions need: the lookahead of a
        speculative verification whose drafts were rejected. Their keys/values were never committed (only
        computed tokens are hashed), so the blocks go back to the free list."""
        keep = self.blocks_for(num_tokens)
        assert keep >= len(seq.block_hashes), "trim() below the committed prefix"
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let ``child`` share the first ``num_blocks`` blocks of ``parent`` (reference counted)."""
        assert not child.block_table and num_blocks <= len(parent.block_table)
        for bid in parent.block_table[:num_blocks]:
            self.blocks[bid].ref_count += 1
        child.block_table = parent.block_table[:num_blocks]
        child.block_hashes = parent.block_hashes[:num_blocks]
