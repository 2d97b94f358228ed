"""The simulated GPU KV cache: fixed-size blocks, reference counts and an LRU prefix cache.

It follows vLLM's ``BlockPool`` semantics closely enough that the KV events it emits look like a real
worker's: a block gets a hash when it becomes full of computed tokens (``BlockStored``); a freed block
keeps its hash and sits in an LRU free queue, so a later request with the same prefix reuses it; a
block is only forgotten (``BlockRemoved``) when it is taken from the free queue for new data.  Requests
free their blocks tail first, so a prompt's last blocks are evicted before its first ones (the shared
system prompt at the head survives longest) -- vLLM's order too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdkit.routing.block_hash import to_event_hash
from pdkit.routing.kv_events import MEDIUM_GPU, BlockRemoved, BlockStored, KVEvent


@dataclass
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_events: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_events = enable_events
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, dict[int, None]] = {}
        self._events: list[KVEvent] = []

    # ---------------------------------------------------------------------------------------- state
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's ``kv_cache_usage_perc``: 0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(v) for v in self._cached.values())

    def is_cached(self, block_hash: bytes) -> bool:
        return block_hash in self._cached

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------------------------- lookups
    def longest_hit(self, block_hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix (at most ``max_blocks`` blocks); does not take them."""
        out: list[int] = []
        for h in block_hashes[:max_blocks]:
            holders = self._cached.get(h)
            if not holders:
                break
            out.append(next(iter(holders)))
        return out

    def num_evictable_needed(self, hit_blocks: Sequence[int]) -> int:
        """How many of ``hit_blocks`` currently sit in the free queue (touching them uses free space)."""
        return sum(1 for b in hit_blocks if self._blocks[b].ref_cnt == 0)

    # ----------------------------------------------------------------------------- allocate / free
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (prefix hit): they leave the free queue."""
        for b in block_ids:
            blk = self._blocks[b]
            if blk.ref_cnt == 0:
                self._free.pop(b, None)
            blk.ref_cnt += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks from the LRU end of the free queue (evicting their hashes), or None."""
        if n <= 0:
            return []
        if n > len(self._free):
            return None
        out = []
        removed: list[int | bytes] = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            blk = self._blocks[b]
            if blk.block_hash is not None:
                holders = self._cached.get(blk.block_hash)
                if holders is not None:
                    holders.pop(b, None)
                    if not holders:
                        del self._cached[blk.block_hash]
                removed.append(to_event_hash(blk.block_hash))
                blk.block_hash = None
            blk.ref_cnt = 1
            out.append(b)
        if removed and self.enable_events:
            # vLLM emits one BlockRemoved per evicted hash
            self._events.extend(BlockRemoved(block_hashes=[h], medium=MEDIUM_GPU, group_idx=0) for h in removed)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block of a request (given in request order).

        Blocks reaching 0 references join the free queue: hashed ones at the MRU end, tail block first
        (so the tail is evicted before the head); unhashed ones at the LRU end, since they can never be
        a cache hit (vLLM 0.26 does the same).
        """
        unhashed: list[int] = []
        for b in reversed(block_ids):
            blk = self._blocks[b]
            blk.ref_cnt -= 1
            if blk.ref_cnt <= 0:
                blk.ref_cnt = 0
                if blk.block_hash is None:
                    unhashed.append(b)
                else:
                    self._free[b] = None
        for b in reversed(unhashed):
            self._free[b] = None
            self._free.move_to_end(b, last=False)

    def cache_full_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        token_ids: Sequence[int],
        num_cached: int,
        num_full: int,
    ) -> None:
        """Give blocks ``num_cached .. num_full-1`` of a request their hashes; one ``BlockStored``."""
        if num_full <= num_cached:
            return
        new_hashes: list[int | bytes] = []
        for i in range(num_cached, num_full):
            b = block_ids[i]
            blk = self._blocks[b]
            h = block_hashes[i]
            if blk.block_hash == h:
                continue
            blk.block_hash = h
            self._cached.setdefault(h, {})[b] = None
            new_hashes.append(to_event_hash(h))
        if not self.enable_events or not new_hashes:
            return
        bs = self.block_size
        parent = to_event_hash(block_hashes[num_cached - 1]) if num_cached > 0 else None
        self._events.append(
            BlockStored(
                block_hashes=new_hashes,
                parent_block_hash=parent,
                token_ids=list(token_ids[num_cached * bs : num_full * bs]),
                block_size=bs,
                lora_id=None,
                medium=MEDIUM_GPU,
                lora_name=None,
                extra_keys=[None] * len(new_hashes),
                group_idx=0,
            )
        )

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    def block_hash_of(self, block_id: int) -> bytes | None:
        return self._blocks[block_id].block_hash
