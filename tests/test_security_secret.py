"""The deployment secret (pdkit.secret) and how the plan carries it: created at launch, kept 0600,
never printed by --dry-run / config show, a configured token wins; local KV-event sockets are ipc://
files in a 0700 directory, off-host ones wildcard TCP without replay."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pdkit.config import load_deployment
from pdkit.errors import ConfigError
from pdkit.plan import build_plan, kv_events_config
from pdkit.protocol import PROTOCOL_VERSION, ProtocolError, parse_message, peek_version
from pdkit.secret import (
    TOKEN_ENV,
    TOKEN_PLACEHOLDER,
    install_secret,
    ipc_dir,
    private_dir,
    read_token_file,
    resolve_token,
)


def sim_plan(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    dep = load_deployment(overrides={"engine": "sim", "mode": "disagg", "run_dir": str(tmp_path / "run"), **overrides})
    return build_plan(dep)


def test_launch_generates_a_secret_kept_0600_and_hands_it_to_every_process(tmp_path: Path) -> None:
    plan = sim_plan(tmp_path)
    assert all(p.env[TOKEN_ENV] == TOKEN_PLACEHOLDER for p in plan.processes)
    token = install_secret(plan)
    assert len(token) >= 40 and all(p.env[TOKEN_ENV] == token for p in plan.processes)
    path = Path(plan.run_dir) / "token"
    assert path.read_text() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(plan.run_dir).stat().st_mode) == 0o700
    for p in plan.workers():  # the engines' socket directory exists, closed to others
        sock_dir = Path(p.kv_events_config["endpoint"][len("ipc://") :]).parent  # type: ignore[index]
        assert sock_dir.is_dir() and stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    assert install_secret(sim_plan(tmp_path)) != token  # one per deployment


def test_a_configured_token_wins_and_is_never_printed(tmp_path: Path) -> None:
    plan = sim_plan(tmp_path, **{"frontend.token": "configured-secret"})
    assert "configured-secret" not in plan.model_dump_json() and "configured-secret" not in repr(plan)
    assert install_secret(plan) == "configured-secret"
    cfg = tmp_path / "dep.yaml"
    cfg.write_text(json.dumps({"engine": "sim", "frontend": {"token": "configured-secret"}}))
    for argv in (["launch", "disagg", "--config", str(cfg), "--dry-run"],
                 ["launch", "disagg", "--config", str(cfg), "--dry-run", "--json"],
                 ["config", "show", "--config", str(cfg)]):  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "pdkit.cli", *argv], capture_output=True, text=True, check=True)
        assert "configured-secret" not in out.stdout + out.stderr
    text = subprocess.run([sys.executable, "-m", "pdkit.cli", "launch", "disagg", "--engine", "sim", "--dry-run"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "PDKIT_TOKEN='***'" in text


def test_the_api_key_is_never_printed_and_reaches_the_frontend_at_launch(tmp_path: Path) -> None:
    plan = sim_plan(tmp_path, **{"frontend.api_key": "k3y-s3cret"})
    assert "k3y-s3cret" not in plan.model_dump_json() and "k3y-s3cret" not in repr(plan)
    for extra in ([], ["--json"]):
        argv = ["launch", "disagg", "--engine", "sim", "--api-key", "k3y-s3cret", "--dry-run", *extra]
        out = subprocess.run([sys.executable, "-m", "pdkit.cli", *argv], capture_output=True, text=True, check=True)
        assert "k3y-s3cret" not in out.stdout + out.stderr and "PDKIT_API_KEY" in out.stdout
    install_secret(plan)
    [fe] = [p for p in plan.processes if p.role == "frontend"]
    assert fe.env["PDKIT_API_KEY"] == "k3y-s3cret"


def test_token_files_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("s3cret\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        read_token_file(f)
    os.chmod(f, 0o600)
    assert read_token_file(f) == "s3cret" and resolve_token(None, str(f)) == "s3cret"
    assert resolve_token("from-env", str(f)) == "from-env"
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_a_socket_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by another user"):
        private_dir(d)


def test_kv_event_endpoints_bind_privately(tmp_path: Path) -> None:
    dep = load_deployment(overrides={"engine": "sim"})
    local = kv_events_config(dep, "decode", 0, tmp_path)
    assert local["endpoint"] == f"ipc://{tmp_path.resolve()}/kv/decode-0.pub"
    assert local["replay_endpoint"] == f"ipc://{tmp_path.resolve()}/kv/decode-0.replay"
    remote = load_deployment(
        overrides={"engine": "sim", "frontend.host": "10.0.0.1", "frontend.token": "t", "decode.host": "10.0.0.2"}
    )
    ev = kv_events_config(remote, "decode", 1, tmp_path)
    assert ev["endpoint"] == f"tcp://*:{remote.group('decode').kv_events_port_base + 1}" and "replay_endpoint" not in ev
    deep = tmp_path / ("x" * 120)
    short = ipc_dir(deep)
    assert len(str(short / "prefill-12.replay")) < 100 and short == ipc_dir(deep)  # deterministic fallback


def test_protocol_version_mismatch_is_named() -> None:
    raw = b'{"type": "ack", "version": 1, "ok": false, "error": "x"}'
    assert peek_version(raw) == 1 and PROTOCOL_VERSION == 2
    with pytest.raises(ProtocolError, match="protocol version 1 not supported .frontend speaks 2"):
        parse_message(raw)
