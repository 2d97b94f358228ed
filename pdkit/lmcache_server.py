"""LMCache's multi-process mode: the ``lmcache server`` each LMCache-using worker gets (issue 16).

Why pdkit starts it instead of LMCache's own ``lmcache.mp.autostart``: the auto-started server is a child
of one vLLM worker process (it dies and restarts with the engine, its log mixes into the engine's, and
nobody restarts it when it alone dies), and it runs in vLLM's Python -- which on vLLM 0.33 (torch 2.14)
has no lmcache wheel.  As a supervised process of its own it gets its own log prefix, restart budget and
health wait, starts before its engine (LMCacheMPConnector connects at engine start-up), stops after it,
and can run in another Python (``lmcache.server_python``, e.g. a torch-2.13 venv) or command
(``lmcache.server_command``).

Facts from the lmcache 0.5.6 wheel (``lmcache/cli/commands/server.py``, ``v1/multiprocess/config.py``,
``v1/multiprocess/http_apis/info_api.py``): ``lmcache server`` (console script ``lmcache`` =
``lmcache.cli.main:main``) binds the ZMQ request server on ``--host``/``--port`` (default localhost:5555)
and an HTTP API on ``--http-host``/``--http-port`` (default 127.0.0.1:8080, *no authentication*: pdkit
binds both to loopback); readiness is ``GET /healthcheck`` (200 once the cache engine exists, 503
before); the CPU tier is ``--l1-size-gb``, which 0.5.6 accepts only with ``--eviction-policy``;
``--chunk-size`` defaults to 256. MP mode stores and looks up whole chunks only (no unfull chunk).

One server per worker (LMCache's own P/D recipe): ports ``lmcache_port_base + index`` and
``lmcache_http_port_base + index`` of the worker's role, same GPUs as the worker (the server maps the
worker's KV cache over CUDA IPC).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pdkit.config import Deployment, Role
from pdkit.errors import ConfigError
from pdkit.process_spec import ProcessSpec
from pdkit.stack import plan_stack

SERVER_HOST = "127.0.0.1"  # the admin API is unauthenticated: never off the host
HEALTH_PATH = "/healthcheck"
SIDECAR_SUFFIX = "-lmcache"
DEFAULT_COMMAND_TAIL = ["-m", "lmcache.cli.main", "server"]
# LMCache phones home by default; the server gets the same opt-outs the in-process mode sets.
SERVER_ENV = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}


def runs_lmcache_server(dep: Deployment, role: Role) -> bool:
    """Whether workers of ``role`` get an ``lmcache server``: vLLM engine, LMCache on, mp mode, P or agg."""
    from pdkit.kv_config import lmcache_mode

    if dep.engine != "vllm" or not dep.lmcache.enabled or role not in ("prefill", "agg"):
        return False
    return lmcache_mode(dep.lmcache, plan_stack(dep.vllm_version)) == "mp"


def server_ports(dep: Deployment, role: Role, index: int) -> tuple[int, int] | None:
    """(ZMQ request port, HTTP port) of worker ``index``'s server, or None when it runs none."""
    if not runs_lmcache_server(dep, role):
        return None
    group = dep.group(role)
    if group.lmcache_port_base is None or group.lmcache_http_port_base is None:
        raise ConfigError(
            f"{role}.lmcache_port_base",
            "lmcache.mode=mp needs the LMCache server ports of this role",
            f"set {role}.lmcache_port_base and {role}.lmcache_http_port_base (e.g. 5910 and 6910)",
        )
    return group.lmcache_port_base + index, group.lmcache_http_port_base + index


def server_command(dep: Deployment) -> list[str]:
    """The command before pdkit's flags: ``server_command``, else ``<server_python> -m lmcache.cli.main server``."""
    lm = dep.lmcache
    if lm.server_command:
        return list(lm.server_command)
    return [lm.server_python or sys.executable or "python3", *DEFAULT_COMMAND_TAIL]


def _check_supported(dep: Deployment) -> None:
    lm = dep.lmcache
    if lm.disk_path is not None or lm.remote_url:
        raise ConfigError(
            "lmcache.disk_path" if lm.disk_path is not None else "lmcache.remote_url",
            "pdkit passes only the CPU tier to an lmcache server (mp mode)",
            "drop it and give the server its L2 flags through lmcache.server_args, or use lmcache.mode=in_process",
        )


def server_argv(dep: Deployment, role: Role, index: int) -> list[str]:
    """The full command line of worker ``index``'s server."""
    ports = server_ports(dep, role, index)
    assert ports is not None
    zmq_port, http_port = ports
    lm = dep.lmcache
    cpu_gb = str(int(lm.cpu_gb)) if float(lm.cpu_gb).is_integer() else str(lm.cpu_gb)
    # lmcache 0.5.6's server refuses --l1-size-gb without an eviction policy (it exits at start-up).
    eviction = [] if "--eviction-policy" in lm.server_args else ["--eviction-policy", "LRU"]
    return [
        *server_command(dep),
        "--host", SERVER_HOST,
        "--port", str(zmq_port),
        "--http-host", SERVER_HOST,
        "--http-port", str(http_port),
        "--chunk-size", str(lm.chunk_size),
        "--l1-size-gb", cpu_gb,
        *eviction,
        *lm.server_args,
    ]  # fmt: skip


def sidecar_name(worker_name: str) -> str:
    return worker_name + SIDECAR_SUFFIX


def server_spec(
    dep: Deployment, role: Role, index: int, run_dir: Path, cuda_visible_devices: str | None
) -> ProcessSpec | None:
    """Worker ``index``'s ``lmcache server`` as a ProcessSpec (``sidecar_of`` = the worker), or None."""
    ports = server_ports(dep, role, index)
    if ports is None:
        return None
    _check_supported(dep)
    worker = f"{role}-{index}"
    name = sidecar_name(worker)
    env = dict(SERVER_ENV)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return ProcessSpec(
        name=name,
        role=role,
        index=index,
        host=dep.group(role).host,
        argv=server_argv(dep, role, index),
        env=env,
        cuda_visible_devices=cuda_visible_devices,
        ports={"lmcache": ports[0], "lmcache_http": ports[1]},
        url=f"tcp://{SERVER_HOST}:{ports[0]}",
        health_url=f"http://{SERVER_HOST}:{ports[1]}{HEALTH_PATH}",
        sidecar_of=worker,
        log_file=str(run_dir / f"{name}.log"),
        startup_timeout_s=dep.lmcache.server_startup_timeout_s,
    )
