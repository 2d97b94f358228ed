"""KV events of the simulated engine: real ZMQ SUB and replay, decoded with vLLM's own decoder."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import zmq

from pdkit.routing import kv_events
from pdkit.routing.block_hash import BlockHasher
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import SimTokenizer


def _settings(**kw: Any) -> SimSettings:
    return SimSettings(
        time_scale=0,
        hash_seed="11",
        kv_events_endpoint="tcp://127.0.0.1:0",
        kv_events_replay_endpoint="tcp://127.0.0.1:0",
        kv_events_topic="sim-0",
        kv_events_bind=True,
        **kw,
    )


async def _complete(http: aiohttp.ClientSession, w: SimWorker, prompt: str, max_tokens: int) -> None:
    async with http.post(w.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200
        await r.read()


async def _replay_all(w: SimWorker) -> list[tuple[int, kv_events.KVEventBatch]]:
    import asyncio

    assert w.kv_events_replay_endpoint is not None and w.publisher is not None
    assert await asyncio.to_thread(w.publisher.wait_idle)
    got = await asyncio.to_thread(
        lambda: list(kv_events.request_replay(zmq.Context.instance(), w.kv_events_replay_endpoint, 0))
    )
    return [(seq, batch) for _, seq, batch in got]


@pytest.mark.vllm
async def test_live_events_decode_with_vllm_and_hashes_match_vllm(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("vllm")
    import asyncio

    import msgspec
    from vllm import SamplingParams
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu
    from vllm.v1.request import Request

    async with SimWorker(_settings()) as w:
        assert w.kv_events_endpoint is not None
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"sim-0")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(w.kv_events_endpoint)
        try:
            for i in range(200):  # until the subscription is live (PUB drops earlier messages)
                await _complete(http, w, f"warm up number {i} " * 6, 1)
                if await asyncio.to_thread(sub.poll, 20):
                    break
            while sub.poll(50):
                sub.recv_multipart()
            prompt = "the live event stream carries exactly what vLLM would send " * 3
            await _complete(http, w, prompt, 20)
            decoder = msgspec.msgpack.Decoder(KVEventBatch)
            stored: list[Any] = []
            tok = SimTokenizer(w.settings.model)
            ids = tok.encode(prompt)
            expected_blocks = (len(ids) + 20 - 1) // 16  # the last sampled token is never computed
            while sum(len(e.block_hashes) for e in stored) < expected_blocks:
                assert await asyncio.to_thread(sub.poll, 5000), "events missing"
                topic, seq, payload = sub.recv_multipart()
                assert topic == b"sim-0" and len(seq) == 8
                batch = decoder.decode(payload)
                stored += [e for e in batch.events if type(e).__name__ == "BlockStored"]
        finally:
            sub.close(0)
    # chain structure: first event has no parent, later ones chain on the previous hash
    assert stored[0].parent_block_hash is None
    for prev, ev in zip(stored, stored[1:], strict=False):
        assert ev.parent_block_hash == prev.block_hashes[-1]
        assert ev.block_size == 16 and ev.medium == "GPU"
    tokens = [t for e in stored for t in e.token_ids]
    assert tokens[: len(ids)] == ids
    # vLLM's own request hasher over the same tokens gives the same (int) hashes
    monkeypatch.setenv("PYTHONHASHSEED", "11")
    kcu.init_none_hash(sha256)
    req = Request("x", ids, SamplingParams(max_tokens=20), None, block_hasher=kcu.get_request_block_hasher(16, sha256))
    req.append_output_token_ids(tokens[len(ids) :])
    assert [kcu.maybe_convert_block_hash(h) for h in req.block_hashes] == [h for e in stored for h in e.block_hashes]
    assert [h for e in stored for h in e.block_hashes] == BlockHasher(16, "sha256", "11").event_hashes(tokens)


async def test_eviction_emits_block_removed_and_replay_works(http: aiohttp.ClientSession) -> None:
    async with SimWorker(_settings(kv_capacity_blocks=8)) as w:
        tok = SimTokenizer(w.settings.model)
        prompts = [" ".join(f"w{j}n{i}" for i in range(30)) for j in range(4)]
        for p in prompts:
            await _complete(http, w, p, 2)
        batches = await _replay_all(w)
    assert [seq for seq, _ in batches] == list(range(len(batches)))
    stored: set[int | bytes] = set()
    removed: list[int | bytes] = []
    for _, b in batches:
        for e in b.events:
            if isinstance(e, kv_events.BlockStored):
                stored.update(e.block_hashes)
            elif isinstance(e, kv_events.BlockRemoved):
                assert len(e.block_hashes) == 1 and e.medium == "GPU"
                removed += e.block_hashes
    first = BlockHasher(16, "sha256", "11").event_hashes(tok.encode(prompts[0]))
    assert removed, "a full cache must evict"
    assert set(removed) <= stored
    assert first[-1] in removed  # the oldest prompt's tail went first


async def test_reset_prefix_cache_sends_all_blocks_cleared(http: aiohttp.ClientSession) -> None:
    async with SimWorker(_settings()) as w:
        await _complete(http, w, "something to cache " * 5, 1)
        async with http.post(w.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        batches = await _replay_all(w)
        assert isinstance(batches[-1][1].events[-1], kv_events.AllBlocksCleared)
        async with http.get(w.url + "/metrics") as r:
            assert "vllm:kv_cache_usage_perc" in await r.text()


async def test_events_disabled_by_default(http: aiohttp.ClientSession) -> None:
    async with SimWorker(SimSettings(time_scale=0)) as w:
        assert w.kv_events_endpoint is None and w.kv_events_replay_endpoint is None
        await _complete(http, w, "no events " * 5, 2)


async def test_decode_announces_pulled_blocks(http: aiohttp.ClientSession) -> None:
    """After a P->D transfer the decode holds the prompt's blocks and says so (as vLLM's decode does)."""
    async with SimWorker(_settings(role="prefill")) as p, SimWorker(_settings(role="decode")) as d:
        prompt = "a prompt whose blocks end up on the decode worker " * 3
        async with http.post(
            p.url + "/v1/completions",
            json={"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        ) as r:
            params = (await r.json())["kv_transfer_params"]
        await _complete_with(http, d, {"prompt": prompt, "max_tokens": 2, "kv_transfer_params": params})
        ids = SimTokenizer(d.settings.model).encode(prompt)
        expected = BlockHasher(16, "sha256", "11").event_hashes(ids)
        for w in (p, d):
            hashes = [
                h
                for _, b in await _replay_all(w)
                for e in b.events
                if isinstance(e, kv_events.BlockStored)
                for h in e.block_hashes
            ]
            assert hashes[: len(expected)] == expected


async def _complete_with(http: aiohttp.ClientSession, w: SimWorker, body: dict[str, Any]) -> None:
    async with http.post(w.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.read()
