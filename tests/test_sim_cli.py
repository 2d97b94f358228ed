"""``pdkit sim-worker`` as a real process: options, readiness, orderly stop on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import typer
from typer.testing import CliRunner

from pdkit.sim.cli import sim_worker

_LAUNCH = "import typer, sys; from pdkit.sim.cli import sim_worker; typer.run(sim_worker)"


def test_bad_role_is_rejected() -> None:
    app = typer.Typer()
    app.command()(sim_worker)
    result = CliRunner().invoke(app, ["--role", "both"])
    assert result.exit_code == 2
    assert "--role" in result.output


def test_unknown_flag_is_rejected() -> None:
    app = typer.Typer()
    app.command()(sim_worker)
    result = CliRunner().invoke(app, ["--gpu-memory-utilization", "0.9"])
    assert result.exit_code == 2


def test_process_serves_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _LAUNCH,
            "--role",
            "prefill",
            "--port",
            "0",
            "--time-scale",
            "0",
            "--served-model-name",
            "m1",
            "--kv-capacity-blocks",
            "64",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:  # the worker logs its URL once it listens
            m = re.search(r"serving m1 at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url is not None, "worker never reported readiness"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "m1", "prompt": "hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
