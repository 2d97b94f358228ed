"""KV-aware scoring: tier weights, contiguous prefix, load penalty, conditional disaggregation, metrics,
and predicted prefix hits equal to the hits a simulated worker reports in /metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import prometheus_client
import pytest
from loopback import index_synced
from prometheus_client import CollectorRegistry

from pdkit import prom
from pdkit.model_files import default_model_dir
from pdkit.prompt_tokens import PromptTokenizer
from pdkit.protocol import Load, WorkerInfo
from pdkit.routing import kv_events as ke
from pdkit.routing.block_hash import BlockHasher
from pdkit.routing.kv_aware import KvAwarePolicy, KvRouting
from pdkit.routing.kv_index import KvIndex
from pdkit.routing.kv_metrics import KvRoutingMetrics
from pdkit.routing.types import RequestContext, WorkerState
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

SEED = "11"
PROMPT = "a long shared system prompt that many requests reuse, word after word, " * 8


def worker(wid: str, role: str = "prefill", running: int = 0, waiting: int = 0, inflight: int = 0) -> WorkerState:
    info = WorkerInfo(worker_id=wid, role=role, url="http://127.0.0.1:1", model="synth")  # type: ignore[arg-type]
    return WorkerState(info=info, last_seen=time.monotonic(), load=Load(running=running, waiting=waiting),
                       inflight=inflight)  # fmt: skip


def ctx(body: dict[str, Any], path: str = "/v1/completions") -> RequestContext:
    return RequestContext(path=path, model="synth", body=body, prompt_text=None, prompt_token_ids=None,
                          prompt_tokens=0, request_id="r")  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(default_model_dir())


def announce(idx: KvIndex, wid: str, hashes: list[int | bytes], medium: str = "GPU") -> None:
    idx.add_worker(wid)
    ev = ke.BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=16, lora_id=None,
                        medium=medium, lora_name=None)  # fmt: skip
    idx.apply(wid, ke.KVEventBatch(ts=time.time(), events=[ev]))


def test_tier_weights_and_contiguous_prefix(tok: PromptTokenizer) -> None:
    idx = KvIndex()
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED)
    hashes = BlockHasher(16, "sha256", SEED).event_hashes(tok.request_ids({"prompt": PROMPT}, chat=False))
    n = len(hashes) - 1 if len(tok.request_ids({"prompt": PROMPT}, chat=False)) % 16 == 0 else len(hashes)
    announce(idx, "gpu", hashes)
    announce(idx, "cpu", hashes, "CPU")
    announce(idx, "disk", hashes, "FS")
    announce(idx, "holey", hashes[1:])  # everything but the first block: useless
    ws = [worker(w) for w in ("disk", "holey", "cpu", "gpu")]
    c = ctx({"prompt": PROMPT})
    got = {s.worker_id: s for s in policy.scores(ws, c)}
    assert got["gpu"].weighted == pytest.approx(n) and got["gpu"].hit_blocks == n
    assert got["cpu"].weighted == pytest.approx(0.8 * n) and got["cpu"].tier_blocks["CPU"] == n
    assert got["disk"].weighted == pytest.approx(0.5 * n)
    assert got["holey"].hit_blocks == 0
    assert policy.choose("prefill", ws, c).worker_id == "gpu"
    assert policy.choose("prefill", [w for w in ws if w.worker_id != "gpu"], c).worker_id == "cpu"
    # a block in two tiers counts at its best one; weights are configurable
    announce(idx, "disk", hashes, "CPU")
    flipped = KvAwarePolicy(idx, tok, hash_seed=SEED, tier_weights={"CPU": 0.1, "DISK": 0.9})
    assert flipped.score(worker("disk"), c).weighted == pytest.approx(0.9 * n)


def test_load_penalty_trades_cache_for_queue(tok: PromptTokenizer) -> None:
    idx = KvIndex()
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    hashes = BlockHasher(16, "sha256", SEED).event_hashes(ids)
    announce(idx, "warm", hashes)
    idx.add_worker("cold")
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED)  # auto weight: half the prompt's blocks per request
    c = ctx({"prompt": PROMPT})
    assert policy.choose("prefill", [worker("cold"), worker("warm", running=1)], c).worker_id == "warm"
    assert policy.choose("prefill", [worker("cold"), worker("warm", running=1, waiting=1)], c).worker_id == "cold"
    assert policy.choose("prefill", [worker("cold"), worker("warm", inflight=3)], c).worker_id == "cold"
    strict = KvAwarePolicy(idx, tok, hash_seed=SEED, load_weight=1000.0)
    assert strict.choose("prefill", [worker("cold"), worker("warm", running=1)], c).worker_id == "cold"


def test_wrong_seed_predicts_nothing_and_no_prompt_falls_back_to_least_loaded(tok: PromptTokenizer) -> None:
    idx = KvIndex()
    announce(idx, "a", BlockHasher(16, "sha256", SEED).event_hashes(tok.request_ids({"prompt": PROMPT}, chat=False)))
    other = KvAwarePolicy(idx, tok, hash_seed="12")
    assert other.score(worker("a"), ctx({"prompt": PROMPT})).hit_blocks == 0
    blind = KvAwarePolicy(idx, None, hash_seed=SEED)  # no tokenizer: text prompts cannot be hashed
    ws = [worker("a", running=5), worker("b", running=1), worker("c", running=3)]
    assert blind.choose("prefill", ws, ctx({"prompt": PROMPT})).worker_id == "b"
    bad_chat = ctx({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "/v1/chat/completions")
    assert KvAwarePolicy(idx, tok, hash_seed=SEED).choose("decode", ws, bad_chat).worker_id == "b"
    # token ids sent by the client are used as they are, without a tokenizer
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    c = RequestContext(path="/v1/completions", model=None, body={"prompt": ids}, prompt_text=None,
                       prompt_token_ids=ids, prompt_tokens=len(ids), request_id="r")  # fmt: skip
    assert blind.score(worker("a"), c).hit_blocks == (len(ids) - 1) // 16


def test_conditional_disaggregation_helper(tok: PromptTokenizer) -> None:
    idx = KvIndex()
    ids = tok.request_ids({"prompt": PROMPT + "tail"}, chat=False)
    hashes = BlockHasher(16, "sha256", SEED).event_hashes(ids)
    announce(idx, "d-warm", hashes[:-1])
    idx.add_worker("d-cold")
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED)
    c = ctx({"prompt": PROMPT + "tail"})
    ds = [worker("d-cold", "decode"), worker("d-warm", "decode")]
    uncached = len(ids) - (len(hashes) - 1) * 16
    local = policy.local_prefill_worker(ds, c, max_uncached_tokens=uncached)
    assert local is not None and local.worker_id == "d-warm"
    assert policy.local_prefill_worker(ds, c, max_uncached_tokens=uncached - 1) is None
    local = policy.local_prefill_worker(ds, c, max_uncached_tokens=len(ids))
    assert local is not None and local.worker_id == "d-warm"
    assert policy.local_prefill_worker([], c, 10**6) is None


def test_metrics_go_to_the_given_registry_only(tok: PromptTokenizer) -> None:
    reg = CollectorRegistry()
    m = KvRoutingMetrics(reg)
    idx = KvIndex(metrics=m)
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    announce(idx, "a", BlockHasher(16, "sha256", SEED).event_hashes(ids))
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED, metrics=m)
    policy.choose("prefill", [worker("a")], ctx({"prompt": PROMPT}))
    hit = (len(ids) - 1) // 16
    assert reg.get_sample_value("pdkit_kv_predicted_hit_blocks_total", {"worker": "a", "role": "prefill",
                                                                        "tier": "GPU"}) == hit  # fmt: skip
    assert reg.get_sample_value("pdkit_kv_predicted_hit_tokens_total", {"worker": "a", "role": "prefill"}) == hit * 16
    assert (
        reg.get_sample_value("pdkit_kv_routed_prompt_blocks_total", {"worker": "a", "role": "prefill"})
        == len(ids) // 16
    )
    assert prometheus_client.REGISTRY.get_sample_value("pdkit_kv_index_blocks", {"worker": "a", "tier": "GPU"}) is None
    KvRoutingMetrics(CollectorRegistry())  # a second frontend in the same process: no duplicate-metric error


# -- end to end with simulated workers -------------------------------------------------------------


async def prefix_hits(http: aiohttp.ClientSession, w: SimWorker) -> float:
    async with http.get(w.url + "/metrics") as r:
        text = await r.text()
    return prom.total(text, "vllm:prefix_cache_hits_total")


async def post(http: aiohttp.ClientSession, w: SimWorker, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(w.url + path, json={"model": "synth", **body}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def state_of(w: SimWorker, wid: str) -> WorkerState:
    info = WorkerInfo(worker_id=wid, role="agg", url=w.url, model="synth", engine="sim",
                      kv_events_replay_endpoint=w.kv_events_replay_endpoint,
                      kv_events_topic=w.settings.kv_events_topic)  # fmt: skip
    return WorkerState(info=info, last_seen=time.monotonic())


def predicted_tokens(kv: KvRouting) -> float:
    """Sum of ``pdkit_kv_predicted_hit_tokens`` over workers and roles."""
    return sum(
        s.value for fam in kv.metrics.predicted_hit_tokens.collect() for s in fam.samples if s.name.endswith("_total")
    )


async def test_predicted_hits_equal_the_simulators_hits() -> None:
    """Route with KvRouting over real ZMQ; after each request the prediction for the next one equals the
    prefix-cache hits the chosen worker then reports (vllm:prefix_cache_hits_total, tokens)."""
    reg = CollectorRegistry()
    kv = KvRouting(default_model_dir(), hash_seed=SEED, registry=reg)
    kv.start()
    sims = [
        SimWorker(
            SimSettings(
                time_scale=0,
                hash_seed=SEED,
                kv_events_endpoint=kv.endpoint,
                kv_events_replay_endpoint="tcp://127.0.0.1:0",
                kv_events_topic=f"topic-{i}",
                kv_events_bind=False,
            )
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        async with aiohttp.ClientSession() as http, sims[0] as s0, sims[1] as s1:
            by_id = {"w0": s0, "w1": s1}
            states = {wid: state_of(s, wid) for wid, s in by_id.items()}
            kv.sync_workers(states.values())
            for wid, s in by_id.items():  # bring each publisher's link up; replay fills in what was lost
                for i in range(500):
                    await post(http, s, "/v1/completions", {"prompt": f"warm {wid} {i} " * 5, "max_tokens": 1})
                    if (st := kv.index.worker(wid)) is not None and st.last_seq is not None:
                        break
                    await asyncio.sleep(0.01)
                await index_synced(kv.index, s, wid)
            convo = [{"role": "system", "content": "You answer questions about KV caches. " * 6},
                     {"role": "user", "content": "What is a prefix cache?"}]  # fmt: skip
            requests: list[tuple[str, dict[str, Any]]] = [
                ("/v1/completions", {"prompt": PROMPT, "max_tokens": 5}),
                ("/v1/completions", {"prompt": PROMPT, "max_tokens": 5}),
                ("/v1/completions", {"prompt": PROMPT + " and then a different ending", "max_tokens": 3}),
                ("/v1/chat/completions", {"messages": convo, "max_tokens": 7}),
                ("/v1/chat/completions", {"messages": convo, "max_tokens": 7}),
            ]
            predicted_total = 0
            for turn, (path, body) in enumerate(requests):
                c = ctx(body, path)
                p0 = predicted_tokens(kv)
                chosen = kv.policy.choose("agg", list(states.values()), c)
                predicted = predicted_tokens(kv) - p0  # what the choice booked (its own blocks not counted)
                s = by_id[chosen.worker_id]
                before = await prefix_hits(http, s)
                out = await post(http, s, path, body)
                kv.policy.hop_done(chosen, c)
                assert await prefix_hits(http, s) - before == predicted, (turn, path)
                predicted_total += predicted
                if path.endswith("chat/completions"):  # multi-turn: the next turn extends this conversation
                    convo = [*convo, {"role": "assistant", "content": out["choices"][0]["message"]["content"]},
                             {"role": "user", "content": f"Follow-up number {turn}?"}]  # fmt: skip
                await index_synced(kv.index, s, chosen.worker_id)
            c = ctx({"messages": convo, "max_tokens": 2}, "/v1/chat/completions")
            p0 = predicted_tokens(kv)
            chosen = kv.policy.choose("agg", list(states.values()), c)
            predicted = predicted_tokens(kv) - p0
            before = await prefix_hits(http, by_id[chosen.worker_id])
            await post(http, by_id[chosen.worker_id], "/v1/chat/completions", {"messages": convo, "max_tokens": 2})
            assert await prefix_hits(http, by_id[chosen.worker_id]) - before == predicted > 0
            assert predicted_total > 0
            # worker removal: its blocks stop counting at once
            kv.sync_workers([states["w0"]])
            assert kv.policy.score(states["w1"], c).hit_blocks == 0 and not kv.index.has_worker("w1")
    finally:
        await kv.close()


async def test_prepare_tokenizes_off_the_event_loop(tok: PromptTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare`` fills the request's prompt cache from a worker thread; ``choose`` then reuses it, and a
    failure inside ``prepare`` never fails the request (``choose`` falls back as before)."""
    import threading

    policy = KvAwarePolicy(KvIndex(), tok, hash_seed=SEED)
    threads: list[int] = []
    real = tok.request_ids

    def spy(body: dict[str, Any], chat: bool) -> list[int]:
        threads.append(threading.get_ident())
        return real(body, chat)

    monkeypatch.setattr(tok, "request_ids", spy)
    c = ctx({"prompt": PROMPT})
    await policy.prepare(c)
    assert threads and threads[0] != threading.get_ident()
    policy.choose("agg", [worker("w0"), worker("w1")], c)
    assert len(threads) == 1  # choose found the prepared prompt

    def broken(ctx: Any, block_size: int | None = None) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(policy, "prompt_blocks", broken)
    await policy.prepare(ctx({"prompt": PROMPT}))  # logged, not raised
