"""``pdkit worker``: its flags (or the shared deployment config) into :class:`~pdkit.agent.AgentSettings`.

Why apart from the agent: the agent runs one engine and talks to the frontend; deciding *which* engine
command, ports and identity a worker has is planning, and a standalone worker (the multi-node form) takes
it from the same config and plan code as ``pdkit launch``.  Keeping it here keeps pdkit/agent.py free of
pdkit.config and pdkit.plan (what Ray actors and launched workers import stays small).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlparse

from pdkit.agent import DEFAULT_PROBE_TIMEOUT_S, AgentSettings, WorkerAgent
from pdkit.config import Deployment, load_deployment, port_fields
from pdkit.errors import ConfigError
from pdkit.kv_config import nixl_mode_of
from pdkit.protocol import WorkerInfo
from pdkit.stack import installed_version


def run_agent_cli(ctx: Any, **opts: Any) -> int:
    """Build :class:`AgentSettings` from ``pdkit worker`` options and run the agent to completion."""
    engine_argv: list[str] = list(ctx.args)
    if engine_argv and engine_argv[0] == "--":
        engine_argv = engine_argv[1:]
    role = opts["role"]
    if role not in ("prefill", "decode", "agg"):
        raise ConfigError("--role", f"unknown role {role!r}", "use prefill, decode or agg")
    env: dict[str, str] = {}
    if not engine_argv:
        engine_argv, env, opts = _engine_from_config(opts)
    url = opts.get("url")
    if not url:
        raise ConfigError("--url", "an engine command is given but not its URL", "pass --url http://HOST:PORT")
    worker_id = opts.get("worker_id") or f"{role}-{url.split('//', 1)[-1].replace(':', '-')}"
    info = WorkerInfo(
        worker_id=worker_id,
        role=role,
        url=url,
        model=opts.get("served_model_name") or "synth",
        engine=opts.get("engine") or "vllm",
        nixl_side_channel=opts.get("nixl_side_channel"),
        kv_events_endpoint=opts.get("kv_events_endpoint"),
        kv_events_replay_endpoint=opts.get("kv_events_replay_endpoint"),
        kv_events_topic=opts.get("kv_events_topic") or worker_id,
        block_size=opts.get("block_size") or 16,
        prefix_caching=prefix_caching_enabled(engine_argv),
        engine_version=installed_version("vllm") if (opts.get("engine") or "vllm") == "vllm" else None,
        nixl_mode=nixl_mode_of(engine_argv),
        pid=os.getpid(),
    )
    from pdkit.secret import TOKEN_ENV, prepare_ipc_dirs, resolve_token

    # The engine binds its KV-event sockets in the deployment's private directory: make it first.
    prepare_ipc_dirs([info.kv_events_endpoint, info.kv_events_replay_endpoint])
    settings = AgentSettings(
        info=info,
        frontend=opts["frontend"],
        engine_argv=engine_argv,
        engine_env=env,
        token=resolve_token(os.environ.get(TOKEN_ENV), opts.get("token_file")),
        startup_timeout_s=float(opts.get("startup_timeout_s") or 900.0),
        heartbeat_interval_s=float(opts.get("heartbeat_interval_s") or 1.0),
        probe_timeout_s=_probe_timeout_from_env(),
    )
    return asyncio.run(WorkerAgent(settings).run())


def _probe_timeout_from_env() -> float:
    """``PDKIT_PROBE_TIMEOUT_S`` (``pdkit launch`` sets it from ``supervision.probe_timeout_s``)."""
    raw = os.environ.get("PDKIT_PROBE_TIMEOUT_S", "")
    if not raw:
        return DEFAULT_PROBE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ConfigError("PDKIT_PROBE_TIMEOUT_S", f"{raw!r} is not a positive number of seconds", "e.g. 3")
    return value


def prefix_caching_enabled(engine_argv: list[str]) -> bool:
    """Whether ``vllm serve ENGINE_ARGV`` keeps vLLM's prefix cache on (its default; the last flag wins)."""
    enabled = True
    for arg in engine_argv:
        if arg == "--no-enable-prefix-caching":
            enabled = False
        elif arg == "--enable-prefix-caching":
            enabled = True
        elif arg.startswith("--enable-prefix-caching="):
            enabled = arg.split("=", 1)[1].strip().lower() not in ("false", "0", "no")
    return enabled


