"""``pdkit launch`` / ``pdkit worker`` end to end on CPU with the simulated engine (real processes,
real ZMQ registration, real HTTP on loopback).  vLLM needs a GPU, so the engine here is pdkit's
simulator or, for failure cases, a tiny stand-in engine command that is named as such."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pdkit.config import load_deployment
from pdkit.gpu_check.ports import group_port_bases
from pdkit.plan import LaunchPlan, build_plan
from pdkit.supervisor import StartupError, Supervisor

pytestmark = pytest.mark.timeout(180)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def sim_config(tmp_path: Path, prefill: int = 1, decode: int = 1) -> Path:
    fe, zmq_port, ev = free_ports(3)
    taken = {fe, zmq_port, ev}
    groups = {}
    for role, count in (("prefill", prefill), ("decode", decode)):
        groups[role] = {
            "count": count,
            **group_port_bases(count, taken),
            "startup_timeout_s": 60,
        }
    cfg = {"engine": "sim", "frontend": {"port": fe, "zmq_port": zmq_port, "kv_events_port": ev}, **groups}
    path = tmp_path / "sim.yaml"
    path.write_text(json.dumps(cfg))
    return path


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def workers_of(frontend: str) -> dict[str, dict]:
    data = get_json(f"{frontend}/workers")
    items = data.get("workers", data) if isinstance(data, dict) else data
    return {w["worker_id"]: w for w in items}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def port_is_free(port: int) -> bool:
    """Nobody listens on it (SO_REUSEADDR, as servers bind: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie no longer runs
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Launched:
    """``pdkit launch disagg --engine sim`` as a real subprocess (the user's command)."""

    def __init__(self, tmp_path: Path, cfg: Path) -> None:
        self.log = tmp_path / "launch.out"
        self.run_dir = tmp_path / "run"
        argv = [sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--engine", "sim", "--config", str(cfg),
                "--run-dir", str(self.run_dir)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        dep = load_deployment(str(cfg), {"engine": "sim", "run_dir": str(self.run_dir)})
        self.plan = build_plan(dep)
        self.url = self.plan.frontend_url

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"launch exited early ({self.proc.returncode}):\n{self.text()}")
            return "all processes ready" in self.text()

        wait_for(ready, 90, "all processes ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def test_launch_disagg_sim_serves_then_ctrl_c_leaves_no_process_or_port(tmp_path: Path) -> None:
    launched = Launched(tmp_path, sim_config(tmp_path))
    try:
        launched.wait_ready()
        workers = workers_of(launched.url)
        assert {w["role"] for w in workers.values()} == {"prefill", "decode"}
        answer = post_json(
            f"{launched.url}/v1/chat/completions",
            {"model": "synth", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        )
        assert answer["choices"][0]["message"]["content"]
        pids = [w["pid"] for w in workers.values() if w.get("pid")]
        pids += [c for pid in pids for c in children_of(pid)]
        assert len(pids) >= 4  # two agents and their two engines
        for name in ("frontend", "prefill-0", "decode-0"):
            assert Path(launched.run_dir / f"{name}.log").stat().st_size > 0
    finally:
        rc = launched.stop()
    assert rc == 0, launched.text()
    assert "stopped all processes" in launched.text()
    for pid in pids:
        assert not pid_alive(pid), f"process {pid} survived Ctrl-C"
    for spec in launched.plan.processes:
        for port in spec.ports.values():
            if spec.role == "frontend" or port == spec.ports.get("http"):
                assert port_is_free(port), f"port {port} of {spec.name} still bound"


def test_crashed_worker_is_restarted_and_registers_again(tmp_path: Path) -> None:
    launched = Launched(tmp_path, sim_config(tmp_path))
    try:
        launched.wait_ready()
        before = workers_of(launched.url)["decode-0"]
        engines = children_of(before["pid"])
        assert engines, "the agent should have its engine as a child"
        os.kill(engines[0], signal.SIGKILL)  # the engine dies
        wait_for(lambda: "restart 1/5" in launched.text(), 30, "restart message")

        def re_registered() -> bool:
            now = workers_of(launched.url).get("decode-0")
            return bool(now and now["pid"] != before["pid"])

        wait_for(re_registered, 60, "decode-0 registered again by a new agent")
    finally:
        launched.stop()


def _plan_with_standin_engine(tmp_path: Path, engine_code: str, startup_timeout_s: float) -> LaunchPlan:
    """A plan whose one agg worker runs a stand-in engine command (not vLLM, not the simulator)."""
    cfg = sim_config(tmp_path)
    dep = load_deployment(str(cfg), {"mode": "agg", "engine": "sim", "run_dir": str(tmp_path / "run"),
                                     "agg.count": 1, "agg.startup_timeout_s": startup_timeout_s})  # fmt: skip
    plan = build_plan(dep)
    worker = plan.workers()[0]
    cut = worker.argv.index("--")
    worker.argv = worker.argv[: cut + 1] + [sys.executable, "-c", engine_code]
    worker.engine_argv = worker.argv[cut + 1 :]
    return plan


async def _failed_start(plan: LaunchPlan) -> str:
    """Start ``plan`` expecting a StartupError; stop whatever started; return the error message."""
    sup = Supervisor(plan, console=False)
    try:
        with pytest.raises(StartupError) as exc:
            await sup.start()
    finally:
        await sup.stop()
    return str(exc.value)


async def test_startup_timeout_names_the_worker_and_quotes_its_log(tmp_path: Path) -> None:
    code = "import time; print('stand-in engine: loading weights...', flush=True); time.sleep(120)"
    message = await _failed_start(_plan_with_standin_engine(tmp_path, code, startup_timeout_s=4))
    assert "agg-0 not ready after 4 s" in message
    assert "loading weights" in message
    assert "startup_timeout_s" in message


async def test_engine_dying_at_startup_ends_launch_with_its_last_lines(tmp_path: Path) -> None:
    code = "print('stand-in engine: CUDA out of memory', flush=True); raise SystemExit(1)"
    message = await _failed_start(_plan_with_standin_engine(tmp_path, code, startup_timeout_s=60))
    assert "agg-0 exited during start-up" in message
    assert "CUDA out of memory" in message


async def test_workers_sharing_a_gpu_start_one_after_another(tmp_path: Path) -> None:
    """Simulated workers marked as sharing GPU 0 (what share_gpus plans for vLLM): the second starts only
    once the first is ready, since vLLM's start-up memory profile would count its neighbour's allocations;
    a worker on another GPU starts at once."""
    cfg = sim_config(tmp_path, prefill=2, decode=1)
    dep = load_deployment(str(cfg), {"engine": "sim", "run_dir": str(tmp_path / "run")})
    plan = build_plan(dep)
    for spec, gpu in zip(plan.workers(), ["0", "0", "1"], strict=True):  # decode-0, prefill-0, prefill-1
        spec.cuda_visible_devices = gpu
    sup = Supervisor(plan, console=False)
    try:
        await sup.start()
        first, second, other = (sup.procs[s.name] for s in plan.workers())
        assert first.ready_after_s is not None
        assert second.started_at >= first.started_at + first.ready_after_s
        assert other.started_at < first.started_at + first.ready_after_s  # GPU 1: no wait
    finally:
        await sup.stop()


def test_standalone_worker_registers_and_deregisters(tmp_path: Path) -> None:
    """``pdkit worker`` on its own (the multi-node form) against a frontend started from a plan."""
    cfg = sim_config(tmp_path)
    dep = load_deployment(str(cfg), {"engine": "sim", "run_dir": str(tmp_path / "run")})
    plan = build_plan(dep)
    fe_spec = plan.processes[0]
    frontend = subprocess.Popen(fe_spec.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_for(lambda: _ok(f"{plan.frontend_url}/health"), 30, "frontend health")
        (port,) = free_ports(1)
        argv = [sys.executable, "-m", "pdkit.cli", "worker", "--role", "decode", "--engine", "sim",
                "--frontend", f"tcp://127.0.0.1:{fe_spec.ports['zmq']}", "--port", str(port),
                "--config", str(cfg)]  # fmt: skip
        worker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wid = f"decode@127.0.0.1:{port}"
        wait_for(lambda: wid in workers_of(plan.frontend_url), 60, "registration")
        assert workers_of(plan.frontend_url)[wid]["url"] == f"http://127.0.0.1:{port}"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        # deregistration is immediate: well before any liveness timeout would remove it
        wait_for(lambda: wid not in workers_of(plan.frontend_url), 2, "deregistration")
    finally:
        for p in (worker, frontend):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
