"""The simulator's KV cache and scheduler: vLLM-equal events, LRU reuse, queueing, preemption."""

from __future__ import annotations

import random
from typing import Any

import aiohttp
import msgspec
import pytest
from vllm_versions import same_kv_event_wire

from pdkit import prom
from pdkit.routing import kv_events
from pdkit.routing.block_hash import BlockHasher
from pdkit.sim.engine import SimEngine, SimRequest
from pdkit.sim.kv_cache import BlockPool
from pdkit.sim.metrics import SimMetrics
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import OutputModel, SimTokenizer


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


@pytest.mark.vllm
def test_block_pool_events_equal_vllm_block_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same allocate/cache/free/evict sequence on vLLM's BlockPool and ours: same event bytes."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.core.block_pool import BlockPool as VllmPool
    from vllm.v1.request import Request

    monkeypatch.setenv("PYTHONHASHSEED", "5")
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    kcu.init_none_hash(sha256)
    hasher = BlockHasher(16, "sha256", "5")
    vpool = VllmPool(7, enable_caching=True, hash_block_size=16, enable_kv_cache_events=True)  # 6 + null block
    pool = BlockPool(6, 16)
    enc = msgspec.msgpack.Encoder()

    def vreq(tokens: list[int]) -> Request:
        return Request(
            "r", tokens, SamplingParams(max_tokens=1), None, block_hasher=kcu.get_request_block_hasher(16, sha256)
        )

    a, b = _tokens(40, 1), _tokens(80, 2)
    # A: 3 blocks, 2 full ones cached, then freed
    va = vpool.get_new_blocks(3)
    vpool.cache_full_blocks(vreq(a), va, 0, 2, 16, 0)
    ma = pool.allocate(3)
    assert ma is not None
    pool.cache_full_blocks(ma, hasher.block_hashes(a), a, 0, 2)
    vpool.free_blocks(reversed(va))
    pool.free(ma)
    # B: 5 blocks -> evicts one of A's cached blocks (A's tail first)
    vb = vpool.get_new_blocks(5)
    vpool.cache_full_blocks(vreq(b), vb, 0, 5, 16, 0)
    mb = pool.allocate(5)
    assert mb is not None
    pool.cache_full_blocks(mb, hasher.block_hashes(b), b, 0, 5)
    theirs = [enc.encode(e) for e in vpool.take_events()]
    mine = [enc.encode(e) for e in pool.take_events()]
    assert len(mine) == len(theirs) and all(same_kv_event_wire(m, t) for m, t in zip(mine, theirs, strict=True))
    assert [
        type(e).__name__
        for e in msgspec.msgpack.Decoder(list[kv_events.KVEvent]).decode(
            enc.encode([msgspec.msgpack.decode(x) for x in mine])
        )
    ] == ["BlockStored", "BlockRemoved", "BlockStored"]
    # A's head block survived and is still a prefix hit, in both pools
    ha = hasher.block_hashes(a)
    assert pool.longest_hit(ha, 2) == [ma[0]]
    assert vpool.get_cached_block(ha[0], [0]) is not None and vpool.get_cached_block(ha[1], [0]) is None
    assert pool.usage == pytest.approx(vpool.get_usage())


def test_lru_keeps_recently_used_prefixes() -> None:
    pool = BlockPool(4, 16, enable_events=False)
    h = BlockHasher(16, "sha256", "0")
    x, y = _tokens(32, 1), _tokens(32, 2)
    bx = pool.allocate(2)
    by = pool.allocate(2)
    assert bx is not None and by is not None
    pool.cache_full_blocks(bx, h.block_hashes(x), x, 0, 2)
    pool.cache_full_blocks(by, h.block_hashes(y), y, 0, 2)
    pool.free(bx)
    pool.free(by)
    hit = pool.longest_hit(h.block_hashes(x), 2)  # x used again: moves to the MRU end
    pool.touch(hit)
    pool.free(hit)
    assert pool.allocate(2) is not None  # evicts y, not x
    assert len(pool.longest_hit(h.block_hashes(x), 2)) == 2
    assert pool.longest_hit(h.block_hashes(y), 2) == []
    assert pool.allocate(3) is None


