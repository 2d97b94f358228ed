"""Per-worker index of cached KV blocks, fed by vLLM 0.26.0 KV events.

Why an index of hashes (and not a radix tree of tokens): vLLM's block hashes are a chain -- each hash
covers its whole prefix -- so "does worker W hold the first k blocks of this prompt" is k dictionary
look-ups of the prompt's own chain.  The index stores, per worker, each announced hash with the tiers
that hold it (a bit set: the same block can sit in GPU memory and in LMCache's CPU or disk tier at once).

Tiers come from ``BlockStored.medium`` / ``BlockRemoved.medium``: ``"GPU"`` (vLLM's own cache, also when
``medium`` is missing), ``"CPU"`` (LMCache local CPU), anything else (``FS``, ``OBJ``, ``DISK``,
``LOCAL_DISK``, ...) counts as ``DISK``, the slowest tier.  A ``BlockRemoved`` removes the block from
its tier only; ``AllBlocksCleared`` drops all of the worker's entries.

Sequence numbers: each worker's publisher numbers its batches from 0 per process.  :meth:`KvIndex.observe`
applies a batch only when it is the next one expected; otherwise it reports a :class:`Gap` and leaves
the repair to the caller (the subscriber owns the sockets): it fetches the missing batches from the
worker's replay endpoint and hands them to :meth:`KvIndex.resolve_gap`.  The safety rule behind the
repair: the index may *miss* blocks (a routing opportunity lost) but must not keep blocks the worker
has dropped (a wrong prediction).  A gap that replay cannot fill exactly therefore clears the worker
and rebuilds from the contiguous events that remain.  A sequence number going backwards means the
publisher restarted (a new engine process, empty cache): the worker is cleared too.

Memory is bounded per worker (``max_blocks_per_worker``): past it the least recently stored blocks are
forgotten first, which only loses predictions.  The lag metric is ``receive time - batch.ts`` of live
batches (the publisher stamps ``ts`` with wall-clock time when it builds the batch).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pdkit.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from pdkit.routing.kv_metrics import KvRoutingMetrics

log = logging.getLogger("pdkit.routing.kv_index")

BlockKey = int | bytes

GPU, CPU, DISK = 1, 2, 4
TIER_BITS: dict[str, int] = {"GPU": GPU, "CPU": CPU, "DISK": DISK}
TIER_NAMES: dict[int, str] = {v: k for k, v in TIER_BITS.items()}


def tier_of(medium: str | None) -> str:
    """The tier a ``medium`` string names: GPU (also when absent), CPU, or DISK for every other store."""
    if medium is None:
        return "GPU"
    m = medium.upper()
    if m in ("GPU", "CUDA", "HBM"):
        return "GPU"
    if m in ("CPU", "DRAM", "HOST", "LOCAL_CPU"):
        return "CPU"
    return "DISK"


@dataclass
class Gap:
    """Batches ``expected .. got - 1`` of ``worker_id`` are missing (``expected`` 0 when nothing was seen)."""

    worker_id: str
    expected: int
    got: int


@dataclass
class WorkerBlocks:
    """One worker's cached blocks and stream position."""

    worker_id: str
    blocks: OrderedDict[BlockKey, int] = field(default_factory=OrderedDict)
    counts: dict[int, int] = field(default_factory=lambda: {GPU: 0, CPU: 0, DISK: 0})
    last_seq: int | None = None
    # After a replay the live socket still delivers batches the replay already applied: seqs in
    # [dup_from, dup_until] are dropped as duplicates; any other old seq means the publisher restarted.
    dup_from: int = 0
    dup_until: int = -1
    last_ts: float | None = None

    def tier_counts(self) -> dict[str, int]:
        return {TIER_NAMES[bit]: n for bit, n in self.counts.items()}

    def __len__(self) -> int:
        return len(self.blocks)


