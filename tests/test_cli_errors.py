"""Every bad flag, value, subcommand or file given to ``pdkit`` ends as one line on stderr and exit code 2.

Each case runs the real console entry (``python -m pdkit.cli``) in a subprocess: the bug this guards
against (typer's bundled click exceptions escaping ``main()`` as 40-line tracebacks) only shows there.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def run_pdkit(*args: str, cwd: Path | None = None, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "pdkit.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> str:
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pdkit: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def closed_port() -> int:
    """A loopback port nobody listens on (bound for an instant by the OS's choice, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD_INPUT = [
    (["launch", "disagg", "--port", "abc", "--dry-run"], ["--port", "integer"]),
    (["launch", "disagg", "--tp", "x", "--dry-run"], ["--tp"]),
    (["launch", "agg", "--max-model-len", "1.5", "--dry-run"], ["--max-model-len"]),
    (["launch", "disagg", "--no-such-flag", "--dry-run"], ["No such option: --no-such-flag"]),
    (["launch", "disag"], ["No such command 'disag'", "disagg"]),
    (["no-such-command"], ["No such command"]),
    (["launch", "disagg", "--engine"], ["--engine", "requires an argument"]),
    (["launch", "disagg", "--port-offset", "-5", "--dry-run"], ["port_offset"]),
    (["launch", "disagg", "--port-offset", "60000", "--dry-run"], ["port_offset", "65535"]),
    (["launch", "disagg", "--config", "/tmp", "--dry-run"], ["/tmp is a directory, not a YAML file"]),
    (["launch", "disagg", "--config", "no-such-preset", "--dry-run"], ["neither a file nor a preset", "disagg-2p2d"]),
    (
        ["launch", "disagg", "--engine", "sim", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--dry-run"],
        ["model", "tokenizer.json", "local"],
    ),
    (["status", "--endpoint", "notaurl"], ["--endpoint", "notaurl", "http://"]),
    (["status", "--endpoint", "http://127.0.0.1:99999"], ["--endpoint"]),
    (["frontend", "--port", "abc"], ["--port"]),
    (["frontend", "--bogus"], ["No such option: --bogus"]),
    (["worker", "--role", "decode"], ["--frontend"]),
    (["sim-worker", "--port", "abc"], ["--port"]),
    (["sim-worker", "--role", "nope"], ["--role"]),
    (["bench", "--bogus"], ["No such option: --bogus"]),
    (["config", "show", "--role", "nope"], ["--role"]),
    (["config", "show", "--mode", "both"], ["mode"]),
    (["config", "show", "--config", "/tmp"], ["is a directory"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_INPUT, ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(args: list[str], words: list[str]) -> None:
    assert_one_line_exit_2(run_pdkit(*args, cwd=Path("/")), *words)


def test_status_against_a_closed_port_is_one_line() -> None:
    port = closed_port()
    assert_one_line_exit_2(run_pdkit("status", "--endpoint", f"http://127.0.0.1:{port}"), "cannot reach", str(port))


def test_usage_error_names_the_command_help_in_the_same_line() -> None:
    line = assert_one_line_exit_2(run_pdkit("launch", "agg", "--gpu"))
    assert "see 'pdkit launch agg --help'" in line or "requires an argument" in line
    line = assert_one_line_exit_2(run_pdkit("launch", "agg", "--prt", "1"))
    assert "--port" in line and "'pdkit launch agg --help'" in line  # click's suggestion survives


def test_no_subcommand_prints_help_not_a_traceback() -> None:
    result = run_pdkit("launch")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert "disagg" in result.stdout and "agg" in result.stdout


_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


@pytest.mark.parametrize("command", [["launch", "disagg"], ["launch", "agg"], ["worker"], ["frontend"]])
def test_help_at_80_columns_shows_every_flag_name_whole(command: list[str]) -> None:
    """Rich's option table cut names (``--prefill-gpu,--pref…``); click's plain help never breaks a name."""
    from typer.main import get_command

    from pdkit.cli import app

    cmd = get_command(app)
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    flags = {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}
    result = run_pdkit(*command, "--help", columns=80)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    shown = set(_FLAG.findall(result.stdout))
    assert flags <= shown, sorted(flags - shown)
    assert result.stdout.startswith("Usage: pdkit " + " ".join(command))