def _engine(capacity: int, **kw: Any) -> SimEngine:
    settings = SimSettings(time_scale=0, kv_capacity_blocks=capacity, hash_seed="0", **kw)
    return SimEngine(settings, OutputModel(SimTokenizer(settings.model)), SimMetrics("synth"), kv_bytes_per_token=1)


async def test_requests_wait_when_kv_is_full() -> None:
    eng = _engine(8)
    r1 = SimRequest("a", _tokens(80, 1), max_tokens=4)
    r2 = SimRequest("b", _tokens(80, 2), max_tokens=4)
    eng.add_request(r1)
    eng.add_request(r2)
    plan = eng._schedule()
    assert [r.request_id for r, _ in plan] == ["a"]
    eng._update_gauges()
    assert list(eng.waiting) == [r2] and eng.metrics.waiting._value.get() == 1  # type: ignore[attr-defined]
    assert eng.metrics.kv_usage._value.get() == pytest.approx(5 / 8)  # type: ignore[attr-defined]
    eng._apply(plan)
    while r1.state != "finished":
        eng._apply(eng._schedule())
    plan = eng._schedule()  # r1's blocks are free again: r2 runs
    assert [r.request_id for r, _ in plan] == ["b"]


async def test_chunked_prefill_respects_token_budget() -> None:
    eng = _engine(100, max_num_batched_tokens=64)
    r = SimRequest("long", _tokens(150, 3), max_tokens=2)
    eng.add_request(r)
    sizes = []
    while r.state != "finished":
        plan = eng._schedule()
        sizes.append(sum(n for _, n in plan))
        eng._apply(plan)
    assert sizes == [64, 64, 22, 1]


async def test_prefix_cache_hits_are_counted(http: aiohttp.ClientSession) -> None:
    async with SimWorker(SimSettings(time_scale=0, hash_seed="0")) as w:
        tok = SimTokenizer(w.settings.model)
        shared = " ".join(f"word{i}" for i in range(60))
        ids = tok.encode(shared + " first question")
        for suffix in (" first question", " second question"):
            async with http.post(w.url + "/v1/completions", json={"prompt": shared + suffix, "max_tokens": 2}) as r:
                assert r.status == 200
        async with http.get(w.url + "/metrics") as r:
            text = await r.text()
        common = 0
        ids2 = tok.encode(shared + " second question")
        while common < min(len(ids), len(ids2)) and ids[common] == ids2[common]:
            common += 1
        expected_hit = (common // 16) * 16
        assert expected_hit >= 64
        assert prom.total(text, "vllm:prefix_cache_hits_total") == expected_hit
        assert prom.total(text, "vllm:prefix_cache_queries_total") == len(ids) + len(ids2)


async def test_preemption_keeps_outputs_identical() -> None:
    """Tight KV forces preemption and recompute; answers stay those of a roomy engine."""
    outs: dict[int, list[list[int]]] = {}
    for capacity in (6, 1000):
        eng = _engine(capacity)
        reqs = [SimRequest(f"r{j}", _tokens(40, j), max_tokens=40) for j in range(3)]
        for r in reqs:
            eng.add_request(r)
        for _ in range(10_000):
            if all(r.state == "finished" for r in reqs):
                break
            eng._apply(eng._schedule())
        outs[capacity] = [r.output_ids for r in reqs]
        preemptions = eng.metrics.preemptions._value.get()  # type: ignore[attr-defined]
        assert (preemptions > 0) == (capacity == 6)
        assert eng.pool.num_free == capacity
    assert outs[6] == outs[1000]
    assert all(len(o) == 40 for o in outs[6])