class KvIndex:
    """Which worker caches which block, in which tier.  Not thread-safe: use it from one thread (the
    frontend's event loop)."""

    def __init__(
        self,
        *,
        max_blocks_per_worker: int = 1_000_000,
        metrics: KvRoutingMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_blocks_per_worker < 1:
            raise ValueError("max_blocks_per_worker must be at least 1")
        self.max_blocks_per_worker = max_blocks_per_worker
        self.metrics = metrics
        self._clock = clock
        self._workers: dict[str, WorkerBlocks] = {}
        # Called with (worker, hashes) for every GPU-tier BlockStored / BlockRemoved applied: from then
        # on the events speak for those blocks (KvRouting settles its pending-block overlay with it).
        self.on_gpu_blocks: Callable[[str, Sequence[BlockKey]], None] | None = None

    # -- workers ---------------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> WorkerBlocks:
        """Start tracking a worker (idempotent: a known worker keeps its blocks and position)."""
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = WorkerBlocks(worker_id)
            self._publish_size(w)
        return w

    def remove_worker(self, worker_id: str) -> bool:
        """Forget a worker and all its blocks (it left the registry)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return False
        if self.metrics is not None:
            self.metrics.resets.labels(worker_id, "removed").inc()
            self.metrics.forget_worker(worker_id)
        return True

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def worker(self, worker_id: str) -> WorkerBlocks | None:
        return self._workers.get(worker_id)

    def size(self, worker_id: str) -> dict[str, int]:
        """Blocks held per tier (a block in two tiers counts in both)."""
        w = self._workers.get(worker_id)
        return w.tier_counts() if w is not None else {name: 0 for name in TIER_BITS}

    def clear_worker(self, worker_id: str, reason: str) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            return
        w.blocks.clear()
        w.counts = {GPU: 0, CPU: 0, DISK: 0}
        if self.metrics is not None:
            self.metrics.resets.labels(worker_id, reason).inc()
        self._publish_size(w)

    # -- queries ---------------------------------------------------------------------------------

    def tiers(self, worker_id: str, block: BlockKey) -> int:
        """Tier bits of one block on one worker (0: not cached)."""
        w = self._workers.get(worker_id)
        return w.blocks.get(block, 0) if w is not None else 0

    def prefix_tiers(self, worker_id: str, hashes: Sequence[BlockKey]) -> list[int]:
        """Tier bits of the contiguous cached prefix of ``hashes`` (stops at the first miss)."""
        w = self._workers.get(worker_id)
        out: list[int] = []
        if w is None:
            return out
        blocks = w.blocks
        for h in hashes:
            bits = blocks.get(h, 0)
            if not bits:
                break
            out.append(bits)
        return out

    # -- applying events -------------------------------------------------------------------------

    def apply(self, worker_id: str, batch: KVEventBatch) -> None:
        """Apply one batch's events to a worker, ignoring sequence numbers (replay, tests)."""
        w = self.add_worker(worker_id)
        for ev in batch.events:
            if isinstance(ev, AllBlocksCleared):
                w.blocks.clear()
                w.counts = {GPU: 0, CPU: 0, DISK: 0}
                if self.metrics is not None:
                    self.metrics.resets.labels(worker_id, "cleared").inc()
                continue
            if not isinstance(ev, (BlockStored, BlockRemoved)):
                continue
            bit = TIER_BITS[tier_of(ev.medium)]
            if isinstance(ev, BlockStored):
                self._store(w, ev.block_hashes, bit)
            else:
                self._remove(w, ev.block_hashes, bit)
            if bit == GPU and self.on_gpu_blocks is not None:
                self.on_gpu_blocks(worker_id, ev.block_hashes)
        w.last_ts = batch.ts
        self._publish_size(w)

    def observe(self, worker_id: str, seq: int, batch: KVEventBatch) -> Gap | None:
        """A live batch arrived: apply it if it is the next one, else report the :class:`Gap`.

        Returns None when the batch was applied or dropped as a duplicate.  On a gap nothing is
        applied; the caller replays and calls :meth:`resolve_gap` (or ``resolve_gap(gap, None, ...)``
        when no replay is possible).
        """
        w = self._workers.get(worker_id)
        if w is None:
            if self.metrics is not None:
                self.metrics.dropped.labels("unknown_worker").inc()
            return None
        if w.last_seq is not None and seq <= w.last_seq:
            if w.dup_from <= seq <= w.dup_until:
                if self.metrics is not None:
                    self.metrics.dropped.labels("duplicate").inc()
                return None
            log.info("KV events of %s restarted at seq %d (was %d): clearing its index", worker_id, seq, w.last_seq)
            self.clear_worker(worker_id, "restart")
            w.last_seq = None
        expected = 0 if w.last_seq is None else w.last_seq + 1
        if seq != expected:
            if self.metrics is not None:
                self.metrics.gaps.labels(worker_id).inc()
            return Gap(worker_id, expected, seq)
        self._apply_live(w, seq, batch)
        return None

    def resolve_gap(
        self,
        gap: Gap,
        replayed: Iterable[tuple[int, KVEventBatch]] | None,
        live: tuple[int, KVEventBatch] | None = None,
    ) -> str:
        """Repair a gap with the batches the replay endpoint returned (None: replay failed/unavailable).

        Replayed batches are applied in order from ``gap.expected`` while they are contiguous; the live
        batch that revealed the gap follows (unless the replay already covered it).  If the replay does
        not start exactly at ``gap.expected`` the worker may have dropped blocks we never heard about, so
        its entries are cleared first and the index rebuilds from the contiguous run that is left.
        Returns the outcome: ``ok``, ``partial`` (cleared, rebuilt from what remained) or ``failed``.
        """
        w = self._workers.get(gap.worker_id)
        if w is None:
            return "failed"
        run: list[tuple[int, KVEventBatch]] = []
        for seq, batch in sorted(replayed or [], key=lambda x: x[0]):
            if seq < gap.expected:
                continue
            if run and seq != run[-1][0] + 1:
                break
            run.append((seq, batch))
        if live is not None and (not run or live[0] == run[-1][0] + 1):
            run.append(live)
        elif live is not None and live[0] > run[-1][0] + 1:
            run = [live]  # the replay fell short of the live batch: only the live one is contiguous
        exact = bool(run) and run[0][0] == gap.expected and replayed is not None
        if exact:
            outcome = "ok"
        else:
            outcome = "failed" if replayed is None else "partial"
            log.info(
                "KV events of %s: batches %d..%d lost (%s): clearing its index", gap.worker_id, gap.expected,
                gap.got - 1, outcome,
            )  # fmt: skip
            self.clear_worker(gap.worker_id, "gap")
        for seq, batch in run:
            if live is not None and seq == live[0] and batch is live[1]:
                self._apply_live(w, seq, batch)
            else:
                self.apply(gap.worker_id, batch)
                w.last_seq = seq
                if self.metrics is not None:
                    self.metrics.batches.labels(gap.worker_id, "replay").inc()
        if run:
            # The live stream is ordered: the only live copies still to come of what the replay
            # applied are those after the live batch that revealed the gap.
            w.dup_from, w.dup_until = (live[0] + 1 if live is not None else run[0][0]), run[-1][0]
        return outcome

    # -- internals -------------------------------------------------------------------------------

    def _apply_live(self, w: WorkerBlocks, seq: int, batch: KVEventBatch) -> None:
        self.apply(w.worker_id, batch)
        w.last_seq = seq
        if self.metrics is not None:
            self.metrics.batches.labels(w.worker_id, "live").inc()
            self.metrics.lag.labels(w.worker_id).set(max(0.0, self._clock() - batch.ts))

    def _store(self, w: WorkerBlocks, hashes: Iterable[BlockKey], bit: int) -> None:
        blocks = w.blocks
        for h in hashes:
            old = blocks.get(h, 0)
            if old & bit:
                blocks.move_to_end(h)
                continue
            blocks[h] = old | bit
            blocks.move_to_end(h)
            w.counts[bit] += 1
        overflow = len(blocks) - self.max_blocks_per_worker
        if overflow > 0:
            for _ in range(overflow):
                _, bits = blocks.popitem(last=False)
                for b in (GPU, CPU, DISK):
                    if bits & b:
                        w.counts[b] -= 1
            if self.metrics is not None:
                self.metrics.resets.labels(w.worker_id, "overflow").inc()

    def _remove(self, w: WorkerBlocks, hashes: Iterable[BlockKey], bit: int) -> None:
        blocks = w.blocks
        for h in hashes:
            old = blocks.get(h, 0)
            if not old & bit:
                continue
            w.counts[bit] -= 1
            rest = old & ~bit
            if rest:
                blocks[h] = rest
            else:
                del blocks[h]

    def _publish_size(self, w: WorkerBlocks) -> None:
        if self.metrics is not None:
            self.metrics.set_index_size(w.worker_id, w.tier_counts())
