"""KV-aware routing end to end: a real Frontend (``policy="kv_aware"``) and simulated prefill/decode
workers that publish real vLLM-format KV events over ZMQ to the frontend's SUB socket.

Asserts that every turn of a multi-turn conversation goes to the workers holding its prefix, that the
frontend's predicted hit tokens equal the hits the simulators report (``vllm:prefix_cache_hits``), and
conditional disaggregation (a decode worker caching all but a short tail prefills locally).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from loopback import bring_kv_links_up

from pdkit import prom
from pdkit.frontend import Frontend, FrontendSettings
from pdkit.frontend.metrics import ActualHits, FrontendMetrics
from pdkit.frontend.registry import Registry
from pdkit.frontend.testing import RegistryClient, announce, wait_until
from pdkit.protocol import Load, WorkerInfo
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

SEED = "7"
SYSTEM = {
    "a": "You are a careful assistant for storage engineers. Answer in short sentences. " * 6,
    "b": "Du bist ein hilfreicher Assistent fuer Netzwerkfragen und antwortest knapp. " * 6,
}


@dataclass
class Fleet:
    fe: Frontend
    sims: dict[str, SimWorker]
    clients: list[RegistryClient]
    http: aiohttp.ClientSession


def sim_counter(w: SimWorker, name: str) -> float:
    return prom.total(w.metrics.render().decode(), name)


@contextlib.asynccontextmanager
async def fleet(**settings: Any) -> AsyncIterator[Fleet]:
    # Fast heartbeats, but a liveness timeout that a busy 2-core CI machine cannot trip by accident
    # (a reaped worker is not routed to, which the routing assertions would misread).
    settings.setdefault("liveness_timeout_s", 5.0)
    fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="disagg", policy="kv_aware", hash_seed=SEED,
                                   heartbeat_interval_s=0.2, **settings))  # fmt: skip
    await fe.start()
    assert fe.kv_events_endpoint is None  # no shared SUB: the frontend connects to each worker's publisher
    sims: dict[str, SimWorker] = {}
    clients: list[RegistryClient] = []
    try:
        async with aiohttp.ClientSession() as http:
            for wid in ("p0", "p1", "d0", "d1"):
                role = "prefill" if wid.startswith("p") else "decode"
                settings = SimSettings(role=role, time_scale=0, hash_seed=SEED, kv_capacity_blocks=4000,
                                       kv_events_endpoint="tcp://127.0.0.1:0", kv_events_bind=True,
                                       kv_events_replay_endpoint="tcp://127.0.0.1:0", kv_events_topic=wid)  # fmt: skip
                w = SimWorker(settings)
                await w.start()
                sims[wid] = w
                clients.append(
                    await announce(
                        fe.zmq_endpoint,
                        w.url,
                        role,
                        wid,
                        kv_events_topic=wid,
                        kv_events_endpoint=w.kv_events_endpoint,
                        kv_events_replay_endpoint=w.kv_events_replay_endpoint,
                    )  # fmt: skip
                )
            f = Fleet(fe, sims, clients, http)
            await bring_kv_links_up(http, fe, sims)  # each PUB->SUB link carries one event first
            await synced(f)
            yield f
    finally:
        for c in clients:
            await c.close()
        await fe.stop(grace_s=1)
        for w in sims.values():
            await w.stop()


async def synced(f: Fleet) -> None:
    """Every batch each simulator published has been applied to the frontend's index."""
    for wid, w in f.sims.items():
        assert await asyncio.to_thread(w.publisher.wait_idle)

        def done(wid: str = wid, w: SimWorker = w) -> bool:
            st = f.fe.kv.index.worker(wid)
            return st is not None and st.last_seq == w.publisher.next_seq - 1

        await wait_until(done, timeout=20)


async def chat(f: Fleet, messages: list[dict[str, str]], stream: bool) -> str:
    body = {"model": "synth", "messages": messages, "max_tokens": 12, "stream": stream}
    async with f.http.post(f.fe.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        raw = await r.text()
    if not stream:
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]
    return "".join(c["delta"].get("content", "") for e in events for c in json.loads(e)["choices"])


def served(f: Fleet, before: dict[str, float]) -> set[str]:
    return {wid for wid, w in f.sims.items() if sim_counter(w, "vllm:request_success_total") > before[wid]}


async def frontend_metrics(f: Fleet) -> str:
    async with f.http.get(f.fe.url + "/metrics") as r:
        return await r.text()


