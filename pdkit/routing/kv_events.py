"""vLLM 0.26.0's KV-event wire format and ZMQ publisher, without importing vLLM.

Why a re-implementation: the frontend (a consumer) and the simulated engine (a producer) must speak
exactly what a real vLLM worker speaks (``vllm/distributed/kv_events.py``), but pdkit may not import
vLLM at import time (the frontend runs on machines without it).  The msgspec structs below mirror
vLLM's field by field and in the same order -- msgpack maps keep field order, so order is part of the
bytes -- and the tests encode the same events with both and compare the bytes.

Wire format (one ZMQ multipart message per batch)::

    [topic (utf-8), seq (8 bytes, big-endian, from 0), msgpack(KVEventBatch)]

``KVEventBatch`` is ``array_like``: ``[ts, [events...], data_parallel_rank]``; each event is a msgpack
map tagged ``{"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...}`` with default-valued
trailing fields omitted.

Replay (the publisher's ROUTER socket): a DEALER sends ``[b"", start_seq (8 bytes BE)]``; the publisher
answers with one ``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq`` and ends
with ``[b"", b"", END_SEQ, b""]`` where ``END_SEQ`` is -1 as a signed 8-byte integer.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

ExternalBlockHash = bytes | int

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_FS = "FS"
MEDIUM_OBJ = "OBJ"

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A timestamped batch of events (one engine step's worth)."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged union; the tag is the class name, so names must match vLLM's."""


class BlockStored(KVCacheEvent):
    """Blocks entered the cache: hashes in chain order, the parent of the first, and their tokens."""

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks left the cache (evicted)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The whole cache was reset (e.g. ``/reset_prefix_cache``): drop everything known of this worker."""


class KVEventBatch(EventBatch):
    """What travels on the wire."""

    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    """msgpack bytes of one batch, identical to what vLLM's publisher sends."""
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Parse one payload (the third frame); raises ``msgspec.DecodeError`` on garbage."""
    return _decoder.decode(payload)


def seq_to_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=seq < 0)


def seq_from_bytes(raw: bytes) -> int:
    """Sequence number of a frame; the replay end marker reads as -1."""
    return int.from_bytes(raw, "big", signed=True)


def should_bind(endpoint: str) -> bool:
    """vLLM's heuristic: bind for wildcard, IPv6-any, ipc:// and inproc:// endpoints, connect otherwise.

    It lets a frontend bind one SUB socket that every worker connects to (``tcp://frontend:port``), or
    each worker bind its own (``tcp://*:5557``) for the frontend to connect to.
    """
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """ZMQ PUB publisher with a replay buffer, behaving like vLLM's ``ZmqEventPublisher``.

    A background thread owns both sockets (ZMQ sockets are not thread-safe); :meth:`publish` only
    enqueues.  ``bind`` overrides the bind/connect heuristic -- tests bind ``tcp://127.0.0.1:0``, which
    vLLM's heuristic would try to *connect* to.  After construction :attr:`endpoint` and
    :attr:`replay_endpoint` hold the resolved addresses (real ports when 0 was given).
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
        bind: bool | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._topic = topic.encode("utf-8")
        self._dp_rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue()
        self._seq = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        do_bind = should_bind(endpoint) if bind is None else bind
        if do_bind:
            self._pub.bind(endpoint)
            self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        self._replay: zmq.Socket[Any] | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="pdkit-kv-events", daemon=True)
        self._thread.start()

    @property
    def next_seq(self) -> int:
        """Sequence number the next published batch will carry (batches sent so far)."""
        return self._seq

    def publish(self, batch: KVEventBatch) -> None:
        """Queue a batch; the DP rank is stamped when unset (as vLLM does)."""
        if not self._running:
            raise RuntimeError("publisher is closed")
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._dp_rank
        self._queue.put(batch)

    def publish_events(self, events: list[KVEvent], ts: float | None = None) -> None:
        """Convenience: wrap events into one batch stamped with wall-clock time."""
        if events:
            self.publish(KVEventBatch(ts=time.time() if ts is None else ts, events=list(events)))

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every queued batch has been sent (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _run(self) -> None:
        while self._running or not self._queue.empty():
            if self._replay is not None:
                with contextlib.suppress(zmq.ZMQError):
                    while self._replay.poll(0):
                        self._serve_replay()
            try:
                batch = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if batch is None:
                self._queue.task_done()
                break
            seq = self._seq
            payload = encode_batch(batch)
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            except zmq.ZMQError:
                logger.exception("KV event publish failed")
            self._buffer.append((seq, payload))
            self._seq = seq + 1
            self._queue.task_done()

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("invalid KV-event replay request (%d frames)", len(frames))
            return
        client, _, start_raw = frames
        start = int.from_bytes(start_raw, "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def close(self, timeout: float = 1.0) -> None:
        """Flush what is queued (up to ``timeout``), stop the thread, close the sockets."""
        if not self._running:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)


def request_replay(
    ctx: zmq.Context[Any], replay_endpoint: str, start_seq: int, timeout_ms: int = 2000
) -> Iterator[tuple[bytes, int, KVEventBatch]]:
    """Ask a publisher for every buffered batch from ``start_seq`` on; yields (topic, seq, batch).

    Uses a DEALER socket (a REQ socket breaks on the second reply frame set).  Stops at the end
    marker; raises ``TimeoutError`` when the publisher does not answer within ``timeout_ms`` per reply.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(replay_endpoint)
        sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
        while True:
            if not sock.poll(timeout_ms):
                raise TimeoutError(f"no replay answer from {replay_endpoint}")
            frames = sock.recv_multipart()
            _, topic, seq_raw, payload = frames
            seq = seq_from_bytes(seq_raw)
            if seq < 0:
                return
            yield topic, seq, decode_batch(payload)
    finally:
        sock.close(linger=0)
