"""The deployment secret and the private directory for local sockets.

Why a secret by default: a frontend on loopback is reachable by every process on the machine, so
"loopback needs no token" left the registry open to any local user (docs/security.md).  ``pdkit
launch`` therefore makes one secret per deployment, writes it to ``<run_dir>/token`` (mode 0600 in a
0700 directory) and hands it to its frontend and agents through the environment (``PDKIT_TOKEN``),
never through the command line (``/proc/PID/cmdline`` is world-readable, ``/proc/PID/environ`` is not).

Why a private directory: KV events carry prompt token ids, i.e. prompt content.  Local workers bind
their publisher and replay sockets as ``ipc://`` files in a directory only the deployment's user can
enter, so filesystem permissions, not a port number, decide who may read or replay them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

from pdkit.errors import ConfigError

TOKEN_ENV = "PDKIT_TOKEN"
TOKEN_FILE_NAME = "token"
# What --dry-run and config show print instead of a generated secret.
TOKEN_PLACEHOLDER = "<generated at launch>"
# The HTTP API key (frontend.api_key) travels the same way: a placeholder in the plan, the value at launch.
API_KEY_ENV = "PDKIT_API_KEY"
API_KEY_PLACEHOLDER = "<frontend.api_key>"
# sun_path holds 108 bytes on Linux (104 on macOS); longer ipc:// paths fail to bind.
_MAX_IPC_PATH = 100


def new_token() -> str:
    """A fresh deployment secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check an existing one is ours and closed to others.

    Refuses (ConfigError) a directory owned by someone else or open to group/others: another local
    user who created it first could otherwise read the token or bind the sockets placed there.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(str(path), "is owned by another user", "remove it or choose another run_dir")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def write_token(run_dir: Path, token: str) -> Path:
    """Store ``token`` in ``<run_dir>/token`` with mode 0600 (run dir made private first)."""
    private_dir(run_dir)
    path = run_dir / TOKEN_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return path


def read_token_file(path: str | Path) -> str:
    """The secret in ``path`` (surrounding whitespace stripped); refuses a file others may read."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError("--token-file", f"cannot read {p} ({exc.strerror})", "pass a readable token file") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError("--token-file", f"{p} is readable by other users", f"chmod 600 {p}")
    if not text:
        raise ConfigError("--token-file", f"{p} is empty", "write the deployment's token into it")
    return text


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """``--token`` (or ``PDKIT_TOKEN``, which typer maps onto it) wins over ``--token-file``."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    return None


def ipc_dir(run_dir: Path) -> Path:
    """Where a deployment's local ``ipc://`` sockets live: ``<run_dir>/kv`` when the paths fit in a
    socket address, else a short per-user, per-run-dir directory under the temp dir (same permissions).
    Deterministic, so the plan (built before anything runs) and the processes agree on it."""
    run_dir = run_dir.resolve()
    inside = run_dir / "kv"
    if len(str(inside)) + 32 <= _MAX_IPC_PATH:
        return inside
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"pdkit-{uid}" / digest


def ipc_paths(endpoints: list[str | None]) -> list[Path]:
    """The socket files named by ``ipc://`` endpoints (others skipped)."""
    return [Path(e[len("ipc://") :]) for e in endpoints if e and e.startswith("ipc://")]


def prepare_ipc_dirs(endpoints: list[str | None]) -> None:
    """Make the private directories of ``ipc://`` endpoints before an engine binds them (vLLM does not
    create them), and remove stale socket files a killed engine left (a bind on one fails)."""
    for path in ipc_paths(endpoints):
        parent = path.parent
        if parent.parent.name.startswith("pdkit-") and parent.parent.parent == Path(tempfile.gettempdir()):
            private_dir(parent.parent)
        private_dir(parent)
        if path.is_socket():
            path.unlink()


def install_secret(plan: Any) -> str:
    """At launch: the deployment's secret (the configured ``frontend.token``, else a new one) written to
    ``<run_dir>/token`` and put into every process's ``PDKIT_TOKEN`` in place of the placeholder (and the
    configured API key into ``PDKIT_API_KEY``); the private socket directories are created too.  Returns the secret."""
    token = plan.secret or new_token()
    plan.secret = token
    write_token(Path(plan.run_dir), token)
    for spec in plan.processes:
        if spec.env.get(TOKEN_ENV) == TOKEN_PLACEHOLDER:
            spec.env[TOKEN_ENV] = token
        if spec.env.get(API_KEY_ENV) == API_KEY_PLACEHOLDER and plan.api_key:
            spec.env[API_KEY_ENV] = plan.api_key
        events = spec.kv_events_config or {}
        prepare_ipc_dirs([events.get("endpoint"), events.get("replay_endpoint")])
    return token