async def test_multi_turn_sticks_to_the_prefix_holders_and_predictions_equal_hits() -> None:
    async with fleet() as f:
        hits0 = {wid: sim_counter(w, "vllm:prefix_cache_hits_total") for wid, w in f.sims.items()}
        text0 = await frontend_metrics(f)
        convos = {k: [{"role": "system", "content": s}] for k, s in SYSTEM.items()}
        home: dict[str, set[str]] = {}
        for turn in range(4):
            for k, msgs in convos.items():  # interleaved: the two conversations compete for workers
                msgs.append({"role": "user", "content": f"Question {turn} of conversation {k}?"})
                before = {wid: sim_counter(w, "vllm:request_success_total") for wid, w in f.sims.items()}
                answer = await chat(f, msgs, stream=turn % 2 == 1)
                msgs.append({"role": "assistant", "content": answer})
                await synced(f)
                went = served(f, before)
                assert len(went) == 2 and {w[0] for w in went} == {"p", "d"}, went
                if turn == 0:
                    home[k] = went
                else:
                    assert went == home[k], (k, turn, went, home[k])
        text = await frontend_metrics(f)
        predicted_total = 0.0
        for wid, w in f.sims.items():
            predicted = prom.total(text, "pdkit_kv_predicted_hit_tokens_total", worker=wid) - prom.total(
                text0, "pdkit_kv_predicted_hit_tokens_total", worker=wid
            )
            actual = sim_counter(w, "vllm:prefix_cache_hits_total") - hits0[wid]
            assert predicted == actual, (wid, predicted, actual)
            predicted_total += predicted
        assert predicted_total > 0
        assert prom.total(text, "pdkit_requests_total", mode="disagg", status="200") == 8
        async with f.http.get(f.fe.url + "/workers") as r:
            workers = (await r.json())["workers"]
        assert all(sum(w["kv_index_blocks"].values()) > 0 for w in workers)
        # every hop ended, so no request still holds "about to be cached" marks on any worker
        assert all(f.fe.kv.pending.held(wid) == 0 for wid in f.sims)
        # a worker that leaves stops counting at once
        await f.clients[0].deregister()
        await wait_until(lambda: not f.fe.kv.index.has_worker("p0"))


async def test_conditional_disaggregation_prefills_on_the_decode_worker_holding_the_prefix() -> None:
    async with fleet(disagg_min_prompt_tokens=64) as f:
        hits0 = {wid: sim_counter(w, "vllm:prefix_cache_hits_total") for wid, w in f.sims.items()}
        msgs = [{"role": "system", "content": SYSTEM["a"]}, {"role": "user", "content": "First question?"}]
        before = {wid: sim_counter(w, "vllm:request_success_total") for wid, w in f.sims.items()}
        msgs.append({"role": "assistant", "content": await chat(f, msgs, stream=False)})
        await synced(f)
        first = served(f, before)
        assert {w[0] for w in first} == {"p", "d"}  # a long cold prompt: prefill -> decode
        decode = next(w for w in first if w.startswith("d"))
        for turn in range(3):
            msgs.append({"role": "user", "content": f"Follow-up {turn}?"})
            before = {wid: sim_counter(w, "vllm:request_success_total") for wid, w in f.sims.items()}
            msgs.append({"role": "assistant", "content": await chat(f, msgs, stream=True)})
            await synced(f)
            assert served(f, before) == {decode}, turn  # one hop: only the tail is computed, locally
        text = await frontend_metrics(f)
        assert prom.total(text, "pdkit_requests_total", mode="direct_cached", status="200") == 3
        assert prom.total(text, "pdkit_requests_total", mode="disagg", status="200") == 1
        for wid, w in f.sims.items():
            predicted = prom.total(text, "pdkit_kv_predicted_hit_tokens_total", worker=wid)
            assert predicted == sim_counter(w, "vllm:prefix_cache_hits_total") - hits0[wid], wid


async def test_a_worker_that_misses_heartbeats_keeps_its_index() -> None:
    """A loaded host can miss heartbeats: the worker is reaped (not routed to) but its KV index and its
    event stream are kept, so when it registers again routing sees what it really caches.  A
    deregistered worker's index goes at once."""
    async with fleet(liveness_timeout_s=0.6) as f:
        msgs = [{"role": "system", "content": SYSTEM["b"]}, {"role": "user", "content": "A question?"}]
        await chat(f, msgs, stream=False)
        await synced(f)
        holders = {wid for wid in f.sims if sum(f.fe.kv.index.size(wid).values()) > 0}
        flapping = next(c for c in f.clients if c.info.worker_id in holders)
        wid = flapping.info.worker_id
        blocks = f.fe.kv.index.size(wid)
        await flapping.stop_heartbeats()
        await wait_until(lambda: wid not in f.fe.registry.workers)
        assert wid in f.fe.registry.reaped and f.fe.kv.index.size(wid) == blocks  # kept while away
        assert (await flapping.register()).ok
        flapping.start_heartbeats()
        await wait_until(lambda: wid in f.fe.registry.workers)
        assert f.fe.kv.index.size(wid) == blocks and wid not in f.fe.registry.reaped
        await flapping.stop_heartbeats()
        await flapping.deregister()
        await wait_until(lambda: not f.fe.kv.index.has_worker(wid))  # deregistered: forgotten at once


