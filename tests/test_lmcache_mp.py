"""Issue 16 on CPU: LMCache's multi-process mode in the plan, the supervisor and PdConnector, and the
restore check that catches a wrong LMCache restore (LMCache#4492).

Real: pdkit's plan/CLI/supervisor with real subprocesses and HTTP on loopback, vLLM 0.26.0's config and
factory, Request (with vLLM's own block hasher), SchedulerOutput, KVConnectorOutput, KVCacheBlocks, the
fingerprint kernels' torch reference.  Stand-ins (each says so): ``tests/lmcache_server_standin.py`` for
``lmcache server`` (the real one needs CUDA and lmcache), ``FakeLMCacheMPConnector`` for vLLM's
LMCacheMPConnector (it imports lmcache and moves KV through its GPU server) and CPU tensors for the paged
GPU KV cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_launch import sim_config

from pdkit.config import load_deployment
from pdkit.gpu_check.ports import free_port_block
from pdkit.kv_config import kv_transfer_config
from pdkit.lmcache_server import server_spec
from pdkit.plan import build_plan
from pdkit.supervisor import Supervisor, group_alive

STANDIN = str(Path(__file__).with_name("lmcache_server_standin.py"))


# ------------------------------------------------------------------------------------------ plan
def test_vllm_033_plan_has_one_lmcache_server_per_lmcache_worker_and_mp_connectors(run_cli) -> None:
    code, out, err = run_cli("launch", "disagg", "--vllm-version", "0.33.0", "--dry-run", "--json")
    assert code == 0, err
    procs = {p["name"]: p for p in json.loads(out)["processes"]}
    assert [n for n in procs] == ["frontend", "decode-0", "prefill-0-lmcache", "prefill-0"]  # server first
    server = procs["prefill-0-lmcache"]
    assert server["sidecar_of"] == "prefill-0" and server["health_url"] == "http://127.0.0.1:6910/healthcheck"
    assert server["argv"][1:] == ["-m", "lmcache.cli.main", "server", "--host", "127.0.0.1", "--port", "5910",
                                  "--http-host", "127.0.0.1", "--http-port", "6910", "--chunk-size", "256",
                                  "--l1-size-gb", "5", "--eviction-policy", "LRU"]  # fmt: skip
    assert server["cuda_visible_devices"] == procs["prefill-0"]["cuda_visible_devices"]
    extra = procs["prefill-0"]["kv_transfer_config"]["kv_connector_extra_config"]
    assert extra["lmcache_connector"] == "LMCacheMPConnector"
    assert extra["lmcache"]["lmcache.mp.port"] == 5910 and extra["lmcache"]["lmcache.mp.host"] == "tcp://127.0.0.1"
    assert "LMCACHE_CHUNK_SIZE" not in procs["prefill-0"]["env"]  # the server holds LMCache's settings
    assert procs["decode-0"]["kv_transfer_config"]["kv_connector"] == "NixlConnector"  # decode: no LMCache


def test_agg_on_033_uses_lmcache_mp_connector_directly(run_cli) -> None:
    code, out, err = run_cli("launch", "agg", "--vllm-version", "0.33.0", "--dry-run", "--json")
    assert code == 0, err
    procs = {p["name"]: p for p in json.loads(out)["processes"]}
    assert list(procs) == ["frontend", "agg-0-lmcache", "agg-0"]
    ktc = procs["agg-0"]["kv_transfer_config"]
    assert ktc["kv_connector"] == "LMCacheMPConnector" and ktc["kv_role"] == "kv_both"
    assert ktc["kv_connector_extra_config"]["lmcache.mp.port"] == 5900
    # A fast server restart is noticed (re-registration) and a lost lookup waits 30 s, not 300 s.
    assert ktc["kv_connector_extra_config"]["lmcache.mp.heartbeat_interval"] == 2.0
    assert ktc["kv_connector_extra_config"]["lmcache.mp.mq_timeout"] == 30.0
    # The server stores whole chunks only: tier events must not announce a partial tail.
    assert ktc["kv_connector_extra_config"]["lmcache.save_unfull_chunk"] is False
    assert ktc["kv_load_failure_policy"] == "recompute"  # a retrieve lost in a restart is recomputed
    assert "--disable-hybrid-kv-cache-manager" in procs["agg-0"]["engine_argv"]  # the MP connector needs it


def test_mode_defaults_in_process_where_it_runs_and_mp_is_opt_in() -> None:
    assert kv_transfer_config("agg", as_dict=True, vllm_version="0.32.0").kv_transfer_config == {
        "kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}  # fmt: skip
    dep = load_deployment(None, {"mode": "agg", "vllm_version": "0.32.0", "lmcache.mode": "mp",
                                 "lmcache.server_python": "/opt/lmc213/bin/python"})  # fmt: skip
    plan = build_plan(dep)
    server = next(p for p in plan.processes if p.sidecar_of == "agg-0")
    assert server.argv[:4] == ["/opt/lmc213/bin/python", "-m", "lmcache.cli.main", "server"]
    assert plan.workers() == [p for p in plan.processes if p.name == "agg-0"]
    in_proc = build_plan(load_deployment(None, {"mode": "agg", "vllm_version": "0.32.0"}))
    assert all(p.sidecar_of is None for p in in_proc.processes)


def test_mp_with_a_disk_tier_is_refused_naming_the_field() -> None:
    from pdkit.errors import ConfigError

    dep = load_deployment(None, {"mode": "agg", "vllm_version": "0.33.0", "lmcache.disk_path": "/tmp/lmc",
                                 "lmcache.disk_gb": 10})  # fmt: skip
    with pytest.raises(ConfigError, match="lmcache.server_args"):
        build_plan(dep)


def test_lmcache_server_ports_are_checked_for_clashes() -> None:
    from pdkit.errors import ConfigError

    with pytest.raises(ConfigError, match="LMCache server"):
        load_deployment(None, {"mode": "agg", "vllm_version": "0.33.0", "agg.lmcache_port_base": 8200})


# ------------------------------------------------------------------------------------ supervisor
def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _plan_with_standin_server(tmp_path: Path):  # noqa: ANN202
    """The sim deployment (real agents, simulated engines) plus prefill-0's stand-in lmcache server."""
    dep = load_deployment(str(sim_config(tmp_path)), {"run_dir": str(tmp_path / "run")})
    plan = build_plan(dep)
    zmq_port, http_port = free_port_block(1, set()), free_port_block(1, set())
    while http_port == zmq_port:
        http_port = free_port_block(1, {zmq_port})
    server_dep = dep.model_copy(deep=True, update={"engine": "vllm"})
    server_dep.lmcache.mode = "mp"
    server_dep.lmcache.server_command = [sys.executable, STANDIN]
    server_dep.prefill.lmcache_port_base, server_dep.prefill.lmcache_http_port_base = zmq_port, http_port
    side = server_spec(server_dep, "prefill", 0, Path(plan.run_dir), None)
    assert side is not None
    at = next(i for i, p in enumerate(plan.processes) if p.name == "prefill-0")
    plan.processes.insert(at, side)
    plan.supervision.restart_backoff_s = 0.1
    return plan, side


