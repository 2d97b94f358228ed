"""KV index: tiers, removal, clears, bounded memory; live ZMQ, gaps, replay and restarts.

Gaps are made deterministic by sending the "live" stream from a raw PUB socket (the exact bytes the
real publisher sends: same encoder, same framing) while a real :class:`KVEventPublisher` holds the
history and answers replay requests on its real ROUTER socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
from loopback import index_synced, wait_for
from prometheus_client import CollectorRegistry

from pdkit.routing import kv_events as ke
from pdkit.routing.block_hash import BlockHasher
from pdkit.routing.kv_index import CPU, DISK, GPU, KvIndex, tier_of
from pdkit.routing.kv_metrics import KvRoutingMetrics
from pdkit.routing.subscriber import KvEventSubscriber, connectable
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import SimTokenizer


def stored(hashes: list[int], medium: str | None = "GPU", parent: int | None = None) -> ke.BlockStored:
    return ke.BlockStored(
        block_hashes=list(hashes), parent_block_hash=parent, token_ids=[0] * 16 * len(hashes), block_size=16,
        lora_id=None, medium=medium, lora_name=None,
    )  # fmt: skip


def removed(hashes: list[int], medium: str | None = "GPU") -> ke.BlockRemoved:
    return ke.BlockRemoved(block_hashes=list(hashes), medium=medium)


def batch(*events: Any, ts: float = 1000.0) -> ke.KVEventBatch:
    return ke.KVEventBatch(ts=ts, events=list(events), data_parallel_rank=0)


def metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


# -- pure index behaviour ----------------------------------------------------------------------


def test_tiers_from_medium() -> None:
    assert [tier_of(m) for m in (None, "GPU", "cpu", "CPU", "FS", "OBJ", "LOCAL_DISK")] == [
        "GPU", "GPU", "CPU", "CPU", "DISK", "DISK", "DISK",
    ]  # fmt: skip


def test_store_remove_per_tier_and_clear() -> None:
    reg = CollectorRegistry()
    idx = KvIndex(metrics=KvRoutingMetrics(reg))
    idx.add_worker("w")
    idx.apply("w", batch(stored([1, 2, 3]), stored([2, 3], "CPU"), stored([9], "FS")))
    assert idx.size("w") == {"GPU": 3, "CPU": 2, "DISK": 1}
    assert idx.tiers("w", 2) == GPU | CPU and idx.tiers("w", 9) == DISK
    assert idx.prefix_tiers("w", [1, 2, 3, 4, 9]) == [GPU, GPU | CPU, GPU | CPU]  # stops at the first miss
    assert idx.prefix_tiers("w", [5, 1]) == []
    # a GPU eviction leaves the CPU copy; a removal of an unknown block is harmless
    idx.apply("w", batch(removed([2]), removed([77]), removed([1], "CPU")))
    assert idx.tiers("w", 2) == CPU and idx.tiers("w", 1) == GPU
    assert idx.size("w") == {"GPU": 2, "CPU": 2, "DISK": 1}
    assert metric(reg, "pdkit_kv_index_blocks", worker="w", tier="CPU") == 2
    idx.apply("w", batch(ke.AllBlocksCleared(), stored([4])))  # events after the clear still apply
    assert idx.size("w") == {"GPU": 1, "CPU": 0, "DISK": 0} and idx.tiers("w", 4) == GPU
    assert metric(reg, "pdkit_kv_index_resets_total", worker="w", reason="cleared") == 1


def test_memory_is_bounded_oldest_first() -> None:
    idx = KvIndex(max_blocks_per_worker=4)
    idx.add_worker("w")
    idx.apply("w", batch(stored([1, 2, 3])))
    idx.apply("w", batch(stored([1])))  # re-announced: now the newest
    idx.apply("w", batch(stored([4, 5]), stored([6], "CPU")))
    assert len(idx.worker("w") or []) == 4
    assert [h for h in (1, 2, 3, 4, 5, 6) if idx.tiers("w", h)] == [1, 4, 5, 6]
    assert idx.size("w") == {"GPU": 3, "CPU": 1, "DISK": 0}


def test_worker_removal_drops_entries_and_gauges() -> None:
    reg = CollectorRegistry()
    idx = KvIndex(metrics=KvRoutingMetrics(reg))
    idx.add_worker("a")
    idx.add_worker("b")
    idx.apply("a", batch(stored([1, 2])))
    idx.apply("b", batch(stored([1])))
    assert idx.remove_worker("a") and not idx.remove_worker("a")
    assert idx.prefix_tiers("a", [1, 2]) == [] and idx.prefix_tiers("b", [1, 2]) == [GPU]
    assert reg.get_sample_value("pdkit_kv_index_blocks", {"worker": "a", "tier": "GPU"}) is None
    assert metric(reg, "pdkit_kv_index_blocks", worker="b", tier="GPU") == 1
    assert idx.observe("a", 0, batch(stored([3]))) is None  # unknown worker: dropped, not re-created
    assert not idx.has_worker("a")


def test_sequence_logic_without_sockets() -> None:
    idx = KvIndex()
    idx.add_worker("w")
    assert idx.observe("w", 0, batch(stored([1]))) is None
    gap = idx.observe("w", 3, batch(stored([4])))
    assert gap is not None and (gap.expected, gap.got) == (1, 3)
    # the replay returns 1..4 (the publisher moved on meanwhile): applied once, in order
    replayed = [(2, batch(removed([1]))), (1, batch(stored([2]))), (3, batch(stored([4]))), (4, batch(stored([5])))]
    assert idx.resolve_gap(gap, replayed, (3, batch(stored([4])))) == "ok"
    assert [h for h in (1, 2, 4, 5) if idx.tiers("w", h)] == [2, 4, 5]
    assert idx.observe("w", 4, batch(stored([99]))) is None  # the live copy of a replayed batch: a duplicate
    assert not idx.tiers("w", 99)
    # a publisher restart (seq back to 0) means an empty cache
    assert idx.observe("w", 0, batch(stored([7]))) is None
    assert [h for h in (2, 4, 7) if idx.tiers("w", h)] == [7]
    # a gap that replay cannot fill clears, then keeps the contiguous rest
    gap = idx.observe("w", 5, batch(stored([8])))
    assert gap is not None and idx.resolve_gap(gap, None, (5, batch(stored([8])))) == "failed"
    assert [h for h in (7, 8) if idx.tiers("w", h)] == [8]
    assert idx.observe("w", 6, batch(stored([9]))) is None and idx.tiers("w", 9)


def test_connectable_fills_wildcards() -> None:
    assert connectable("tcp://*:5558", "10.0.0.2") == "tcp://10.0.0.2:5558"
    assert connectable("tcp://0.0.0.0:5558", "h") == "tcp://h:5558"
    assert connectable("tcp://10.0.0.1:5558", "h") == "tcp://10.0.0.1:5558"
    assert connectable("tcp://*:1", "::1") == "tcp://[::1]:1"


# -- real sockets --------------------------------------------------------------------------------


@pytest.fixture
async def sub() -> AsyncIterator[KvEventSubscriber]:
    reg = CollectorRegistry()
    s = KvEventSubscriber(KvIndex(metrics=KvRoutingMetrics(reg)), "127.0.0.1", 0, replay_timeout_ms=3000)
    s.registry = reg  # type: ignore[attr-defined]
    s.start()
    yield s
    await s.close()


class Injector:
    """A raw PUB socket connected to the subscriber: the "network" between publisher and frontend."""

    def __init__(self, sub: KvEventSubscriber) -> None:
        self.sub = sub
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(sub.endpoint)

    async def ready(self) -> None:
        """Send to an unknown topic until one arrives (PUB drops messages until the link is up)."""
        for _ in range(2000):
            before = self.sub.processed
            self.sock.send_multipart([b"nobody", ke.seq_to_bytes(0), ke.encode_batch(batch())])
            await asyncio.sleep(0.005)
            if self.sub.processed > before:
                return
        raise AssertionError("subscriber never received")

    async def send(self, topic: str, seq: int, b: ke.KVEventBatch) -> None:
        before = self.sub.processed
        self.sock.send_multipart([topic.encode(), ke.seq_to_bytes(seq), ke.encode_batch(b)])
        await wait_for(lambda: self.sub.processed > before, f"batch {seq} handled")

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
async def inj(sub: KvEventSubscriber) -> AsyncIterator[Injector]:
    """An injector whose link to the subscriber is up; closed after the test."""
    injector = Injector(sub)
    try:
        await injector.ready()
        yield injector
    finally:
        injector.close()


@pytest.fixture
async def history() -> AsyncIterator[tuple[ke.KVEventPublisher, list[ke.KVEventBatch]]]:
    """A real publisher whose live stream goes nowhere; its replay buffer is the truth."""
    pub = ke.KVEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="w", bind=True)
    batches = [
        batch(stored([1, 2])), batch(stored([3], parent=2)), batch(removed([1])), batch(stored([5], "CPU")),
        batch(stored([6])), batch(removed([3])),
    ]  # fmt: skip
    for b in batches:
        pub.publish(b)
    assert await asyncio.to_thread(pub.wait_idle)
    yield pub, batches
    await asyncio.to_thread(pub.close)


def held(idx: KvIndex, wid: str) -> list[int]:
    return [h for h in range(10) if idx.tiers(wid, h)]


async def test_gap_is_filled_from_the_replay_endpoint(
    sub: KvEventSubscriber, history: tuple[ke.KVEventPublisher, list[ke.KVEventBatch]], inj: Injector
) -> None:
    pub, batches = history
    sub.add_worker("w1", pub.replay_endpoint, topic="w")
    await inj.send("w", 0, batches[0])
    assert held(sub.index, "w1") == [1, 2]
    await inj.send("w", 4, batches[4])  # 1..3 lost on the way
    assert held(sub.index, "w1") == [2, 5, 6]  # the replay brought 1..5: the publisher's whole history
    await inj.send("w", 5, batches[5])  # the replay covered 5 already: a duplicate, dropped
    await inj.send("w", 6, batch(stored([7])))
    assert held(sub.index, "w1") == [2, 5, 6, 7]
    reg = sub.registry  # type: ignore[attr-defined]
    assert metric(reg, "pdkit_kv_event_gaps_total", worker="w1") == 1
    assert metric(reg, "pdkit_kv_event_replays_total", worker="w1", result="ok") == 1
    assert metric(reg, "pdkit_kv_index_resets_total", worker="w1", reason="gap") == 0
    assert metric(reg, "pdkit_kv_event_lag_seconds", worker="w1") > 0


async def test_late_join_replays_from_zero_and_restart_clears(
    sub: KvEventSubscriber, history: tuple[ke.KVEventPublisher, list[ke.KVEventBatch]], inj: Injector
) -> None:
    pub, batches = history
    await inj.send("w", 2, batches[2])  # before add_worker: unknown topic, dropped
    assert not sub.index.has_worker("w1")
    sub.add_worker("w1", pub.replay_endpoint, topic="w")
    await inj.send("w", 3, batches[3])  # first contact at seq 3 -> replay from 0
    assert held(sub.index, "w1") == [2, 5, 6]
    assert sub.index.size("w1") == {"GPU": 2, "CPU": 1, "DISK": 0}
    await inj.send("w", 0, batch(stored([9])))  # a new publisher process starts again at 0
    assert held(sub.index, "w1") == [9]
    reg = sub.registry  # type: ignore[attr-defined]
    assert metric(reg, "pdkit_kv_index_resets_total", worker="w1", reason="restart") == 1
    assert metric(reg, "pdkit_kv_event_batches_dropped_total", reason="unknown_worker") >= 1


async def test_unfillable_gap_clears_and_resyncs(
    sub: KvEventSubscriber, history: tuple[ke.KVEventPublisher, list[ke.KVEventBatch]], inj: Injector
) -> None:
    pub, batches = history
    sub.add_worker("nr", None, topic="nr")  # no replay endpoint
    await inj.send("nr", 0, batches[0])
    await inj.send("nr", 3, batches[3])
    # batch 2 (removing block 1) may be lost: block 1 must not be predicted any more
    assert held(sub.index, "nr") == [5]
    await inj.send("nr", 4, batches[4])
    assert held(sub.index, "nr") == [5, 6]
    reg = sub.registry  # type: ignore[attr-defined]
    assert metric(reg, "pdkit_kv_event_replays_total", worker="nr", result="unavailable") == 1
    # a replay endpoint that does not answer: same outcome, and the loop keeps running
    dead: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    port = dead.bind_to_random_port("tcp://127.0.0.1")
    dead.close(0)
    sub.replay_timeout_ms = 200
    sub.add_worker("dead", f"tcp://127.0.0.1:{port}", topic="dead")
    await inj.send("dead", 2, batches[0])
    assert held(sub.index, "dead") == [1, 2]
    assert metric(reg, "pdkit_kv_event_replays_total", worker="dead", result="failed") == 1
    sub.remove_worker("dead")
    await inj.send("dead", 3, batches[1])
    assert not sub.index.has_worker("dead")


def _sim(topic: str, endpoint: str, **kw: Any) -> SimSettings:
    return SimSettings(
        time_scale=0, hash_seed="11", kv_events_endpoint=endpoint, kv_events_replay_endpoint="tcp://127.0.0.1:0",
        kv_events_topic=topic, kv_events_bind=False, **kw,
    )  # fmt: skip


async def _complete(http: aiohttp.ClientSession, w: SimWorker, prompt: str, max_tokens: int = 1) -> None:
    async with http.post(w.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def connect_sim(http: aiohttp.ClientSession, sub: KvEventSubscriber, w: SimWorker, wid: str) -> None:
    """Register the worker and push requests until its publisher's link is up (then replay fills in)."""
    sub.add_worker(wid, w.kv_events_replay_endpoint, topic=w.settings.kv_events_topic)
    for i in range(500):
        await _complete(http, w, f"link warm up {wid} number {i} " * 4)
        st = sub.index.worker(wid)
        if st is not None and st.last_seq is not None:
            break
        await asyncio.sleep(0.01)
    await index_synced(sub.index, w, wid)


