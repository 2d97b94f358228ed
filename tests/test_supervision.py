"""Supervision that degrades instead of dying, end to end on CPU: ``pdkit launch disagg --engine sim`` as a
real subprocess (real agents, simulated engines, ZMQ registration, HTTP on loopback), with processes
killed, stopped and crowded out of their ports by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import Launched, children_of, pid_alive, post_json, sim_config, wait_for, workers_of

from pdkit.config import load_deployment

pytestmark = pytest.mark.timeout(240)

CHAT = {"model": "synth", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def supervised_config(tmp_path: Path, **supervision: float) -> Path:
    """The sim deployment of test_launch (one prefill, one decode) with a ``supervision:`` section."""
    path = sim_config(tmp_path)
    cfg = json.loads(path.read_text())
    cfg["supervision"] = {"restart_backoff_s": 0.2, **supervision}
    path.write_text(json.dumps(cfg))
    return path


def engine_of(launched: Launched, name: str) -> tuple[int, int]:
    """(agent pid, engine pid) of the registered worker ``name``."""
    agent = int(workers_of(launched.url)[name]["pid"])
    engines = wait_for(lambda: children_of(agent), 10, f"{name}'s engine")
    return agent, engines[0]


def registered_by_new_agent(launched: Launched, name: str, old_agent: int) -> None:
    def again() -> bool:
        now = workers_of(launched.url).get(name)
        return bool(now and now["pid"] != old_agent)

    wait_for(again, 60, f"{name} registered again by a new agent")


def crash_engine(launched: Launched, name: str) -> int:
    """SIGKILL ``name``'s engine; returns the agent pid it belonged to."""
    agent, engine = engine_of(launched, name)
    os.kill(engine, signal.SIGKILL)
    return agent


def chat_ok(launched: Launched) -> bool:
    answer = post_json(f"{launched.url}/v1/chat/completions", CHAT)
    return bool(answer["choices"][0]["message"]["content"])


def test_kill_9_of_an_agent_takes_its_engine_and_the_agent_comes_back(tmp_path: Path) -> None:
    launched = Launched(tmp_path, supervised_config(tmp_path))
    try:
        launched.wait_ready()
        info = workers_of(launched.url)["decode-0"]
        dep = load_deployment(str(tmp_path / "sim.yaml"), {"engine": "sim"})
        assert info["max_model_len"] == dep.max_model_len  # from the engine's /v1/models at registration
        agent, engine = engine_of(launched, "decode-0")
        os.kill(agent, signal.SIGKILL)  # the agent cannot stop its engine itself
        wait_for(lambda: not pid_alive(engine), 5, "the orphaned engine to die with its agent")
        registered_by_new_agent(launched, "decode-0", agent)
        assert chat_ok(launched)
        assert "Address already in use" not in launched.text()
    finally:
        assert launched.stop() == 0, launched.text()


def test_crash_looping_prefill_stays_down_and_decode_serves_until_the_last_decode_is_gone(tmp_path: Path) -> None:
    launched = Launched(tmp_path, supervised_config(tmp_path, max_restarts=1))
    try:
        launched.wait_ready()
        agent = crash_engine(launched, "prefill-0")
        wait_for(lambda: "; restart 1/1 (within 600 s)" in launched.text(), 30, "restart message")
        registered_by_new_agent(launched, "prefill-0", agent)
        crash_engine(launched, "prefill-0")
        wait_for(lambda: "prefill-0 is down for good" in launched.text(), 30, "down-for-good report")
        text = launched.text()
        assert "restarted 1 times within 600 s (supervision.max_restarts=1)" in text
        assert "no prefill worker left (prefill-0 down for good): decode workers prefill locally" in text
        wait_for(lambda: "prefill-0" not in workers_of(launched.url), 10, "prefill-0 gone from /workers")
        assert launched.proc.poll() is None, "the deployment can still serve: it must not stop"
        assert chat_ok(launched)  # the decode worker prefills locally
        assert "decode-0" in workers_of(launched.url)

        agent = crash_engine(launched, "decode-0")
        registered_by_new_agent(launched, "decode-0", agent)
        assert chat_ok(launched)
        crash_engine(launched, "decode-0")
        rc = launched.proc.wait(timeout=60)
        text = launched.text()
        assert rc == 1, text
        assert "error: no decode worker left (decode-0 down for good): a disagg deployment cannot serve" in text
        assert "stopped all processes" in text
        assert "Traceback" not in text
    finally:
        launched.stop()


