"""LMCache's tiers as KV events in vLLM's block-hash space, so the router can predict CPU/disk hits.

Why: LMCache's own events name chunks by LMCache chunk hashes (``block_size`` = chunk size, hashed
with Python's ``hash``); the frontend computes vLLM block hashes for a prompt and can never match
them.  The scheduler side of PdConnector, however, holds the real ``Request`` with vLLM's own block
hashes (``request.block_hashes``).  When LMCache has stored a request's prompt we announce those
blocks again, as vLLM announces its GPU blocks, but with ``medium`` = LMCache's tier:

* which tokens LMCache stores: the prompt, in whole chunks of ``chunk_size`` (all of it with
  ``save_unfull_chunk``); of those, only the *full* vLLM blocks have a hash, so ``n // block_size``
  blocks are announced (the router never counts a partial block either);
* when: at ``request_finished`` (LMCache's store of that step has completed: its worker-side save is
  synchronous in ``wait_for_save``), or, if LMCache delayed the free (async save), once the request
  is reported in ``finished_sending``;
* hashes: ``maybe_convert_block_hash`` (vLLM's own conversion for events: low 64 bits as int by
  default), parent ``None`` (the chain starts at the first prompt block), ``token_ids`` and per-block
  ``extra_keys`` exactly as ``BlockPool`` builds a GPU ``BlockStored``.

Evictions: LMCache reports a removed chunk by its chunk hash (only with ``LMCACHE_ENABLE_KV_EVENTS``).
To map it back we correlate LMCache's *stored* events with the requests we announced: a chunk's
identity is a digest of all tokens up to its end, chained through LMCache's ``parent_block_hash``
(``id_i = blake2b(id_{i-1} + tokens_i)``).  The request side registers the same digests per chunk
with the vLLM hashes inside it; a stored chunk event that matches binds ``chunk hash -> vLLM hashes``
(bounded LRU), and a later ``BlockRemoved`` of that chunk becomes ``BlockRemoved`` of those hashes
in the event's tier.  What cannot be correlated (LMCache events off, a chunk whose parent is unknown,
a binding already dropped from the LRU, LoRA/salted prompts sharing tokens) is left alone: the
router then keeps predicting a CPU hit until the worker's index entry ages out -- a wasted
preference, never a wrong output.  A stored chunk event in another tier than the announced one (e.g.
LMCache writing through to disk) is announced for that tier too.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdkit.connectors.lmcache_events import CPU, DISK, normalize_medium

if TYPE_CHECKING:
    from vllm.v1.request import Request

# How many chunk bindings / pending chunk digests are remembered (each a few hundred bytes).
DEFAULT_MAX_CHUNKS = 65536


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclass(frozen=True)
class LMCacheTierSettings:
    """What decides which tokens LMCache stores and in which tier (from its config keys or env)."""

    chunk_size: int = 256
    save_unfull_chunk: bool = False
    medium: str = CPU

    @classmethod
    def from_config(cls, lmcache_extra: dict[str, Any], env: dict[str, str] | None = None) -> LMCacheTierSettings:
        """LMCache's own precedence: ``lmcache.<field>`` extra-config keys over ``LMCACHE_<FIELD>`` env.

        (A YAML ``LMCACHE_CONFIG_FILE`` is not read here; pdkit configures LMCache through env.)
        The tier is ``DISK`` only when local CPU is off and a local disk is set; otherwise ``CPU``.
        """
        env = dict(os.environ) if env is None else env

        def get(field: str, default: Any) -> Any:
            if f"lmcache.{field}" in lmcache_extra:
                return lmcache_extra[f"lmcache.{field}"]
            return env.get(f"LMCACHE_{field.upper()}", default)

        local_cpu = _truthy(get("local_cpu", True))
        local_disk = get("local_disk", None)
        return cls(
            chunk_size=int(get("chunk_size", 256)),
            save_unfull_chunk=_truthy(get("save_unfull_chunk", False)),
            medium=DISK if (not local_cpu and local_disk) else CPU,
        )


def _chunk_digest(prev: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class _ChunkBlocks:
    digest: bytes
    hashes: tuple[Any, ...]  # event hashes of the full vLLM blocks inside the chunk
    parent: Any  # event hash of the block before the first of them (None at the prompt start)


class LMCacheTierEvents:
    """Builds vLLM-hash ``BlockStored``/``BlockRemoved`` events for what LMCache holds (scheduler side)."""

    def __init__(self, block_size: int, settings: LMCacheTierSettings, max_chunks: int = DEFAULT_MAX_CHUNKS):
        self.block_size = block_size
        self.settings = settings
        self.max_chunks = max_chunks
        self._out: list[Any] = []
        self._pending: OrderedDict[bytes, _ChunkBlocks] = OrderedDict()  # digest -> blocks, awaiting LMCache
        self._bound: OrderedDict[Any, _ChunkBlocks] = OrderedDict()  # LMCache chunk hash -> blocks

    # ------------------------------------------------------------------ announcing stored prefixes
    def stored_tokens(self, request: Request) -> int:
        """How many prompt tokens LMCache keeps for ``request`` (whole chunks unless save_unfull_chunk)."""
        n = min(request.num_prompt_tokens, request.num_computed_tokens)
        if not self.settings.save_unfull_chunk:
            n -= n % self.settings.chunk_size
        return max(n, 0)

    def on_stored(self, request: Request) -> None:
        """Queue a ``BlockStored`` for the full vLLM blocks of the prefix LMCache now holds."""
        from vllm.distributed.kv_events import BlockStored
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, maybe_convert_block_hash

        n_tokens = self.stored_tokens(request)
        n_blocks = min(n_tokens // self.block_size, len(request.block_hashes))
        if n_blocks == 0:
            return
        bs = self.block_size
        hashes = [maybe_convert_block_hash(h) for h in request.block_hashes[:n_blocks]]
        extra: list[tuple[Any, ...] | None] = []
        mm_idx = 0
        for i in range(n_blocks):
            keys, mm_idx = generate_block_hash_extra_keys(request, i * bs, (i + 1) * bs, mm_idx)
            extra.append(keys)
        lora = request.lora_request
        self._out.append(
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=list(request.all_token_ids[: n_blocks * bs]),
                block_size=bs,
                lora_id=lora.adapter_id if lora else None,
                medium=self.settings.medium,
                lora_name=lora.name if lora else None,
                extra_keys=extra if any(k is not None for k in extra) else None,
            )
        )
        self._register_chunks(request.all_token_ids, n_tokens, hashes)

    def _register_chunks(self, tokens: Sequence[int], n_tokens: int, hashes: list[Any]) -> None:
        """Remember each stored chunk's digest with the vLLM blocks it contains (for evictions)."""
        c, bs = self.settings.chunk_size, self.block_size
        digest = b""
        for start in range(0, n_tokens, c):
            end = min(start + c, n_tokens)
            digest = _chunk_digest(digest, tokens[start:end])
            # Every full block overlapping the chunk: losing the chunk loses the block's prefix.
            first, last = start // bs, min(-(-end // bs), len(hashes))
            inside = tuple(hashes[first:last])
            parent = hashes[first - 1] if first > 0 else None
            self._pending[digest] = _ChunkBlocks(digest, inside, parent)
            self._pending.move_to_end(digest)
        while len(self._pending) > self.max_chunks:
            self._pending.popitem(last=False)

    # ------------------------------------------------------------------ LMCache's own events
    def on_lmcache_events(self, events: Iterable[Any]) -> None:
        """Correlate LMCache's (medium-normalised) chunk events; queue the vLLM-hash translations."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        for ev in events:
            if isinstance(ev, BlockStored):
                self._bind_stored(ev)
            elif isinstance(ev, BlockRemoved):
                removed: list[Any] = []
                for chunk in ev.block_hashes:
                    bound = self._bound.get(chunk)
                    if bound is not None:
                        removed.extend(bound.hashes)
                if removed:
                    self._out.append(BlockRemoved(block_hashes=removed, medium=normalize_medium(ev.medium)))
            elif isinstance(ev, AllBlocksCleared):
                # Not forwarded as AllBlocksCleared: that would also wipe the worker's GPU blocks in the
                # router.  Remove what we can name, in our tier, and forget the bindings.
                gone = [h for b in self._bound.values() for h in b.hashes]
                if gone:
                    self._out.append(BlockRemoved(block_hashes=gone, medium=self.settings.medium))
                self._bound.clear()

    def _bind_stored(self, ev: Any) -> None:
        """Bind each chunk of a stored event; an event naming several chunks carries their tokens in order."""
        from vllm.distributed.kv_events import BlockStored

        c = self.settings.chunk_size
        prev: bytes | None
        if ev.parent_block_hash is None:
            prev = b""
        else:
            parent = self._bound.get(ev.parent_block_hash)
            prev = parent.digest if parent is not None else None  # unknown parent: cannot place the chunk
        many = len(ev.block_hashes) > 1
        for k, chunk_hash in enumerate(ev.block_hashes):
            if prev is None:
                return
            tokens = ev.token_ids[k * c : (k + 1) * c] if many else ev.token_ids
            digest = _chunk_digest(prev, tokens)
            prev = digest
            blocks = self._pending.get(digest)
            if blocks is None:
                continue
            self._bound[chunk_hash] = blocks
            self._bound.move_to_end(chunk_hash)
            medium = normalize_medium(ev.medium)
            if medium != self.settings.medium and blocks.hashes:
                self._out.append(BlockStored(block_hashes=list(blocks.hashes), parent_block_hash=blocks.parent,
                                             token_ids=[], block_size=self.block_size, lora_id=None,
                                             medium=medium, lora_name=None))  # fmt: skip
        while len(self._bound) > self.max_chunks:
            self._bound.popitem(last=False)

    def take(self) -> list[Any]:
        out, self._out = self._out, []
        return out