def standalone_deployment(opts: dict[str, Any]) -> Deployment:
    """The deployment of one standalone ``pdkit worker``: its role's group cut down to this one worker.

    ``--index`` shifts the worker's port bases as the plan does for worker ``index`` of its group;
    ``--port`` and ``--gpus`` override its HTTP port and GPUs; ``--frontend`` names the frontend's real
    registry port (``zmq_port``; KV events on the next one).  The config's ``port_offset`` is applied once:
    the ports are read from the loaded (shifted) deployment, and the cut-down one is loaded with
    ``port_offset: 0`` and every port given (the URL's port already is a real port).
    """
    role = opts["role"]
    fe = urlparse(opts["frontend"])
    overrides: dict[str, Any] = {"mode": "agg" if role == "agg" else "disagg", "frontend.host": fe.hostname}
    for key in ("model", "served_model_name", "engine"):
        if opts.get(key):
            overrides[key] = opts[key]
    if opts.get("host"):
        overrides[f"{role}.host"] = opts["host"]
    dep = load_deployment(opts.get("config"), overrides, check=False)
    group = dep.group(role)
    index = int(opts.get("index") or 0)
    if opts.get("gpus"):
        try:
            gpus = [int(g) for g in str(opts["gpus"]).split(",") if g.strip()]
        except ValueError:
            raise ConfigError("--gpus", f"{opts['gpus']!r} is not a list of GPU numbers", "e.g. --gpus 0,1") from None
    else:
        gpus = group.gpus[index] if index < len(group.gpus) else []
    overrides["port_offset"] = 0
    for key, value in port_fields(dep):
        overrides[key] = value + index if key.startswith(f"{role}.") and key.endswith("_port_base") else value
    if fe.port:
        overrides["frontend.zmq_port"] = fe.port
        overrides["frontend.kv_events_port"] = fe.port + 1
    if opts.get("port"):
        overrides[f"{role}.http_port_base"] = int(opts["port"])
    overrides |= {f"{role}.gpus": [gpus], f"{role}.count": 1, f"{role}.tensor_parallel_size": max(len(gpus), 1)}
    return load_deployment(opts.get("config"), overrides, check=False)


def _engine_from_config(opts: dict[str, Any]) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """Standalone ``pdkit worker`` (multi-node): derive the engine command as ``launch`` would.

    The worker becomes a one-worker group of its role (:func:`standalone_deployment`).
    """
    from pdkit.plan import DEFAULT_RUN_DIR, worker_spec

    role = opts["role"]
    dep = standalone_deployment(opts)
    spec = worker_spec(dep, role, 0, (dep.run_dir or DEFAULT_RUN_DIR).resolve())
    host = dep.group(role).host
    opts = {**opts, "url": opts.get("url") or spec.url}
    opts["worker_id"] = opts.get("worker_id") or f"{role}@{host}:{spec.ports['http']}"
    if "nixl_side_channel" in spec.ports:
        opts["nixl_side_channel"] = opts.get("nixl_side_channel") or f"{host}:{spec.ports['nixl_side_channel']}"
    events = spec.kv_events_config or {}
    opts["kv_events_endpoint"] = opts.get("kv_events_endpoint") or events.get("endpoint")
    opts["kv_events_replay_endpoint"] = opts.get("kv_events_replay_endpoint") or events.get("replay_endpoint")
    opts["kv_events_topic"] = events.get("topic")  # the engine publishes under the plan's topic
    opts["served_model_name"] = dep.served_name
    from pdkit.secret import TOKEN_ENV

    engine_env = {k: v for k, v in spec.env.items() if k != TOKEN_ENV}  # the plan's placeholder, not a secret
    return spec.engine_argv, engine_env, opts
