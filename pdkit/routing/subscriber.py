"""The frontend's KV-event subscriber: one bound ZMQ SUB socket that every worker's publisher connects to.

Why bind on the frontend: vLLM's publisher *connects* when its endpoint names a host
(``tcp://frontend:8101``), so one SUB socket serves the whole fleet and workers can come and go
without the frontend dialling anyone.  Batches carry no worker id, so each worker publishes under its
own topic; :meth:`KvEventSubscriber.add_worker` maps topic -> worker id and records the worker's replay
endpoint (a ROUTER the worker binds), used to fill sequence gaps (see :mod:`pdkit.routing.kv_index`).

Batches of topics nobody added are dropped: when the worker is added later, its first batch (seq > 0)
reads as a gap from 0 and the replay buffer supplies what was missed.

Replay uses blocking DEALER calls (:func:`~pdkit.routing.kv_events.request_replay`) in a worker thread;
while it runs the live socket keeps queueing, and the batches the replay already covered are dropped as
duplicates afterwards.  Index updates all happen on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pdkit.routing.kv_events import KVEventBatch, decode_batch, request_replay, seq_from_bytes
from pdkit.routing.kv_index import Gap, KvIndex

log = logging.getLogger("pdkit.routing.subscriber")

MAX_BATCH_BYTES = 64 << 20


def connectable(endpoint: str, host: str | None) -> str:
    """A bind-style endpoint (``tcp://*:5558``, ``tcp://0.0.0.0:5558``) made connectable via ``host``."""
    if host is None:
        return endpoint
    for wild in ("*", "0.0.0.0", "[::]"):
        prefix = f"tcp://{wild}:"
        if endpoint.startswith(prefix):
            h = f"[{host}]" if ":" in host and not host.startswith("[") else host
            return f"tcp://{h}:{endpoint[len(prefix) :]}"
    return endpoint


class KvEventSubscriber:
    """Receives every worker's batches and keeps a :class:`KvIndex` up to date.

    Lifecycle (inside the event loop): ``port = sub.bind()``, ``sub.start()``, ``add_worker`` /
    ``remove_worker`` as workers register and leave, ``await sub.close()``.
    """

    def __init__(
        self,
        index: KvIndex,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        replay_timeout_ms: int = 2000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.replay_timeout_ms = replay_timeout_ms
        self._own_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sync_ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._topics: dict[bytes, str] = {}
        self._replay: dict[str, str | None] = {}
        self.processed = 0  # batches handled (applied, dropped or repaired): tests wait on it

    @property
    def endpoint(self) -> str:
        """What workers' ``--kv-events-config`` ``endpoint`` must name (reachable host, bound port)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"tcp://{host}:{self.port}"

    def bind(self) -> int:
        """Bind the SUB socket (a free port when ``port`` is 0); returns the port."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{host}")
            else:
                sock.bind(f"tcp://{host}:{self.port}")
        except zmq.ZMQError:
            sock.close(linger=0)  # an open socket would make close()'s ctx.term() wait forever
            raise
        self._sock = sock
        return self.port

    def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._task = asyncio.create_task(self._run(), name="pdkit-kv-subscriber")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.term()

    # -- workers ---------------------------------------------------------------------------------

    def add_worker(
        self, worker_id: str, replay_endpoint: str | None, *, topic: str | None = None, host: str | None = None
    ) -> None:
        """Track ``worker_id`` publishing under ``topic`` (default: the worker id).

        ``replay_endpoint``: the worker's replay ROUTER; a bind-style address (``tcp://*:5558``) is
        completed with ``host`` (the worker's host).  None: gaps cannot be filled, only cleared.
        """
        t = (topic if topic is not None else worker_id).encode("utf-8")
        for old_topic, wid in list(self._topics.items()):
            if wid == worker_id and old_topic != t:
                del self._topics[old_topic]
        self._topics[t] = worker_id
        self._replay[worker_id] = connectable(replay_endpoint, host) if replay_endpoint else None
        self.index.add_worker(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        for t, wid in list(self._topics.items()):
            if wid == worker_id:
                del self._topics[t]
        self._replay.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def worker_ids(self) -> list[str]:
        return list(self._replay)

    # -- receiving -------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            try:
                await self.handle(frames)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad batch must not stop routing updates
                log.exception("KV-event batch handling failed")
            finally:
                self.processed += 1

    async def handle(self, frames: list[bytes]) -> None:
        """Apply one ``[topic, seq, payload]`` message; replays when it reveals a gap."""
        metrics = self.index.metrics
        if len(frames) != 3 or len(frames[1]) != 8:
            if metrics is not None:
                metrics.dropped.labels("malformed").inc()
            return
        topic, seq_raw, payload = frames
        worker_id = self._topics.get(topic)
        if worker_id is None:
            if metrics is not None:
                metrics.dropped.labels("unknown_worker").inc()
            return
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            if metrics is not None:
                metrics.dropped.labels("undecodable").inc()
            return  # the next batch shows the gap; replay (or a clear) repairs it
        seq = seq_from_bytes(seq_raw)
        gap = self.index.observe(worker_id, seq, batch)
        if gap is not None:
            await self._repair(gap, seq, batch)

    async def _repair(self, gap: Gap, seq: int, batch: KVEventBatch) -> None:
        endpoint = self._replay.get(gap.worker_id)
        metrics = self.index.metrics
        replayed: list[tuple[int, KVEventBatch]] | None = None
        if endpoint is not None:
            try:
                replayed = await asyncio.to_thread(self._fetch_replay, endpoint, gap.expected)
            except (TimeoutError, zmq.ZMQError, msgspec.DecodeError, ValueError) as exc:
                log.warning("KV-event replay from %s (%s) failed: %s", endpoint, gap.worker_id, exc)
        if not self.index.has_worker(gap.worker_id):
            return  # removed while the replay ran
        outcome = self.index.resolve_gap(gap, replayed, (seq, batch))
        if metrics is not None:
            metrics.replays.labels(gap.worker_id, outcome if endpoint is not None else "unavailable").inc()

    def _fetch_replay(self, endpoint: str, start: int) -> list[tuple[int, KVEventBatch]]:
        return [(s, b) for _, s, b in request_replay(self._sync_ctx, endpoint, start, self.replay_timeout_ms)]