@pytest.mark.timeout(180)
def test_supervisor_starts_the_server_before_its_engine_restarts_it_and_stops_it(tmp_path: Path) -> None:
    plan, side_spec = _plan_with_standin_server(tmp_path)
    assert side_spec.health_url is not None

    async def scenario() -> None:
        sup = Supervisor(plan, console=False, stop_grace_s=5)
        stop = asyncio.Event()
        try:
            await sup.start()
            side, worker = sup.procs[side_spec.name], sup.procs["prefill-0"]
            assert side.ready_after_s is not None  # its /healthcheck answered 200 ...
            assert side.started_at + side.ready_after_s <= worker.started_at  # ... before the engine started
            watcher = asyncio.create_task(sup.watch(stop))
            assert side.proc is not None
            old = side.proc.pid
            os.kill(old, signal.SIGKILL)  # the server dies: the supervisor restarts it
            for _ in range(300):
                await asyncio.sleep(0.1)
                if side.proc.pid != old and _health(side_spec.health_url or "") == 200:
                    break
            assert side.proc.pid != old and side.restarts == 1
            assert _health(side_spec.health_url or "") == 200
            assert worker.alive and worker.restarts == 0  # its engine was left alone
            stop.set()
            assert await watcher == 0
        finally:
            await sup.stop()
        assert side.proc is not None and not group_alive(side.proc.pid)
        assert _health(side_spec.health_url or "") is None  # Ctrl-C path: nothing left listening
        assert "stand-in lmcache server" in Path(side_spec.log_file).read_text()

    asyncio.run(scenario())