async def test_index_under_another_policy_and_kv_events_off() -> None:
    """Any policy can keep the index (``/workers`` shows its sizes); without a port it is off."""
    async with Frontend(FrontendSettings(port=0, zmq_port=0, policy="round_robin", kv_events_port=0)) as fe:
        assert fe.policy.name == "round_robin" and fe.kv is not None
        assert fe.kv_events_endpoint is None  # nothing bound for publishers: the frontend connects to each
        async with aiohttp.ClientSession() as http, http.get(fe.url + "/workers") as r:
            assert (await r.json())["kv_events_endpoint"] is None
    async with Frontend(FrontendSettings(port=0, zmq_port=0)) as fe:
        assert fe.kv is None and fe.kv_events_endpoint is None


@dataclass
class CountingLoad:
    """A heartbeat load carrying the optional cache counters (the fields proposed for Load)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    lmcache_hit_tokens: float | None = None


def test_actual_hits_from_heartbeat_deltas() -> None:
    m = FrontendMetrics()
    hits = ActualHits(m)
    reg = Registry(3.0, on_heartbeat=hits.observe)
    reg.register(WorkerInfo(worker_id="w", role="decode", url="http://127.0.0.1:1", model="synth"))

    def beat(**kw: float | None) -> None:
        assert reg.heartbeat("w", 1, CountingLoad(**kw))  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float:
        return m.registry.get_sample_value(name, {"worker": "w", **labels}) or 0.0

    beat(prefix_cache_hits=500, prefix_cache_queries=900)  # baseline: history before this frontend
    beat(prefix_cache_hits=532, prefix_cache_queries=1000, lmcache_hit_tokens=256)
    beat(prefix_cache_hits=564, prefix_cache_queries=1100, lmcache_hit_tokens=512)
    assert value("pdkit_kv_actual_hit_tokens_total", source="prefix_cache") == 64
    assert value("pdkit_kv_actual_query_tokens_total") == 200
    assert value("pdkit_kv_actual_hit_tokens_total", source="lmcache") == 256
    beat(prefix_cache_hits=16, prefix_cache_queries=40)  # engine restarted: counters from zero
    assert value("pdkit_kv_actual_hit_tokens_total", source="prefix_cache") == 80
    beat()  # an agent without the fields: nothing changes
    reg.heartbeat("w", 2, Load())
    assert value("pdkit_kv_actual_query_tokens_total") == 240


@pytest.mark.skipif("prefix_cache_hits" not in Load.model_fields, reason="heartbeat Load has no cache counters yet")
async def test_actual_hits_over_the_real_registry_protocol() -> None:
    async with Frontend(FrontendSettings(port=0, zmq_port=0)) as fe:
        c = await announce(fe.zmq_endpoint, "http://127.0.0.1:1", "decode", "w", heartbeats=False)
        try:
            for hits in (100, 148):
                c.load = Load(prefix_cache_hits=hits, prefix_cache_queries=2 * hits)  # type: ignore[call-arg]
                assert (await c.heartbeat()).ok
            labels = {"worker": "w", "source": "prefix_cache"}
            assert fe.metrics.registry.get_sample_value("pdkit_kv_actual_hit_tokens_total", labels) == 48
        finally:
            await c.close()


def test_plan_passes_what_kv_routing_needs(tmp_path: Any) -> None:
    from pdkit.config import load_deployment
    from pdkit.errors import ConfigError
    from pdkit.model_files import default_model_dir
    from pdkit.plan import frontend_spec

    dep = load_deployment(overrides={"engine": "sim", "hash_seed": 5, "block_size": 32,
                                     "frontend.policy": "kv_aware", "frontend.kv_events_port": 9101})  # fmt: skip
    argv = frontend_spec(dep, tmp_path).argv
    flags = dict(zip(argv, argv[1:], strict=False))
    assert flags["--policy"] == "kv_aware" and flags["--kv-events-port"] == "9101"
    assert flags["--hash-seed"] == "5" and flags["--block-size"] == "32"
    assert flags["--model-dir"] == str(default_model_dir())
    # a hub model name: no local tokenizer -> KV events off, and kv_aware refused unless model_dir is given
    hub = load_deployment(overrides={"model": "org/some-model"}, check=False)
    assert "--no-kv-events" in frontend_spec(hub, tmp_path).argv
    hub.frontend.policy = "kv_aware"
    with pytest.raises(ConfigError, match="frontend.model_dir"):
        frontend_spec(hub, tmp_path)
    hub.frontend.model_dir = str(default_model_dir())
    argv = frontend_spec(hub, tmp_path).argv
    assert argv[argv.index("--model-dir") + 1] == str(default_model_dir())


def test_cli_accepts_kv_aware_and_checks_the_model_dir(tmp_path: Any) -> None:
    import typer
    from typer.testing import CliRunner

    from pdkit.frontend.cli import frontend

    app = typer.Typer()
    app.command()(frontend)
    result = CliRunner().invoke(app, ["--policy", "kv_aware", "--model-dir", str(tmp_path)])
    assert result.exit_code == 2 and "tokenizer.json" in result.output
    result = CliRunner().invoke(app, ["--policy", "kv_aware", "--no-kv-events"])
    assert result.exit_code == 2 and "kv_aware" in result.output
