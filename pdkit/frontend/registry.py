"""The worker registry, fed by worker agents over a ZMQ ROUTER socket.

Why ZMQ and not HTTP polling: the agents push registration and load every heartbeat, so the request
path only reads in-memory state, and a dead worker vanishes after ``liveness_timeout_s`` without the
frontend probing anything.  Each agent message gets an :class:`~pdkit.protocol.Ack`; the token check
uses a constant-time compare, and a token error never mentions "register" (the agent would re-register
in a loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdkit.protocol import Ack, Deregister, Heartbeat, Load, Register, WorkerInfo, encode, parse_message

log = logging.getLogger("pdkit.frontend.registry")


@dataclass(eq=False)
class WorkerState:
    """One registered engine: what it told us plus this frontend's own in-flight count."""

    info: WorkerInfo
    last_seen: float
    load: Load = field(default_factory=Load)
    seq: int = 0
    inflight: int = 0
    registered_at: float = field(default_factory=time.time)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def url(self) -> str:
        return self.info.url

    def as_json(self, now: float) -> dict[str, object]:
        return {
            **self.info.model_dump(),
            "load": self.load.model_dump(exclude_none=True),
            "inflight": self.inflight,
            "seq": self.seq,
            "last_seen_s_ago": round(now - self.last_seen, 3),
        }


class Registry:
    """Workers by id.  All mutation happens on the event loop thread, so no locks are needed."""

    def __init__(
        self,
        liveness_s: float,
        on_change: Callable[[], None] | None = None,
        on_heartbeat: Callable[[WorkerState, Load], None] | None = None,
        remember_reaped_s: float = 60.0,
    ) -> None:
        self.liveness_s = liveness_s
        self.workers: dict[str, WorkerState] = {}
        self._on_change = on_change
        self._on_heartbeat = on_heartbeat  # (worker, its new load): counters carried in heartbeats
        # Workers dropped for silence (not deregistered), by id -> when: a loaded host can miss a few
        # heartbeats and come back; what the frontend knows of such a worker's cache is kept this long.
        self.remember_reaped_s = remember_reaped_s
        self.reaped: dict[str, float] = {}
        self._reaped_states: dict[str, WorkerState] = {}

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def register(self, info: WorkerInfo) -> WorkerState:
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

    def remove(self, worker_id: str, reason: str) -> bool:
        state = self.workers.pop(worker_id, None)
        if state is None:
            return False
        log.info("worker %s removed: %s", worker_id, reason)
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
            self.remove(wid, f"no heartbeat for {self.liveness_s:g} s")
        expired = [wid for wid, t in self.reaped.items() if now - t >= self.remember_reaped_s]
        for wid in expired:
            del self.reaped[wid]
            self._reaped_states.pop(wid, None)
        if expired:
            self._changed()
        return dead

    def of_role(self, role: str) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.info.role == role]

    def models(self) -> list[str]:
        return sorted({w.info.model for w in self.workers.values()})


class RegistryServer:
    """The ROUTER socket: receives agent messages, updates the :class:`Registry`, acks each one."""

    def __init__(
        self,
        registry: Registry,
        host: str,
        port: int,
        token: str | None,
        heartbeat_interval_s: float,
        on_message: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.token = token
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_message = on_message
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def bind(self) -> int:
        """Bind the ROUTER socket; returns the bound port (a free one when ``port`` is 0)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Oversized frames are dropped by libzmq before they reach Python.
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
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

    def handle(self, raw: bytes) -> Ack:
        """Apply one agent frame to the registry and build the reply (pure; unit-testable)."""
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
            self.registry.register(msg.worker)
            self._count("register", True)
            return Ack(ok=True, heartbeat_interval_s=interval)
        if isinstance(msg, Heartbeat):
            ok = self.registry.heartbeat(msg.worker_id, msg.seq, msg.load)
            self._count("heartbeat", ok)
            if not ok:
                return Ack(
                    ok=False, error=f"unknown worker {msg.worker_id}: register again", heartbeat_interval_s=interval
                )
            return Ack(ok=True, heartbeat_interval_s=interval)
        assert isinstance(msg, Deregister)
        self.registry.remove(msg.worker_id, msg.reason or "deregistered")
        self._count("deregister", True)
        return Ack(ok=True)

    def _count(self, kind: str, ok: bool) -> None:
        if self._on_message is not None:
            self._on_message(kind, ok)

    async def _serve(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue
            identity, payload = frames[0], frames[-1]
            ack = self.handle(payload)
            with contextlib.suppress(zmq.ZMQError):
                await sock.send_multipart([identity, encode(ack)])

    async def _reaper(self) -> None:
        period = max(0.02, min(self.heartbeat_interval_s, self.registry.liveness_s) / 2)
        while True:
            await asyncio.sleep(period)
            self.registry.reap()
