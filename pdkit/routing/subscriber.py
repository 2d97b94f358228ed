"""The frontend's KV-event subscriber: one SUB socket per registered worker, connected to that worker.

Why connect to each worker (docs/security.md): KV events steer routing and carry prompt token ids.
A SUB socket the frontend binds accepts a PUB from any process that can reach the port, which let any
local user inject or wipe index entries.  Instead each worker's publisher *binds* (vLLM binds
``ipc://`` and wildcard endpoints) -- locally an ``ipc://`` file in the deployment's 0700 directory --
and the frontend connects one SUB to the endpoint that arrived in the worker's authenticated
registration.  A batch is attributed to the worker whose socket it came in on, never to a topic a
sender chose; a batch whose topic is not that worker's is dropped and counted (``wrong_topic``).

Legacy: :meth:`KvEventSubscriber.bind` still binds one shared SUB socket that publishers connect to
(topic -> worker id); only in-process tools use it (``FrontendSettings.kv_events_shared_sub``).

Each worker may also have a replay endpoint (a ROUTER the worker binds), used to fill sequence gaps
(see :mod:`pdkit.routing.kv_index`).  Replay uses blocking DEALER calls
(:func:`~pdkit.routing.kv_events.request_replay`) in a worker thread; while it runs the live socket
keeps queueing, and the batches the replay already covered are dropped as duplicates afterwards.  Index
updates all happen on the event loop.  Batches of workers not (yet) added are dropped: when the worker
is added later, its first batch (seq > 0) reads as a gap from 0 and the replay buffer supplies it.
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
from pdkit.zmq_sockets import bind_tcp

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
        port: int | None = 0,
        *,
        replay_timeout_ms: int = 2000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self.host = host
        self._shared = port is not None  # bind the legacy shared socket on start()
        self.port = port or 0
        self.replay_timeout_ms = replay_timeout_ms
        self._own_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sync_ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._topics: dict[bytes, str] = {}
        self._topic_of: dict[str, bytes] = {}
        self._replay: dict[str, str | None] = {}
        # worker id -> (connected endpoint, its SUB socket's receive task)
        self._links: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._unlinking: set[asyncio.Task[None]] = set()  # cancelled links still closing their socket
        self.processed = 0  # batches handled (applied, dropped or repaired): tests wait on it

    @property
    def endpoint(self) -> str | None:
        """The shared SUB socket's address (legacy, see :meth:`bind`), or None when none is bound."""
        if self._sock is None:
            return None
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"tcp://{host}:{self.port}"

    def bind(self) -> int:
        """Bind the shared SUB socket (a free port when ``port`` is 0); returns the port.

        Legacy and unauthenticated: any process that reaches the port can publish into the index.
        Deployments never bind it; workers' own publishers are connected by :meth:`add_worker`."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.port = bind_tcp(sock, self.host, self.port)
        self._sock = sock
        return self.port

    def start(self) -> None:
        """Bind the shared socket when a port was given (legacy) and receive on it; per-worker links
        start on :meth:`add_worker`."""
        if self._shared and self._sock is None:
            self.bind()
        if self._sock is not None:
            self._task = asyncio.create_task(self._run(), name="pdkit-kv-subscriber")

    async def close(self) -> None:
        links = [task for _, task in self._links.values()] + list(self._unlinking)
        self._links.clear()
        self._unlinking.clear()
        for task in links:
            task.cancel()
        for task in links:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        self,
        worker_id: str,
        replay_endpoint: str | None,
        *,
        topic: str | None = None,
        host: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Track ``worker_id`` publishing under ``topic`` (default: the worker id); O(1), idempotent.

        ``endpoint``: the worker's own bound publisher (``ipc://...``, ``tcp://*:5557``): a SUB socket is
        connected to it and what arrives there is that worker's.  None: the worker publishes to the
        shared socket (legacy).  ``replay_endpoint``: the worker's replay ROUTER.  Bind-style
        addresses (``tcp://*:5558``) are completed with ``host`` (the worker's host).  No replay
        endpoint: gaps cannot be filled, only cleared.
        """
        t = (topic if topic is not None else worker_id).encode("utf-8")
        old = self._topic_of.get(worker_id)
        if old is not None and old != t and self._topics.get(old) == worker_id:
            del self._topics[old]
        self._topic_of[worker_id] = t
        self._replay[worker_id] = connectable(replay_endpoint, host) if replay_endpoint else None
        self.index.add_worker(worker_id)
        target = connectable(endpoint, host) if endpoint else None
        if target is not None and target == self.endpoint:
            target = None  # it names the shared socket: the worker connects to us (legacy)
        if target is None:
            self._topics[t] = worker_id
        link = self._links.get(worker_id)
        if link is not None and link[0] != target:
            self._unlink(worker_id)
            link = None
        if target is not None and link is None:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_BYTES)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            if target.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.connect(target)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                log.warning("cannot connect to %s's KV events at %s: %s", worker_id, target, exc)
                return
            task = asyncio.get_running_loop().create_task(self._run_link(worker_id, sock), name=f"pdkit-kv-{worker_id}")
            self._links[worker_id] = (target, task)

    def remove_worker(self, worker_id: str) -> None:
        t = self._topic_of.pop(worker_id, None)
        if t is not None and self._topics.get(t) == worker_id:
            del self._topics[t]
        self._unlink(worker_id)
        self._replay.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def _unlink(self, worker_id: str) -> None:
        """Stop receiving from a worker; its socket closes when the task sees the cancellation (close()
        awaits the stragglers, so the context is never terminated with a socket open)."""
        link = self._links.pop(worker_id, None)
        if link is not None:
            task = link[1]
            task.cancel()
            self._unlinking.add(task)
            task.add_done_callback(self._unlinking.discard)

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

    async def _run_link(self, worker_id: str, sock: zmq.asyncio.Socket) -> None:
        """Receive one worker's own publisher; closes its socket when cancelled (worker removed)."""
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    await self.handle(frames, source=worker_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("KV-event batch handling failed (%s)", worker_id)
                finally:
                    self.processed += 1
        finally:
            sock.close(linger=0)

    def _drop(self, reason: str) -> None:
        metrics = self.index.metrics
        if metrics is not None:
            metrics.dropped.labels(reason).inc()

    async def handle(self, frames: list[bytes], source: str | None = None) -> None:
        """Apply one ``[topic, seq, payload]`` message; replays when it reveals a gap.

        ``source``: the worker whose own socket it came in on (None: the shared socket, where the
        topic names the worker)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._drop("malformed")
            return
        topic, seq_raw, payload = frames
        if source is not None:
            if source not in self._links:
                self._drop("unknown_worker")
                return
            if self._topic_of.get(source) != topic:
                self._drop("wrong_topic")  # another worker's topic on this worker's connection
                return
            worker_id: str | None = source
        else:
            worker_id = self._topics.get(topic)
        if worker_id is None:
            self._drop("unknown_worker")
            return
        try:
            batch = decode_batch(payload)
        except msgspec.DecodeError:
            self._drop("undecodable")
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
