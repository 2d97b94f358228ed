"""A minimal in-process registry client: announces an already-running engine over real ZMQ.

Why it exists: tests and ``scripts/bench_router.py`` start simulated engines in process
(:class:`pdkit.sim.server.SimWorker`) and need them registered without spawning a ``pdkit worker``
agent per engine.  It speaks the real protocol (DEALER socket, :mod:`pdkit.protocol`), so the frontend
cannot tell it from an agent; unlike the agent it does not scrape ``/metrics`` (the load it sends is
whatever the caller sets).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from pdkit.protocol import Ack, Deregister, Heartbeat, Load, Register, WorkerInfo, encode, parse_message
from pdkit.registry_session import RegistrySession


class RegistryClient:
    """One worker's registration.  ``await register()`` waits for the ack; ``start_heartbeats()`` beats
    until ``stop_heartbeats()`` (a worker that stops beating is dropped by the frontend's liveness)."""

    def __init__(self, endpoint: str, info: WorkerInfo, token: str | None = None, interval_s: float = 0.2) -> None:
        self.endpoint = endpoint
        self.info = info  # fixed for this client's life (the agent's can change: it learns max_model_len)
        self.session = RegistrySession(info, token)  # the protocol's rules, shared with the agent
        self.interval_s = interval_s
        self.load = Load()
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._beating = False
        self._beats: asyncio.Task[None] | None = None

    async def request(self, msg: Register | Heartbeat | Deregister, timeout_s: float = 10.0) -> Ack:
        """Send one message and wait for its ack."""
        await self._sock.send(encode(msg))
        raw = await asyncio.wait_for(self._sock.recv(), timeout=timeout_s)
        ack = parse_message(raw)
        assert isinstance(ack, Ack)
        return ack

    @property
    def session_key(self) -> str | None:
        """From the registration's ack (protocol version 2); kept and voided by the session's rules."""
        return self.session.session_key

    async def register(self) -> Ack:
        ack = await self.request(self.session.register())
        self.session.on_ack(ack)
        return ack

    async def heartbeat(self) -> Ack:
        """One heartbeat; its ack is returned as is (``start_heartbeats`` acts on ``reregister``)."""
        return await self.request(self.session.heartbeat(self.load))

    async def deregister(self, reason: str = "done") -> Ack:
        return await self.request(self.session.deregister(reason))

    def start_heartbeats(self) -> None:
        self._beating = True

        async def beat() -> None:
            # The flag, not only cancel(): on Python < 3.12 asyncio.wait_for can swallow a cancellation
            # that races with its inner future completing, and the loop would then beat forever.
            while self._beating:
                await asyncio.sleep(self.interval_s)
                if not self._beating:
                    break
                if self.session.on_ack(await self.heartbeat()):
                    await self.register()

        self._beats = asyncio.create_task(beat())

    async def stop_heartbeats(self) -> None:
        self._beating = False
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._beats
            self._beats = None

    async def close(self) -> None:
        await self.stop_heartbeats()
        self._sock.close(linger=0)


async def announce(
    endpoint: str,
    url: str,
    role: str,
    worker_id: str,
    model: str = "synth",
    token: str | None = None,
    interval_s: float = 0.2,
    heartbeats: bool = True,
    **info_fields: Any,
) -> RegistryClient:
    """Register the engine at ``url`` as ``role`` and keep it alive; raises if the frontend refuses.

    ``info_fields``: further :class:`~pdkit.protocol.WorkerInfo` fields (``kv_events_replay_endpoint``,
    ``kv_events_topic``, ``block_size`` for KV-aware routing)."""
    fields = {"worker_id": worker_id, "role": role, "url": url, "model": model, "engine": "sim", **info_fields}
    info = WorkerInfo.model_validate(fields)
    client = RegistryClient(endpoint, info, token=token, interval_s=interval_s)
    ack = await client.register()
    if not ack.ok:
        await client.close()
        raise RuntimeError(f"registration of {worker_id} refused: {ack.error}")
    if heartbeats:
        client.start_heartbeats()
    return client


def sse_text(raw: str) -> str:
    """Generated text of an OpenAI SSE stream (completions or chat); asserts it ends with ``[DONE]``."""
    import json

    out = []
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events and events[-1] == "[DONE]", "stream did not end with [DONE]"
    for e in events[:-1]:
        for c in json.loads(e).get("choices", []):
            out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(out)


async def wait_until(pred: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll ``pred`` (sync or async) until true; fails only after a generous deadline (no timed assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached before the deadline")