async def test_sim_worker_events_reach_the_index(sub: KvEventSubscriber) -> None:
    """A simulated vLLM worker connects its publisher to the bound SUB socket; blocks, evictions and
    /reset_prefix_cache show up in the index, hashed as BlockHasher hashes the prompt."""
    async with aiohttp.ClientSession() as http, SimWorker(_sim("sim-a", sub.endpoint, kv_capacity_blocks=64)) as w:
        await connect_sim(http, sub, w, "A")
        tok = SimTokenizer(w.settings.model)
        prompt = "the index learns what the simulated worker caches " * 6
        await _complete(http, w, prompt)
        await index_synced(sub.index, w, "A")
        hashes = BlockHasher(16, "sha256", "11").event_hashes(tok.encode(prompt))
        assert len(hashes) >= 4
        assert sub.index.prefix_tiers("A", hashes) == [GPU] * len(hashes)
        # fill the small cache with other prompts: evictions reach the index as BlockRemoved
        for j in range(12):
            await _complete(http, w, " ".join(f"x{j}y{i}" for i in range(60)))
        await index_synced(sub.index, w, "A")
        assert sub.index.prefix_tiers("A", hashes) == []
        assert sub.index.size("A")["GPU"] <= 64
        async with http.post(w.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        await index_synced(sub.index, w, "A")
        assert sub.index.size("A") == {"GPU": 0, "CPU": 0, "DISK": 0}
