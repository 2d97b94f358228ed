"""The frontend's worker registry over real ZMQ sockets: acks, liveness, tokens; and the policies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from pdkit.frontend.server import Frontend
from pdkit.frontend.settings import FrontendSettings, is_loopback
from pdkit.frontend.testing import RegistryClient, wait_until
from pdkit.protocol import Heartbeat, Load, WorkerInfo
from pdkit.routing.policies import LeastLoaded, RoundRobin, make_policy
from pdkit.routing.types import RequestContext, WorkerState


def info(wid: str, role: str = "decode", port: int = 9) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, url=f"http://127.0.0.1:{port}", model="synth", engine="sim")  # type: ignore[arg-type]


@pytest.fixture
async def fe() -> AsyncIterator[Frontend]:
    async with Frontend(FrontendSettings(port=0, zmq_port=0, heartbeat_interval_s=0.05, liveness_timeout_s=0.4)) as f:
        yield f


async def get_json(url: str) -> object:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        return await r.json()


async def test_register_heartbeat_deregister(fe: Frontend) -> None:
    c = RegistryClient(fe.zmq_endpoint, info("d0"))
    ack = await c.register()
    assert ack.ok and ack.heartbeat_interval_s == 0.05
    c.load = Load(running=2, waiting=1, kv_usage=0.25)
    assert (await c.heartbeat()).ok
    data = await get_json(fe.url + "/workers")
    assert isinstance(data, dict)
    [w] = data["workers"]
    assert (
        w["worker_id"] == "d0"
        and w["role"] == "decode"
        and w["load"] == {"running": 2, "waiting": 1, "kv_usage": 0.25, "healthy": True}
    )
    models = await get_json(fe.url + "/v1/models")
    assert [m["id"] for m in models["data"]] == ["synth"]  # type: ignore[index]
    assert (await c.deregister("bye")).ok
    assert fe.registry.workers == {}
    await c.close()


async def test_heartbeat_from_unknown_worker_asks_to_register(fe: Frontend) -> None:
    c = RegistryClient(fe.zmq_endpoint, info("ghost"))
    ack = await c.request(Heartbeat(worker_id="ghost", seq=1))
    assert not ack.ok and "register" in (ack.error or "")  # the agent re-registers on this word
    await c.close()


async def test_invalid_frame_gets_a_negative_ack(fe: Frontend) -> None:
    c = RegistryClient(fe.zmq_endpoint, info("x"))
    await c._sock.send(b'{"type": "heartbeat"}')
    from pdkit.protocol import Ack, parse_message

    ack = parse_message(await asyncio.wait_for(c._sock.recv(), 10))
    assert isinstance(ack, Ack) and not ack.ok and "invalid message" in (ack.error or "")
    await c.close()


async def test_worker_that_stops_heartbeating_disappears(fe: Frontend) -> None:
    alive = RegistryClient(fe.zmq_endpoint, info("alive"), interval_s=0.05)
    silent = RegistryClient(fe.zmq_endpoint, info("silent"), interval_s=0.05)
    for c in (alive, silent):
        assert (await c.register()).ok
        c.start_heartbeats()
    await wait_until(lambda: len(fe.registry.workers) == 2)
    await silent.stop_heartbeats()
    await wait_until(lambda: "silent" not in fe.registry.workers)
    assert "alive" in fe.registry.workers  # still beating, still there
    metrics = fe.metrics.render().decode()
    assert 'pdkit_registry_workers{role="decode"} 1.0' in metrics
    for c in (alive, silent):
        await c.close()


def test_reaped_workers_are_remembered_then_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker dropped for silence stays in ``reaped`` (its cache knowledge is kept) until it registers
    again or ``remember_reaped_s`` runs out -- then the change hook fires once more."""
    import pdkit.frontend.registry as reg

    now = [1000.0]
    monkeypatch.setattr(reg.time, "monotonic", lambda: now[0])
    changes: list[int] = []
    r = reg.Registry(1.0, on_change=lambda: changes.append(1), remember_reaped_s=10.0)
    r.register(info("a"))
    r.register(info("b"))
    now[0] += 2
    r.heartbeat("b", 1, Load())
    assert r.reap() == ["a"] and r.reaped == {"a": 1002.0} and "a" not in r.workers
    r.register(info("a"))  # back: no longer "reaped"
    assert r.reaped == {}
    now[0] += 2
    assert sorted(r.reap()) == ["a", "b"]
    n = len(changes)
    now[0] += 9
    r.reap()
    assert set(r.reaped) == {"a", "b"} and len(changes) == n  # still remembered, nothing changed
    now[0] += 1
    r.reap()
    assert r.reaped == {} and len(changes) == n + 1  # forgotten: listeners hear of it
    r.register(info("c"))
    assert r.remove("c", "deregistered") and "c" not in r.reaped  # a deregistered worker is not "reaped"


