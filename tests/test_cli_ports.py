"""Busy ports and ``--port-offset``: ``pdkit launch`` refuses a busy port before starting anything, naming
the port and its config key; an offset moves a whole deployment so two run side by side.

Real sockets hold the ports (listening, as a server would); launches run the real console entry in a
subprocess with the simulated engine on loopback.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pdkit.config import load_deployment
from pdkit.plan import build_plan
from pdkit.ports import busy_ports, planned_ports

pytestmark = pytest.mark.timeout(180)


def free_offset(*launch_overrides: dict, blocks: int = 1) -> int:
    """An offset (multiple of 1000) whose ports, and those of the next ``blocks - 1`` offsets, are free now."""
    rng = random.Random()
    for _ in range(200):
        offset = rng.randrange(10, 50) * 1000
        plans = [
            build_plan(load_deployment(None, {**o, "port_offset": offset + 1000 * b}))
            for b in range(blocks)
            for o in (launch_overrides or ({"engine": "sim"},))
        ]
        if not any(busy_ports(plan) for plan in plans):
            return offset
    raise AssertionError("no free port block found")


@contextmanager
def listening(port: int, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
        yield sock


def pdkit(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdkit.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


# (engine, port name in the plan, process, the key pdkit must name)
BUSY_CASES = [
    ("sim", "frontend", "http", "frontend.port"),
    ("sim", "frontend", "zmq", "frontend.zmq_port"),
    ("sim", "decode-0", "http", "decode.http_port_base + 0"),
    ("vllm", "prefill-0", "nixl_side_channel", "prefill.nixl_side_channel_port_base + 0"),
]


@pytest.mark.parametrize(("engine", "process", "name", "key"), BUSY_CASES, ids=[c[3] for c in BUSY_CASES])
def test_busy_port_stops_launch_before_anything_starts(
    engine: str, process: str, name: str, key: str, tmp_path
) -> None:
    offset = free_offset({"engine": engine})
    plan = build_plan(load_deployment(None, {"engine": engine, "port_offset": offset}))
    port = next(p for p in plan.processes if p.name == process).ports[name]
    run_dir = tmp_path / "run"
    args = ["launch", "disagg", "--engine", engine, "--port-offset", str(offset), "--run-dir", str(run_dir)]
    if engine == "vllm":
        args.append("--allow-untested-stack")  # this CPU machine has no GPU: let the port check speak
    with listening(port):
        result = pdkit(*args, "--smoke-test", cwd=tmp_path)
        dry = pdkit(*args, "--dry-run", cwd=tmp_path)
    # (the allowed stack check's warnings aside) one line
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("pdkit: warning:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{key} + port_offset {offset} = {port}" in lines[0] and "in use" in lines[0]
    assert "--port-offset" in lines[0]  # the fix is named
    assert not (run_dir / "frontend.log").exists()  # nothing was started
    assert dry.returncode == 0 and f"warning: {key} + port_offset {offset} = {port}" in dry.stdout


def test_planned_ports_name_every_config_key() -> None:
    plan = build_plan(load_deployment(None, {"engine": "vllm", "prefill.gpus": [[1], [2]], "decode.gpus": [[0]]}))
    keys = {p.describe() for p in planned_ports(plan)}
    assert {"frontend.port = 8000", "frontend.zmq_port = 8100"} <= keys
    assert {"prefill.http_port_base + 1 = 8301", "prefill.nixl_side_channel_port_base + 1 = 5611"} <= keys
    assert not any("kv_events" in k for k in keys)  # local KV events go over ipc sockets: no TCP port


def test_port_offset_shifts_every_port_and_the_dry_run_shows_it(run_cli) -> None:
    code, out, _ = run_cli("launch", "disagg", "--engine", "sim", "--port-offset", "1000", "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["frontend_url"] == "http://127.0.0.1:9000"
    ports = {p["name"]: p["ports"] for p in plan["processes"]}
    assert ports["frontend"] == {"http": 9000, "zmq": 9100}
    assert ports["decode-0"] == {"http": 9400}
    assert ports["prefill-0"] == {"http": 9300}
    decode = next(p for p in plan["processes"] if p["name"] == "decode-0")
    assert "tcp://127.0.0.1:9100" in decode["argv"]  # the registry, shifted


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_two_sim_deployments_run_side_by_side_with_offsets(tmp_path) -> None:
    base = free_offset({"engine": "sim"}, blocks=2)
    first_args = ["launch", "disagg", "--engine", "sim", "--port-offset", str(base), "--run-dir", str(tmp_path / "a")]
    first = subprocess.Popen(
        [sys.executable, "-m", "pdkit.cli", *first_args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{8000 + base}"
        deadline = time.monotonic() + 90
        while True:
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            try:
                if len(_get(f"{url}/workers")["workers"]) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "first deployment never got both workers"
            time.sleep(0.3)
        # the same ports again: refused at once, naming the first port that is taken
        again = pdkit(*first_args[:-2], "--run-dir", str(tmp_path / "b"), "--smoke-test", cwd=tmp_path)
        assert again.returncode == 2 and f"frontend.port + port_offset {base} = {8000 + base}" in again.stderr
        # the next block: runs beside the first
        second = pdkit(
            "launch", "disagg", "--engine", "sim", "--port-offset", str(base + 1000),
            "--run-dir", str(tmp_path / "c"), "--smoke-test", cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"http://127.0.0.1:{9000 + base}" in second.stdout
        assert len(_get(f"{url}/workers")["workers"]) == 2  # the first is still serving
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()


def test_only_ports_of_this_machine_are_checked() -> None:
    """A worker on another node (an address this machine does not own) is not reported busy."""
    from pdkit.ports import bind_problem

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held = sock.getsockname()[1]
        assert bind_problem("127.0.0.1", held) == "in use"
        assert bind_problem("0.0.0.0", held) == "in use"  # a wildcard bind collides with it too
        assert bind_problem("192.0.2.10", held) is None  # TEST-NET-1: not an address of this machine
        assert bind_problem("no-such-host.invalid", held) is None
    assert bind_problem("127.0.0.1", held) is None  # released: free again
