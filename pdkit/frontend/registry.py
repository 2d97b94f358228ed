"""The worker registry, fed by worker agents over a ZMQ ROUTER socket.

Why ZMQ and not HTTP polling: the agents push registration and load every heartbeat, so the request
path only reads in-memory state, and a dead worker vanishes after ``liveness_timeout_s`` without the
frontend probing anything.  Each agent message gets an :class:`~pdkit.protocol.Ack`; the token check
uses a constant-time compare, and a token error never mentions "register" (the agent would re-register
in a loop).

Ownership (docs/security.md): a worker id belongs to the agent that registered it.  The ack carries a
random session key; heartbeats and the deregistration must present it, and a second registration of a
live id is refused unless it does.  Cost is bounded: at most ``max_workers`` records, registrations
rate-limited per ZMQ identity and overall, and every change is reported to listeners one worker at a
time (``on_added`` / ``on_removed`` / ``on_forgotten``) instead of "something changed, resync all".

The records it keeps are :class:`~pdkit.routing.types.WorkerState`, the type routing policies read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq
import zmq.asyncio

from pdkit.protocol import Ack, Deregister, Heartbeat, Load, Register, WorkerInfo, encode, parse_message
from pdkit.routing.types import WorkerState
from pdkit.zmq_sockets import bind_tcp

log = logging.getLogger("pdkit.frontend.registry")

DEFAULT_MAX_WORKERS = 4096


class RegistrationRefused(Exception):
    """A registration the registry will not accept; the text goes to the agent's ack as is."""


