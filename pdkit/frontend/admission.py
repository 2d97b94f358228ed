"""Admission queue: requests wait their turn for a worker slot instead of being refused.

Why a queue in the frontend: vLLM queues every request it accepts, so a client that sends a burst to
vLLM waits and gets answers.  The frontend keeps at most ``max_inflight_per_worker`` requests on each
worker (so one engine is not flooded while another idles, and so it knows where capacity is); without
a queue, every request over that cap was a 503.  Here a request over the cap waits, in arrival order,
until a slot frees; it gets 503 + ``Retry-After`` only when ``max_queued`` requests already wait or its
own wait passes ``queue_timeout_s``.

The queue does not know what a worker is: each waiter brings an ``attempt`` callable that, run on the
event loop without awaiting, either takes every slot the request needs at once (and returns that
grant), returns ``None`` (not yet: wait), or raises :class:`~pdkit.frontend.requests.RequestError`
(never: e.g. no worker of the role is registered any more).  Taking all slots in one synchronous step
is what lets a disaggregated request hold its decode slot before its prefill starts.

Fairness: :meth:`AdmissionQueue.pump` walks the waiters oldest first.  A waiter that cannot be admitted
*blocks* the roles it needs for everyone behind it, so a later request never takes a slot an older
one is waiting for (no starvation), while a request that needs other roles may still pass it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pdkit.frontend.requests import RequestError

G = TypeVar("G")

# Reasons in pdkit_admission_rejections_total{reason}.
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
NO_WORKER = "no_worker"
DRAINING = "draining"


@dataclass(eq=False)
class _Waiter(Generic[G]):
    label: str
    roles: frozenset[str]
    attempt: Callable[[], G | None]
    future: asyncio.Future[G]
    queued_at: float = field(default_factory=time.perf_counter)
    timer: asyncio.TimerHandle | None = None


class AdmissionQueue(Generic[G]):
    """FIFO admission of requests to worker slots, bounded in length and in waiting time.

    ``release(grant)`` gives back the slots of a grant whose request is gone (its client hung up in the
    instant between being admitted and resuming).  ``metrics``: a :class:`FrontendMetrics` (depth gauge,
    wait histogram, rejection counter) or None.  ``all_roles``: every role a waiter may need; once all
    are blocked a pump stops early, so a release costs O(1) even with thousands waiting.
    """

    def __init__(
        self,
        *,
        max_queued: int,
        timeout_s: float,
        retry_after_s: int,
        release: Callable[[G], None],
        metrics: Any = None,
        all_roles: Iterable[str] = ("prefill", "decode", "agg"),
    ) -> None:
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._release = release
        self._metrics = metrics
        self._all_roles = frozenset(all_roles)
        self._waiters: dict[_Waiter[G], None] = {}  # insertion-ordered: FIFO with O(1) removal
        self._depth: dict[str, int] = {}
        self._pumping = False
        self._draining = False

    def __len__(self) -> int:
        return len(self._waiters)

    def depth(self, label: str) -> int:
        """Requests now waiting under ``label`` (the role they wait for first)."""
        return self._depth.get(label, 0)

    # ------------------------------------------------------------------------------------------ admit

    async def admit(self, label: str, roles: Iterable[str], attempt: Callable[[], G | None]) -> G:
        """The grant of ``attempt`` once it succeeds; raises RequestError(503) when refused."""
        if self._draining:
            raise self._reject(DRAINING, "the frontend is shutting down; retry on another frontend")
        if not self._waiters:  # fast path: nobody ahead, so taking a free slot now is fair
            grant = self._try(attempt)
            if grant is not None:
                self._observe_wait(label, 0.0)
                return grant
        if len(self._waiters) >= self.max_queued:
            raise self._reject(
                QUEUE_FULL,
                f"the frontend's admission queue is full ({len(self._waiters)} requests wait for a worker slot); "
                "retry later, add workers, or raise frontend.max_queued (`pdkit launch --max-queued`) or "
                "frontend.max_inflight_per_worker (`--max-inflight-per-worker`)",
            )
        loop = asyncio.get_running_loop()
        waiter: _Waiter[G] = _Waiter(label, frozenset(roles), attempt, loop.create_future())
        self._waiters[waiter] = None
        self._set_depth(label, +1)
        waiter.timer = loop.call_later(self.timeout_s, self._expire, waiter)
        fut = waiter.future
        try:
            self.pump()
            return await fut
        except asyncio.CancelledError:
            # Admitted, but the client left before this task resumed: give the slots back.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(fut.result())
            raise
        finally:
            self._forget(waiter)

    def _try(self, attempt: Callable[[], G | None]) -> G | None:
        try:
            return attempt()
        except RequestError:
            self._count(NO_WORKER)
            raise

    # ------------------------------------------------------------------------------------------- pump

    def pump(self) -> None:
        """Admit every waiter that can be admitted now, oldest first (call when slots may have freed)."""
        if not self._waiters or self._pumping:
            return
        self._pumping = True
        try:
            blocked: set[str] = set()
            finished: list[_Waiter[G]] = []
            for w in self._waiters:
                if w.future.done():
                    finished.append(w)
                    continue
                if blocked & w.roles:
                    blocked |= w.roles  # keep order among those waiting for the same roles
                    continue
                try:
                    grant = w.attempt()
                except RequestError as exc:
                    self._count(NO_WORKER)
                    w.future.set_exception(exc)
                    finished.append(w)
                    continue
                if grant is None:
                    blocked |= w.roles
                    if blocked >= self._all_roles:
                        break
                    continue
                w.future.set_result(grant)
                self._observe_wait(w.label, time.perf_counter() - w.queued_at)
                finished.append(w)
            for w in finished:
                self._forget(w)
        finally:
            self._pumping = False

    def drain(self) -> None:
        """Refuse new requests and answer every waiting one 503 at once (the frontend is stopping)."""
        self._draining = True
        for w in list(self._waiters):
            if not w.future.done():
                w.future.set_exception(
                    self._reject(DRAINING, "the frontend is shutting down; retry on another frontend")
                )
            self._forget(w)

    # ---------------------------------------------------------------------------------------- helpers

    def _expire(self, w: _Waiter[G]) -> None:
        if w.future.done():
            return
        waited = time.perf_counter() - w.queued_at
        w.future.set_exception(
            self._reject(
                QUEUE_TIMEOUT,
                f"no worker slot freed within {waited:.0f} s of queueing; retry later, add workers, or raise "
                "frontend.queue_timeout_s (`pdkit launch --queue-timeout-s`) or frontend.max_inflight_per_worker "
                "(`--max-inflight-per-worker`)",
            )
        )
        self._forget(w)
        self.pump()  # the expired waiter may have been blocking others

    def _forget(self, w: _Waiter[G]) -> None:
        if w.timer is not None:
            w.timer.cancel()
            w.timer = None
        if self._waiters.pop(w, False) is None:
            self._set_depth(w.label, -1)

    def _reject(self, reason: str, message: str) -> RequestError:
        self._count(reason)
        return RequestError(503, message, retry_after=self.retry_after_s)

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.admission_rejections.labels(reason).inc()

    def _set_depth(self, label: str, delta: int) -> None:
        n = self._depth[label] = self._depth.get(label, 0) + delta
        if self._metrics is not None:
            self._metrics.queue_depth.labels(label).set(n)

    def _observe_wait(self, label: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.queue_wait.labels(label).observe(seconds)