def test_crashes_further_apart_than_the_window_do_not_spend_the_budget(tmp_path: Path) -> None:
    window_s = 2.0
    launched = Launched(tmp_path, supervised_config(tmp_path, max_restarts=1, restart_window_s=window_s))
    try:
        launched.wait_ready()
        for _ in range(3):
            crashed_at = time.monotonic()
            agent = crash_engine(launched, "prefill-0")
            registered_by_new_agent(launched, "prefill-0", agent)
            time.sleep(max(0.0, window_s + 0.5 - (time.monotonic() - crashed_at)))
        text = launched.text()
        assert text.count("; restart 1/1 (within 2 s)") == 3, text
        assert "down for good" not in text
        assert chat_ok(launched)
    finally:
        assert launched.stop() == 0, launched.text()


def test_stopped_engine_turns_unhealthy_and_healthy_again(tmp_path: Path) -> None:
    launched = Launched(tmp_path, supervised_config(tmp_path, probe_timeout_s=1.0))
    engine = None
    try:
        launched.wait_ready()
        assert workers_of(launched.url)["decode-0"]["load"]["healthy"] is True
        _, engine = engine_of(launched, "decode-0")
        os.kill(engine, signal.SIGSTOP)

        def load() -> dict:
            return workers_of(launched.url).get("decode-0", {}).get("load", {})

        wait_for(lambda: load().get("healthy") is False, 15, "decode-0 reported unhealthy")
        assert "did not answer" in load()["unhealthy_reason"]
        time.sleep(2)  # a few heartbeats later it is still registered: the agent keeps heartbeating
        assert load().get("healthy") is False
        os.kill(engine, signal.SIGCONT)
        wait_for(lambda: load().get("healthy") is True, 15, "decode-0 healthy again")
        assert "unhealthy_reason" not in load()
        assert "engine healthy again" in launched.text()
    finally:
        if engine is not None:
            os.kill(engine, signal.SIGCONT)
        assert launched.stop() == 0, launched.text()


def _hold_port(port: int, timeout_s: float = 5.0) -> socket.socket:
    """Listen on ``port`` as "another process" would, as soon as it is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_port_taken_while_running_means_one_line_and_no_restart_loop(tmp_path: Path) -> None:
    launched = Launched(tmp_path, supervised_config(tmp_path))
    holder = None
    try:
        launched.wait_ready()
        port = int(workers_of(launched.url)["prefill-0"]["url"].rsplit(":", 1)[1])
        crash_engine(launched, "prefill-0")
        holder = _hold_port(port)  # someone else grabs the port before the restart
        wait_for(lambda: "prefill-0 is down for good" in launched.text(), 30, "down-for-good report")
        text = launched.text()
        assert f"port {port} (HTTP of the engine at 127.0.0.1) is already in use by another process" in text
        assert "restart 2/" not in text
        assert launched.proc.poll() is None
        assert chat_ok(launched)
    finally:
        if holder is not None:
            holder.close()
        assert launched.stop() == 0, launched.text()


def test_port_taken_at_start_up_ends_launch_with_exit_2_and_one_line(tmp_path: Path) -> None:
    cfg = supervised_config(tmp_path)
    port = json.loads(cfg.read_text())["decode"]["http_port_base"]
    holder = _hold_port(port)
    try:
        argv = [sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--engine", "sim", "--config", str(cfg),
                "--run-dir", str(tmp_path / "run")]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    assert str(port) in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "restart" not in done.stderr


def test_engine_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    """The exec wrapper the agent starts its engine through (``pdkit.parent_death``), on its own."""
    parent_code = (
        "import subprocess, sys, time; from pdkit.parent_death import wrap; "
        "child = subprocess.Popen(wrap(['sleep', '60'])); print(child.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_for(lambda: Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep"), 10, "exec of sleep")
        parent.kill()
        parent.wait()
        wait_for(lambda: not pid_alive(child), 5, "the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_wrapper_refuses_to_start_an_orphan() -> None:
    """A parent that is gone before the death signal is armed: the command is not started."""
    done = subprocess.run(
        [sys.executable, "-m", "pdkit.parent_death", "1", "--", "true"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 3
    assert "parent 1 is gone" in done.stderr
