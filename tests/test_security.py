"""Issue 17: only the deployment's own workers can register, heartbeat, deregister or publish KV events.

Every attack of the issue's table, against a real frontend (real ZMQ ROUTER, real HTTP on loopback)
serving simulated workers whose KV-event publishers bind ``ipc://`` sockets in a private directory, as
``pdkit launch`` sets them up.  The attacker is a plain local process: it knows the ports, the worker
ids and the wire format, but not the deployment token nor any worker's session key.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from loopback import bring_kv_links_up

from pdkit import prom
from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings
from pdkit.frontend.testing import RegistryClient, announce
from pdkit.protocol import Ack, Deregister, Heartbeat, Load, Register, WorkerInfo, encode, parse_message
from pdkit.routing import kv_events as ke
from pdkit.secret import private_dir
from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

TOKEN = "the-deployment-secret"
SEED = "0"
N_REQUESTS = 30


class Rogue:
    """The attacker's engine: an HTTP server counting what the frontend sends it."""

    def __init__(self) -> None:
        self.requests = 0
        self.auth_headers: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _any(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.auth_headers.append(request.headers.get("Authorization", ""))
        return web.json_response({"choices": [{"text": "pwned", "index": 0}]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Attacker:
    """A raw DEALER socket speaking the registry protocol, without the deployment's secrets."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send(self, msg: Register | Heartbeat | Deregister) -> Ack:
        await self.sock.send(encode(msg))
        ack = parse_message(await asyncio.wait_for(self.sock.recv(), 10))
        assert isinstance(ack, Ack)
        return ack

    def close(self) -> None:
        self.sock.close(0)


class Deployment:
    def __init__(self, fe: Frontend, sims: dict[str, SimWorker], clients: dict[str, RegistryClient]) -> None:
        self.fe, self.sims, self.clients = fe, sims, clients

    def records(self) -> dict[str, tuple[str, str, int]]:
        """What routing reads of each worker: (url, role, running) -- must not move under attack."""
        return {wid: (w.url, w.role, w.load.running) for wid, w in self.fe.registry.workers.items()}

    def index(self) -> dict[str, int]:
        """Blocks the frontend believes each worker holds (all tiers)."""
        return {wid: sum(self.fe.kv.index.size(wid).values()) for wid in self.sims}


async def wait_until(cond: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def dep(tmp_path: Path) -> AsyncIterator[Deployment]:
    sockets = private_dir(tmp_path / "kv")
    async with AsyncExitStack() as stack:
        fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="disagg", policy="kv_aware", token=TOKEN,
                                       hash_seed=SEED, heartbeat_interval_s=0.1, liveness_timeout_s=5.0))  # fmt: skip
        await fe.start()
        stack.push_async_callback(fe.stop, 1.0)
        sims: dict[str, SimWorker] = {}
        clients: dict[str, RegistryClient] = {}
        for wid, role in (("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")):
            settings = SimSettings(role=role, time_scale=0, hash_seed=SEED, kv_events_topic=wid,
                                   kv_events_endpoint=f"ipc://{sockets}/{wid}.pub",
                                   kv_events_replay_endpoint=f"ipc://{sockets}/{wid}.replay")  # fmt: skip
            sims[wid] = w = await stack.enter_async_context(SimWorker(settings))
            clients[wid] = c = await announce(fe.zmq_endpoint, w.url, role, wid, token=TOKEN, interval_s=0.05,
                                              kv_events_topic=wid, kv_events_endpoint=w.kv_events_endpoint,
                                              kv_events_replay_endpoint=w.kv_events_replay_endpoint)  # fmt: skip
            stack.push_async_callback(c.close)
        d = Deployment(fe, sims, clients)
        async with aiohttp.ClientSession() as http:
            await bring_kv_links_up(http, fe, sims)  # every PUB->SUB link carries one event first
        # ...and let the last link-check batches land, so a test's "before" is not overtaken by them
        for wid, w in sims.items():
            assert await asyncio.to_thread(w.publisher.wait_idle)
            await wait_until(lambda wid=wid, w=w: fe.kv.index.worker(wid).last_seq == w.publisher.next_seq - 1,
                             f"{wid}'s last link-check batch")  # fmt: skip
        yield d


async def serve_requests(fe: Frontend, n: int = N_REQUESTS) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer client-key"}) as http:
        for i in range(n):
            body = {"model": "synth", "prompt": f"request {i} about something " * 8, "max_tokens": 2}
            async with http.post(fe.url + "/v1/completions", json=body) as r:
                statuses.append(r.status)
    return statuses


def rogue_info(worker_id: str, url: str, role: str = "decode") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, url=url, model="synth", engine="sim")  # type: ignore[arg-type]


async def test_rogue_registration_without_the_token_gets_no_requests(dep: Deployment) -> None:
    rogue = Rogue()
    await rogue.start()
    attacker = Attacker(dep.fe.zmq_endpoint)
    try:
        before = dep.records()
        for token in (None, "guess", ""):
            ack = await attacker.send(Register(token=token, worker=rogue_info("evil-0", rogue.url)))
            assert not ack.ok and "token" in (ack.error or "") and ack.session_key is None
        assert dep.records() == before and "evil-0" not in dep.fe.registry.workers
        assert await serve_requests(dep.fe) == [200] * N_REQUESTS
        assert rogue.requests == 0 and rogue.auth_headers == []
    finally:
        attacker.close()
        await rogue.stop()


async def test_taking_over_a_live_worker_id_is_refused_even_with_the_token(dep: Deployment) -> None:
    """Registering again as ``decode-0`` with another URL: refused without the token, and -- the worker
    id belongs to whoever registered it -- also refused with the token but without decode-0's key."""
    rogue = Rogue()
    await rogue.start()
    attacker = Attacker(dep.fe.zmq_endpoint)
    try:
        before = dep.records()
        ack = await attacker.send(Register(worker=rogue_info("decode-0", rogue.url)))
        assert not ack.ok
        for key in (None, "not-the-key"):
            ack = await attacker.send(Register(token=TOKEN, worker=rogue_info("decode-0", rogue.url), session_key=key))
            assert not ack.ok and "decode-0" in (ack.error or "") and not ack.reregister
            assert "register" not in (ack.error or "").lower()  # an agent told this must not loop
        assert dep.records() == before
        assert await serve_requests(dep.fe) == [200] * N_REQUESTS
        assert rogue.requests == 0
        # the owner itself may re-register (same key): its record is updated in place
        owner = dep.clients["decode-0"]
        state = dep.fe.registry.workers["decode-0"]
        assert (await owner.register()).ok and dep.fe.registry.workers["decode-0"] is state
    finally:
        attacker.close()
        await rogue.stop()


async def test_deregistering_others_is_refused(dep: Deployment) -> None:
    attacker = Attacker(dep.fe.zmq_endpoint)
    try:
        before = dep.records()
        for _ in range(20):
            for wid in list(dep.sims):
                ack = await attacker.send(Deregister(worker_id=wid))  # no token
                assert not ack.ok
                ack = await attacker.send(Deregister(token=TOKEN, worker_id=wid, session_key="forged"))
                assert not ack.ok and "session key" in (ack.error or "")
        assert dep.records() == before
        assert await serve_requests(dep.fe) == [200] * N_REQUESTS
    finally:
        attacker.close()


async def test_heartbeats_with_a_fake_load_are_refused(dep: Deployment) -> None:
    attacker = Attacker(dep.fe.zmq_endpoint)
    try:
        before = dep.records()
        fake = Load(running=500, waiting=500, kv_usage=1.0)
        for seq in range(1, 50):
            assert not (await attacker.send(Heartbeat(worker_id="decode-0", seq=seq, load=fake))).ok
            ack = await attacker.send(Heartbeat(token=TOKEN, worker_id="decode-0", seq=seq, load=fake))
            assert not ack.ok and not ack.reregister  # the owner's agent would not loop on this either
        assert dep.records() == before and dep.fe.registry.workers["decode-0"].load.running == 0
        text = await asyncio.to_thread(lambda: dep.fe.metrics.render().decode())
        assert prom.total(text, "pdkit_registry_messages_total", type="heartbeat", result="rejected") >= 98
    finally:
        attacker.close()


async def test_kv_events_from_anyone_but_the_worker_never_reach_the_index(dep: Deployment, tmp_path: Path) -> None:
    """There is no socket to publish into: the frontend binds none for KV events and reads each worker's
    own publisher (an ipc:// file in a 0700 directory).  A rogue publisher on the old shared port, or on
    an address of its own, reaches nothing; a worker publishing another worker's topic is dropped."""
    fe = dep.fe
    assert fe.kv_events_endpoint is None
    before = dep.index()
    evil = ke.KVEventBatch(ts=time.time(), events=[
        ke.AllBlocksCleared(),
        ke.BlockStored(block_hashes=list(range(1, 5001)), parent_block_hash=None, token_ids=[1] * 16 * 5000,
                       block_size=16, lora_id=None, medium="GPU", lora_name=None),
    ])  # fmt: skip
    ctx = zmq.Context.instance()
    # 1. connect a PUB to where the shared SUB used to be (and to the registry port, for good measure)
    pubs = []
    for port in (8101, fe.zmq_port):
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(f"tcp://127.0.0.1:{port}")
        pubs.append(pub)
    # 2. bind a PUB of its own and hope the frontend connects
    own = ctx.socket(zmq.PUB)
    own.setsockopt(zmq.LINGER, 0)
    own.bind(f"ipc://{tmp_path}/evil.pub")
    processed = fe.kv.subscriber.processed
    for seq in range(200):
        for sock in (*pubs, own):
            for wid in dep.sims:  # a PUB drops what no subscriber takes: it never blocks nor raises
                sock.send_multipart([wid.encode(), ke.seq_to_bytes(seq), ke.encode_batch(evil)])
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)
    assert fe.kv.subscriber.processed == processed and dep.index() == before
    for sock in (*pubs, own):
        sock.close(0)
    # 3. a registered worker's socket carrying another worker's topic: dropped and counted
    await fe.kv.subscriber.handle([b"decode-1", ke.seq_to_bytes(10**6), ke.encode_batch(evil)], source="decode-0")
    await fe.kv.subscriber.handle([b"evil", ke.seq_to_bytes(0), ke.encode_batch(evil)], source="nobody")
    assert dep.index() == before
    text = fe.metrics.render().decode()
    assert prom.total(text, "pdkit_kv_event_batches_dropped_total", reason="wrong_topic") == 1
    assert prom.total(text, "pdkit_kv_event_batches_dropped_total", reason="unknown_worker") == 1
    # 4. the ipc sockets are in a directory only this user may enter
    assert (Path(str(dep.sims["decode-0"].kv_events_endpoint)[len("ipc://") :]).parent.stat().st_mode & 0o077) == 0
    # the legitimate workers' events still arrive
    async with aiohttp.ClientSession() as http:
        body = {"model": "synth", "prompt": "a fresh prompt that the decode caches " * 10, "max_tokens": 1}
        async with http.post(dep.sims["decode-1"].url + "/v1/completions", json=body) as r:
            assert r.status == 200
    await wait_until(lambda: dep.index()["decode-1"] > before["decode-1"], "decode-1's own events applied")


def _flood(endpoint: str, n: int, token: str | None, senders: int = 10) -> None:
    """``n`` registrations with distinct ids from ``senders`` DEALER sockets, as fast as ZMQ takes them."""
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(senders):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(endpoint)
        socks.append(s)
    for i in range(n):
        info = {"worker_id": f"flood-{i}", "role": "decode", "url": f"http://127.0.0.1:{1 + i % 60000}",
                "model": "synth", "engine": "sim"}  # fmt: skip
        frame = json.dumps({"type": "register", "version": 2, "token": token, "worker": info}).encode()
        socks[i % senders].send(frame)
    time.sleep(0.5)
    for s in socks:
        s.close(0)


@pytest.mark.parametrize("token", [TOKEN, None], ids=["with-token-deployment", "standalone-no-token"])
async def test_a_registration_flood_keeps_health_answering(
    token: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """10,000 registrations with distinct ids: each costs O(1) (a refusal, or a rate-limited / capped
    registration), the ROUTER loop yields to HTTP, /health keeps answering and stop() is prompt.
    With the token unknown the flood is refused outright; a frontend without any token (standalone
    loopback, allowed with a warning) still bounds what the flood can register."""
    fe = Frontend(FrontendSettings(port=0, zmq_port=0, mode="disagg", token=TOKEN if token else None,
                                   policy="kv_aware", hash_seed=SEED, heartbeat_interval_s=0.5))  # fmt: skip
    await fe.start()
    flooding = threading.Thread(target=_flood, args=(fe.zmq_endpoint, 10_000, None if token else "x"))
    latencies: list[float] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            flooding.start()

            def handled() -> float:
                return prom.total(fe.metrics.render().decode(), "pdkit_registry_messages_total")

            # probe while the frontend works through the flood (the sender finishes long before it does)
            give_up = time.monotonic() + 300  # a hang guard only
            while (flooding.is_alive() or handled() < 10_000) and time.monotonic() < give_up:
                t0 = time.perf_counter()
                async with http.get(fe.url + "/health") as r:
                    assert r.status == 200
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
        flooding.join()
        registered = len(fe.registry.workers)
    finally:
        await asyncio.wait_for(fe.stop(grace_s=1.0), timeout=60)  # a hang guard, not a timing assertion
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    with capsys.disabled():
        print(f"\n[flood {token and 'token' or 'no-token'}] /health p99 {p99 * 1000:.1f} ms over "
              f"{len(latencies)} probes, max {latencies[-1] * 1000:.1f} ms; registered {registered}")  # fmt: skip
    if token:
        assert registered == 0  # none of it had the token
    else:
        assert registered < 10_000  # per-sender and overall rate limits (and max_workers) bound it


async def test_max_workers_caps_the_registry() -> None:
    async with Frontend(FrontendSettings(port=0, zmq_port=0, token=TOKEN, max_workers=3)) as fe:
        clients = [RegistryClient(fe.zmq_endpoint, rogue_info(f"w{i}", f"http://127.0.0.1:{9000 + i}"), TOKEN)
                   for i in range(4)]  # fmt: skip
        try:
            acks = [await c.register() for c in clients]
            assert [a.ok for a in acks] == [True, True, True, False]
            assert "max_workers=3" in (acks[3].error or "") and len(fe.registry.workers) == 3
            assert (await clients[0].register()).ok  # a known id is not a new one
        finally:
            for c in clients:
                await c.close()


async def test_a_restarted_agent_takes_its_id_back_after_the_old_record_is_reaped() -> None:
    """The new agent does not know the old key: refused while the old record is live, accepted once it
    is reaped for silence -- on the same record, so requests in flight keep their counts."""
    async with Frontend(FrontendSettings(port=0, zmq_port=0, token=TOKEN, heartbeat_interval_s=0.05)) as fe:
        old = RegistryClient(fe.zmq_endpoint, rogue_info("decode-0", "http://127.0.0.1:9100"), TOKEN)
        new = RegistryClient(fe.zmq_endpoint, rogue_info("decode-0", "http://127.0.0.1:9101"), TOKEN)
        try:
            assert (await old.register()).ok
            state = fe.registry.workers["decode-0"]
            state.inflight = 2
            assert not (await new.register()).ok
            await wait_until(lambda: "decode-0" in fe.registry.reaped, "the silent record reaped")
            hb = await new.heartbeat()
            assert not hb.ok and hb.reregister  # what makes the restarted agent register again
            ack = await new.register()
            assert ack.ok and ack.session_key and ack.session_key != old.session_key
            assert fe.registry.workers["decode-0"] is state and state.inflight == 2 and state.url.endswith(":9101")
            assert not (await old.heartbeat()).ok  # the old key is void now
            assert (await new.heartbeat()).ok
        finally:
            await old.close()
            await new.close()