def _key_ok(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


class Registry:
    """Workers by id.  All mutation happens on the event loop thread, so no locks are needed."""

    def __init__(
        self,
        liveness_s: float,
        on_change: Callable[[], None] | None = None,
        on_heartbeat: Callable[[WorkerState, Load], None] | None = None,
        remember_reaped_s: float = 60.0,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        on_added: Callable[[WorkerState], None] | None = None,
        on_removed: Callable[[WorkerState, bool], None] | None = None,
        on_forgotten: Callable[[str], None] | None = None,
    ) -> None:
        self.liveness_s = liveness_s
        self.max_workers = max_workers
        self.workers: dict[str, WorkerState] = {}
        self._on_change = on_change
        # Per-worker change hooks, O(1) each: (state) after a registration (also a repeated one),
        # (state, reaped) after a removal, (worker id) when a reaped worker is forgotten for good.
        self._on_added = on_added
        self._on_removed = on_removed
        self._on_forgotten = on_forgotten
        self._on_heartbeat = on_heartbeat  # (worker, its new load): counters carried in heartbeats
        # Workers dropped for silence (not deregistered), by id -> when: a loaded host can miss a few
        # heartbeats and come back; what the frontend knows of such a worker's cache is kept this long.
        self.remember_reaped_s = remember_reaped_s
        self.reaped: dict[str, float] = {}
        self._reaped_states: dict[str, WorkerState] = {}

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def claim(self, info: WorkerInfo, session_key: str | None) -> WorkerState:
        """Register on behalf of an agent: refuses a live id held by another session (the caller must
        present that registration's key) and new ids beyond ``max_workers``.  A reaped id may be taken
        afresh (a restarted agent), keeping its record so in-flight counts survive."""
        live = self.workers.get(info.worker_id)
        if live is not None and not _key_ok(session_key, live.session_key):
            raise RegistrationRefused(
                f"worker id {info.worker_id!r} is held by a live agent session; pick another --worker-id, "
                f"or wait until that agent has been silent for {self.liveness_s:g} s"
            )
        known = live is not None or info.worker_id in self._reaped_states
        if not known and len(self.workers) >= self.max_workers:
            raise RegistrationRefused(f"the frontend already holds max_workers={self.max_workers} workers")
        state = self.register(info)
        if live is None:
            state.session_key = secrets.token_urlsafe(24)  # a reaped record gets a fresh key
        return state

    def owns(self, worker_id: str, session_key: str | None) -> bool | None:
        """Whether ``session_key`` is ``worker_id``'s (constant-time); None for an unknown id."""
        state = self.workers.get(worker_id)
        if state is None:
            return None
        return _key_ok(session_key, state.session_key)

    def register(self, info: WorkerInfo) -> WorkerState:
        """Trusted registration (in process, and after :meth:`claim`'s checks): add or update in place."""
        now = time.monotonic()
        # A worker reaped for silence may still be running requests of ours: take its old record back so
        # they keep counting against max_inflight_per_worker and release the count they took.
        state = self.workers.get(info.worker_id) or self._reaped_states.get(info.worker_id)
        if state is not None:
            self.workers[info.worker_id] = state
            # Same id again (agent reconnected, engine restarted): update the record in place so requests
            # still running on it release their in-flight count against the object the policy reads.
            state.info = info
            state.last_seen = now
        else:
            state = WorkerState(info=info, last_seen=now)
            self.workers[info.worker_id] = state
        self.reaped.pop(info.worker_id, None)
        self._reaped_states.pop(info.worker_id, None)
        log.info("worker %s registered: %s at %s (%s)", info.worker_id, info.role, info.url, info.model)
        if self._on_added is not None:
            self._on_added(state)
        self._changed()
        return state

    def heartbeat(self, worker_id: str, seq: int, load: Load) -> bool:
        state = self.workers.get(worker_id)
        if state is None:
            return False
        state.last_seen = time.monotonic()
        state.seq = seq
        state.load = load
        if self._on_heartbeat is not None:
            self._on_heartbeat(state, load)
        return True

    def remove(self, worker_id: str, reason: str, *, reaped: bool = False) -> bool:
        state = self.workers.pop(worker_id, None)
        if state is None:
            return False
        log.info("worker %s removed: %s", worker_id, reason)
        if self._on_removed is not None:
            self._on_removed(state, reaped)
        self._changed()
        return True

    def reap(self) -> list[str]:
        """Drop workers silent for longer than the liveness timeout; returns their ids.

        They are remembered in :attr:`reaped` for ``remember_reaped_s``; when that runs out the change
        hook fires again so that listeners (the KV index) can forget them for good.
        """
        now = time.monotonic()
        cutoff = now - self.liveness_s
        dead = [wid for wid, w in self.workers.items() if w.last_seen < cutoff]
        for wid in dead:
            self.reaped[wid] = now
            self._reaped_states[wid] = self.workers[wid]
            self.remove(wid, f"no heartbeat for {self.liveness_s:g} s", reaped=True)
        expired = [wid for wid, t in self.reaped.items() if now - t >= self.remember_reaped_s]
        for wid in expired:
            del self.reaped[wid]
            self._reaped_states.pop(wid, None)
            if self._on_forgotten is not None:
                self._on_forgotten(wid)
        if expired:
            self._changed()
        return dead

    def of_role(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.info.role == role]

    def models(self) -> list[str]:
        return sorted({w.info.model for w in self.workers.values()})


class RateLimit:
    """Token buckets for registrations: one per ZMQ identity (the most recent ``max_senders``) plus one
    overall, since a flooder can pick a new identity per message.  Refused registrations cost a parse and
    an ack, never a registry change."""

    def __init__(
        self, per_sender_per_s: float = 5.0, per_sender_burst: float = 20.0, overall_per_s: float = 200.0,
        overall_burst: float = 400.0, max_senders: int = 10_000,
    ) -> None:  # fmt: skip
        self.per_sender = (per_sender_per_s, per_sender_burst)
        self.overall_rate = (overall_per_s, overall_burst)
        self.max_senders = max_senders
        self._senders: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._overall = (overall_burst, time.monotonic())

    @staticmethod
    def _take(bucket: tuple[float, float], rate: tuple[float, float], now: float) -> tuple[bool, tuple[float, float]]:
        level, last = bucket
        level = min(rate[1], level + (now - last) * rate[0])
        if level < 1.0:
            return False, (level, now)
        return True, (level - 1.0, now)

    def allow(self, sender: bytes) -> bool:
        now = time.monotonic()
        mine = self._senders.pop(sender, (self.per_sender[1], now))
        ok, mine = self._take(mine, self.per_sender, now)
        self._senders[sender] = mine
        while len(self._senders) > self.max_senders:
            self._senders.popitem(last=False)
        if not ok:
            return False
        ok, self._overall = self._take(self._overall, self.overall_rate, now)
        return ok


class RegistryServer:
    """The ROUTER socket: receives agent messages, updates the :class:`Registry`, acks each one."""

    # Messages handled before the loop yields to other tasks (HTTP): a flood must not starve /health.
    YIELD_EVERY = 32

    def __init__(
        self,
        registry: Registry,
        host: str,
        port: int,
        token: str | None,
        heartbeat_interval_s: float,
        on_message: Callable[[str, bool], None] | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.token = token
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_message = on_message
        self.rate_limit = rate_limit if rate_limit is not None else RateLimit()
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def bind(self) -> int:
        """Bind the ROUTER socket; returns the bound port (a free one when ``port`` is 0)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Oversized frames are dropped by libzmq before they reach Python.
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.port = bind_tcp(sock, self.host, self.port)
        self._sock = sock
        return self.port

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._reaper())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.destroy(linger=0)  # never blocks, unlike term() with a socket left open

    def _token_ok(self, token: str | None) -> bool:
        if not self.token:
            return True
        return token is not None and hmac.compare_digest(token.encode(), self.token.encode())

    def handle(self, raw: bytes, sender: bytes = b"") -> Ack:
        """Apply one agent frame (from ZMQ identity ``sender``) to the registry and build the reply."""
        try:
            msg = parse_message(raw)
        except ValueError as exc:
            self._count("invalid", False)
            return Ack(ok=False, error=str(exc))
        if isinstance(msg, Ack):
            self._count("ack", False)
            return Ack(ok=False, error="the frontend does not accept acks")
        if not self._token_ok(msg.token):
            self._count(msg.type, False)
            return Ack(ok=False, error="wrong or missing token: set PDKIT_TOKEN to the frontend's token")
        interval = self.heartbeat_interval_s
        if isinstance(msg, Register):
            if not self.rate_limit.allow(sender):
                self._count("register", False)
                return Ack(
                    ok=False,
                    error="rate limited: too many attempts from this sender, retry in a few seconds",
                    heartbeat_interval_s=interval,
                )
            try:
                state = self.registry.claim(msg.worker, msg.session_key)
            except RegistrationRefused as exc:
                self._count("register", False)
                return Ack(ok=False, error=str(exc), heartbeat_interval_s=interval)
            self._count("register", True)
            return Ack(ok=True, heartbeat_interval_s=interval, worker_id=state.worker_id, session_key=state.session_key)
        owned = self.registry.owns(msg.worker_id, msg.session_key)
        if isinstance(msg, Heartbeat):
            if owned is None:
                self._count("heartbeat", False)
                return Ack(
                    ok=False,
                    error=f"unknown worker {msg.worker_id}: register again",
                    heartbeat_interval_s=interval,
                    reregister=True,
                )
            if not owned:
                self._count("heartbeat", False)
                return Ack(
                    ok=False, error=f"wrong session key for worker {msg.worker_id!r}", heartbeat_interval_s=interval
                )
            self.registry.heartbeat(msg.worker_id, msg.seq, msg.load)
            self._count("heartbeat", True)
            return Ack(ok=True, heartbeat_interval_s=interval)
        assert isinstance(msg, Deregister)
        if owned is False:
            self._count("deregister", False)
            return Ack(ok=False, error=f"wrong session key for worker {msg.worker_id!r}")
        self.registry.remove(msg.worker_id, msg.reason or "deregistered")
        self._count("deregister", True)
        return Ack(ok=True)

    def _count(self, kind: str, ok: bool) -> None:
        if self._on_message is not None:
            self._on_message(kind, ok)

    async def _serve(self) -> None:
        assert self._sock is not None
        sock = self._sock
        handled = 0
        while True:
            frames = await sock.recv_multipart()
            handled += 1
            if handled % self.YIELD_EVERY == 0:
                # recv on a socket with queued messages completes without suspending: yield explicitly
                await asyncio.sleep(0)
            if len(frames) < 2:
                continue
            identity, payload = frames[0], frames[-1]
            try:
                ack = self.handle(payload, identity)
            except Exception:  # a hook's bug must not end the loop: every later heartbeat would go unheard
                log.exception("registry: handling an agent message failed")
                ack = Ack(ok=False, error="internal error in the frontend's registry; see its log")
            with contextlib.suppress(zmq.ZMQError):
                await sock.send_multipart([identity, encode(ack)])

    async def _reaper(self) -> None:
        period = max(0.02, min(self.heartbeat_interval_s, self.registry.liveness_s) / 2)
        while True:
            await asyncio.sleep(period)
            try:
                self.registry.reap()
            except Exception:  # as in _serve: one failing hook must not stop liveness checks for good
                log.exception("registry: reaping silent workers failed")