def test_a_reaped_worker_that_returns_keeps_its_in_flight_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests still running on a worker that missed heartbeats keep counting once it is back: the
    per-worker cap holds and their releases land on the record the policy reads."""
    import pdkit.frontend.registry as reg

    now = [1000.0]
    monkeypatch.setattr(reg.time, "monotonic", lambda: now[0])
    r = reg.Registry(1.0)
    state = r.register(info("a"))
    state.inflight = 2
    now[0] += 2
    assert r.reap() == ["a"]
    again = r.register(info("a"))
    assert again is state and again.inflight == 2 and r.workers["a"] is state


async def test_token_required_and_checked() -> None:
    async with Frontend(FrontendSettings(port=0, zmq_port=0, token="s3cret")) as fe:
        bad = RegistryClient(fe.zmq_endpoint, info("d0"), token="wrong")
        ack = await bad.register()
        assert not ack.ok and "token" in (ack.error or "")
        assert "register" not in (ack.error or "").lower()  # else the agent would re-register forever
        none = RegistryClient(fe.zmq_endpoint, info("d1"), token=None)
        assert not (await none.register()).ok
        assert fe.registry.workers == {}
        good = RegistryClient(fe.zmq_endpoint, info("d2"), token="s3cret")
        assert (await good.register()).ok
        assert list(fe.registry.workers) == ["d2"]
        assert 'pdkit_registry_messages_total{result="rejected",type="register"} 2.0' in fe.metrics.render().decode()
        for c in (bad, none, good):
            await c.close()


def test_off_loopback_without_token_refuses_to_start() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ValueError, match="PDKIT_TOKEN"):
        Frontend(FrontendSettings(host="0.0.0.0", port=0, zmq_port=0))
    FrontendSettings(host="0.0.0.0", token="t").validate()  # with a token it is fine


def test_cli_exits_2_off_loopback_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from pdkit.frontend.cli import frontend

    monkeypatch.delenv("PDKIT_TOKEN", raising=False)
    app = typer.Typer()
    app.command()(frontend)
    result = CliRunner().invoke(app, ["--host", "0.0.0.0", "--port", "0", "--zmq-port", "0"])
    assert result.exit_code == 2
    assert "PDKIT_TOKEN" in result.output
    result = CliRunner().invoke(app, ["--policy", "random"])
    assert result.exit_code == 2 and "unknown policy" in result.output


def _ws(wid: str, inflight: int = 0, running: int = 0, waiting: int = 0) -> WorkerState:
    w = WorkerState(info=info(wid), last_seen=0.0, load=Load(running=running, waiting=waiting))
    w.inflight = inflight
    return w


CTX = RequestContext("/v1/completions", None, {}, "hi", None, 1, "r")


def test_round_robin_cycles_in_stable_order() -> None:
    ws = [_ws("b"), _ws("a"), _ws("c")]
    rr = RoundRobin()
    assert [rr.choose("decode", ws, CTX).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_uses_heartbeat_and_own_inflight() -> None:
    ll = LeastLoaded()
    ws = [_ws("a", inflight=3), _ws("b", running=2, waiting=2), _ws("c", inflight=1, running=2)]
    assert {ll.choose("decode", ws, CTX).worker_id for _ in range(5)} == {"c"}
    # equal load: spread, not always the first
    eq = [_ws("a"), _ws("b")]
    assert {ll.choose("decode", eq, CTX).worker_id for _ in range(4)} == {"a", "b"}


def test_make_policy() -> None:
    assert make_policy("round_robin").name == "round_robin"
    assert make_policy("least_loaded").name == "least_loaded"
    with pytest.raises(ValueError, match="kv_aware"):
        make_policy("kv_aware")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")


def test_cli_exits_2_when_a_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import typer
    from typer.testing import CliRunner

    from pdkit.frontend.cli import frontend

    app = typer.Typer()
    app.command()(frontend)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["--port", "0", "--zmq-port", str(port)])
    assert result.exit_code == 2 and "cannot bind" in result.output


async def test_a_failing_registry_hook_does_not_stop_the_registry() -> None:
    """A URL that passes the protocol's pattern but not urlsplit (``[zz]``) makes the KV index's hook raise;
    that registration fails alone, and the registry keeps answering everyone else."""
    settings = FrontendSettings(port=0, zmq_port=0, heartbeat_interval_s=0.05, policy="kv_aware")
    async with Frontend(settings) as f:
        bad = info("odd")
        bad = WorkerInfo(**{**bad.model_dump(), "url": "http://[zz]:1"})
        assert not (await RegistryClient(f.zmq_endpoint, bad).register()).ok
        good = RegistryClient(f.zmq_endpoint, info("d0"))
        assert (await good.register()).ok and (await good.heartbeat()).ok
        await good.close()
