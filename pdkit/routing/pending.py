"""Blocks a worker is about to cache: the prompts of requests routed to it whose events have not come yet.

Why: vLLM caches a prompt's full blocks when it *schedules* the request (``allocate_slots`` hashes them
at once), so a second request with the same prefix that reaches the worker after the first one hits
those blocks -- even in the same scheduler step.  The frontend only learns of them from the worker's
``BlockStored`` events, which go out after that step has run: tens to hundreds of milliseconds after
routing, longer when the worker has a queue.  Without this overlay, requests sharing a new prefix that
arrive inside that window all score zero overlap, spread over the workers (each recomputes the prefix)
and their hits are under-predicted.  With it, the first request's prompt counts as cached on its worker
from the moment it is routed, so followers stick to it and predictions match what vLLM records.

Lifetime: an entry lives while any request that marked it is in flight on the worker (the frontend
calls :meth:`PendingBlocks.done` when the hop ends, successfully or not) plus ``grace_s`` -- by then the
events announcing the block have arrived, or the worker did not cache it after all.  ``max_pending_s``
bounds entries whose ``done`` never comes.  The index of real events always wins: pending entries only
fill blocks the index lacks, and a GPU event about a block (stored or removed) settles its entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pdkit.routing.kv_index import BlockKey


class PendingBlocks:
    """Per worker: block hash -> [requests in flight that marked it, deadline].  Event-loop only."""

    def __init__(
        self, *, grace_s: float = 1.0, max_pending_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if grace_s < 0 or max_pending_s <= 0:
            raise ValueError("grace_s must be >= 0 and max_pending_s > 0")
        self.grace_s = grace_s
        self.max_pending_s = max_pending_s
        self._clock = clock
        self._workers: dict[str, dict[BlockKey, list[float]]] = {}
        self._next_sweep = 0.0

    def add(self, worker_id: str, hashes: Iterable[BlockKey]) -> None:
        """A request carrying these prompt blocks was routed to ``worker_id``."""
        now = self._clock()
        self._sweep(now)
        entries = self._workers.setdefault(worker_id, {})
        deadline = now + self.max_pending_s
        for h in hashes:
            e = entries.get(h)
            if e is None:
                entries[h] = [1.0, deadline]
            else:
                e[0] += 1
                e[1] = max(e[1], deadline)

    def done(self, worker_id: str, hashes: Iterable[BlockKey]) -> None:
        """That request's hop ended: its blocks stay pending for ``grace_s`` unless others hold them."""
        entries = self._workers.get(worker_id)
        if entries is None:
            return
        until = self._clock() + self.grace_s
        for h in hashes:
            e = entries.get(h)
            if e is None:
                continue
            e[0] -= 1
            if e[0] <= 0:
                e[0] = 0
                e[1] = min(e[1], until)

    def settle(self, worker_id: str, hashes: Iterable[BlockKey]) -> None:
        """The worker's events announced (stored or removed) these blocks: they are no longer pending.

        Why drop them even while the request is in flight: from here on the index is exact for them --
        a block stored and then evicted must stop counting, which a still-pending entry would hide.
        """
        entries = self._workers.get(worker_id)
        if entries:
            for h in hashes:
                entries.pop(h, None)

    def has(self, worker_id: str, h: BlockKey, now: float | None = None) -> bool:
        entries = self._workers.get(worker_id)
        if not entries:
            return False
        e = entries.get(h)
        return e is not None and e[1] > (self._clock() if now is None else now)

    def now(self) -> float:
        return self._clock()

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def size(self, worker_id: str) -> int:
        """Live entries of one worker (expired ones are not counted)."""
        now = self._clock()
        return sum(1 for e in self._workers.get(worker_id, {}).values() if e[1] > now)

    def held(self, worker_id: str) -> int:
        """Entries some in-flight request still holds (0 once every hop to the worker has ended)."""
        return sum(1 for e in self._workers.get(worker_id, {}).values() if e[0] > 0)

    def _sweep(self, now: float) -> None:
        """Drop expired entries, at most once per ``grace_s`` (O(entries), amortised over many adds)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + max(self.grace_s, 0.1)
        for wid in list(self._workers):
            entries = self._workers[wid]
            for h in [h for h, e in entries.items() if e[1] <= now]:
                del entries[h]
            if not entries:
                del self._workers[wid]
