"""Deployment -> launch plan: one :class:`ProcessSpec` per process, nothing started.

Why a separate plan: ``--dry-run`` must show exactly what ``launch`` would run (command lines, GPUs,
env, ports, KV-transfer config) on a machine with no GPU and no vllm, and the supervisor, the worker
agent and the GPU check scripts all start processes from this one description.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pdkit.config import Deployment, Role, SupervisionConfig, is_loopback
from pdkit.errors import ConfigError
from pdkit.flags import to_flags
from pdkit.frontend.settings import FrontendProcessOptions, FrontendSettings
from pdkit.kv_config import RoleKVConfig, kv_transfer_config
from pdkit.lmcache_server import server_ports, server_spec
from pdkit.model_files import has_weights, is_synthetic
from pdkit.process_spec import ProcessSpec
from pdkit.secret import API_KEY_ENV, API_KEY_PLACEHOLDER, TOKEN_ENV, TOKEN_PLACEHOLDER, ipc_dir
from pdkit.sim.settings import SimSettings

DEFAULT_RUN_DIR = Path("pdkit-run")
VLLM_ENTRY = ["-m", "vllm.entrypoints.cli.main", "serve"]


class LaunchPlan(BaseModel):
    """The whole deployment: the frontend first, then workers in start-up order."""

    mode: str
    engine: str
    model: str
    served_model_name: str
    run_dir: str
    frontend_url: str
    processes: list[ProcessSpec]
    warnings: list[str] = Field(default_factory=list)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    # The configured frontend.token, never dumped (--dry-run --json): the processes' env holds a
    # placeholder until the supervisor puts the real secret (this one, or a generated one) there.
    secret: str | None = Field(default=None, exclude=True, repr=False)
    # frontend.api_key, likewise never dumped: the frontend's env holds a placeholder until launch.
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    # The vLLM stack the connector names and flags are for (pdkit/stack.py): version, status, known.
    vllm_stack: dict[str, Any] | None = None
    # disagg: whether the frontend will seed decodes with the prefill's first token, and why (docs/seeding.md)
    seeding: str | None = None

    def workers(self) -> list[ProcessSpec]:
        return [p for p in self.processes if p.role != "frontend" and p.sidecar_of is None]

    def sidecars(self, worker: str) -> list[ProcessSpec]:
        """The helper processes of ``worker`` (its ``lmcache server``), started before it."""
        return [p for p in self.processes if p.sidecar_of == worker]

    def starts_after(self, worker: ProcessSpec) -> list[ProcessSpec]:
        """Workers listed before ``worker`` on one of its GPUs (same host): it starts once they are ready.

        Why: vLLM sizes its KV cache from a memory profile of its own start-up and counts whatever a
        neighbour allocates meanwhile as its own (on one H200, two deployments starting together on GPU 0
        got «Available KV cache memory: -31.8 GiB»).  Workers on distinct GPUs still start together.
        """
        mine = _gpu_ids(worker)
        before = []
        for other in self.workers():
            if other.name == worker.name:
                break
            if mine and other.host == worker.host and mine & _gpu_ids(other):
                before.append(other)
        return before


def _gpu_ids(spec: ProcessSpec) -> set[str]:
    return set((spec.cuda_visible_devices or "").split(",")) - {""}


def _python() -> str:
    return sys.executable or "python3"


def _pdkit_cli() -> list[str]:
    return [_python(), "-m", "pdkit.cli"]


def frontend_spec(dep: Deployment, run_dir: Path) -> ProcessSpec:
    """The frontend process.  It always binds the KV-event SUB socket every worker publishes to (so
    ``/workers`` and ``pdkit_kv_*`` show index sizes under any policy) and hashes prompts as the workers
    do: same ``PYTHONHASHSEED`` (``hash_seed``), block size and tokenizer folder.  When the tokenizer
    folder is not local (a hub model name without ``frontend.model_dir``), KV events stay off, and
    ``kv_aware`` is refused: its predictions would be made with the wrong tokenizer."""
    fe = dep.frontend
    argv = [*_pdkit_cli(), "frontend"]
    argv += to_flags(
        FrontendSettings,
        host=fe.host,
        port=fe.port,
        zmq_port=fe.zmq_port,
        mode=dep.mode,
        policy=fe.policy,
        disagg_min_prompt_tokens=fe.disagg_min_prompt_tokens,
        max_inflight_per_worker=fe.max_inflight_per_worker,
        prefill_timeout_s=fe.prefill_timeout_s,
        max_queued=fe.max_queued,
        queue_timeout_s=fe.queue_timeout_s,
        decode_first_byte_timeout_s=fe.decode_first_byte_timeout_s,
        seed_first_token=fe.seed_first_token,
        max_model_len=dep.max_model_len,
    )
    model_dir = fe.model_dir or dep.model_path
    if (Path(model_dir).expanduser() / "tokenizer.json").is_file():
        argv += to_flags(
            FrontendSettings,
            kv_events_port=fe.kv_events_port,
            hash_seed=dep.hash_seed,
            block_size=dep.block_size or 16,
            model_dir=model_dir,
        )
    elif fe.policy == "kv_aware":
        raise ConfigError(
            "frontend.model_dir",
            f"kv_aware routing needs the served model's tokenizer files but {model_dir} is not a local folder "
            "with tokenizer.json",
            "set frontend.model_dir to a local copy of the model folder (tokenizer.json, tokenizer_config.json)",
        )
    else:
        argv += to_flags(FrontendProcessOptions, kv_events=False)
    env = {TOKEN_ENV: TOKEN_PLACEHOLDER}  # the supervisor puts the deployment's secret here
    if fe.api_key:
        # by env, not argv (argv is visible to every local user); the value replaces the placeholder at launch
        env[API_KEY_ENV] = API_KEY_PLACEHOLDER
    return ProcessSpec(
        name="frontend",
        role="frontend",
        host=fe.host,
        argv=argv,
        env=env,
        ports={"http": fe.port, "zmq": fe.zmq_port},
        url=f"http://{fe.host}:{fe.port}",
        log_file=str(run_dir / "frontend.log"),
        startup_timeout_s=60.0,
    )


def _vllm_argv(
    dep: Deployment, role: Role, port: int, host: str, tp: int, role_kv: RoleKVConfig, ev: dict
) -> list[str]:
    group = dep.group(role)
    argv = [_python(), *VLLM_ENTRY, dep.model_path, "--host", host, "--port", str(port)]
    argv += ["--served-model-name", dep.served_name]
    load_format = dep.load_format
    if load_format is None and (is_synthetic(dep.model_path) or _local_without_weights(dep.model_path)):
        load_format = "dummy"
    if load_format:
        argv += ["--load-format", load_format]
    if dep.max_model_len:
        argv += ["--max-model-len", str(dep.max_model_len)]
    if dep.effective_gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", str(dep.effective_gpu_memory_utilization)]
    if dep.enforce_eager:
        argv.append("--enforce-eager")
    if dep.block_size:
        argv += ["--block-size", str(dep.block_size)]
    if dep.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", dep.kv_cache_dtype]
    if tp > 1:
        argv += ["--tensor-parallel-size", str(tp)]
    if role_kv.kv_transfer_config is not None:
        argv += ["--kv-transfer-config", json.dumps(role_kv.kv_transfer_config, separators=(",", ":"))]
    argv += ["--kv-events-config", json.dumps(ev, separators=(",", ":"))]
    argv += role_kv.serve_args
    argv += group.extra_args
    return argv


def _local_without_weights(model: str) -> bool:
    path = Path(model)
    return path.is_dir() and not has_weights(path)


def _sim_argv(dep: Deployment, role: Role, port: int, host: str, ev: dict) -> list[str]:
    argv = _pdkit_cli() + ["sim-worker"]
    argv += to_flags(
        SimSettings,
        role=role,
        host=host,
        port=port,
        served_model_name=dep.served_name,
        model=dep.model_path,
        block_size=dep.block_size or 16,
        hash_seed=str(dep.hash_seed),
        max_model_len=dep.max_model_len or None,
        kv_events_endpoint=ev["endpoint"],
        kv_events_replay_endpoint=ev.get("replay_endpoint") or None,
        kv_events_topic=ev["topic"],
    )
    return argv + dep.group(role).extra_args


def kv_events_config(dep: Deployment, role: Role, index: int, run_dir: Path) -> dict[str, Any]:
    """The worker's ``--kv-events-config``: its publisher *binds*, the frontend connects to it.

    KV events carry prompt token ids and steer routing, so nobody but the frontend may read or write
    them (docs/security.md).  A worker on the frontend's machine binds ``ipc://`` files in the
    deployment's 0700 socket directory (vLLM binds ``ipc://`` endpoints): only the deployment's user
    can connect.  A worker on another host binds ``tcp://*:<kv_events_port_base + index>`` (vLLM binds
    only wildcard TCP endpoints) and has no replay socket, whose port would be a second open door; that
    link is as private as the network between the hosts (see docs/security.md, multi-node).
    """
    group = dep.group(role)
    name = f"{role}-{index}"
    events: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": name}
    if is_loopback(group.host) or group.host == dep.frontend.host:
        sockets = ipc_dir(run_dir)
        events["endpoint"] = f"ipc://{sockets / name}.pub"
        events["replay_endpoint"] = f"ipc://{sockets / name}.replay"
    else:
        events["endpoint"] = f"tcp://*:{group.kv_events_port_base + index}"
    return events


def worker_kv(dep: Deployment, role: Role, index: int) -> RoleKVConfig:
    """Worker ``index`` of ``role``'s KV-transfer config, serve flags and env: the one call per worker.

    Its NIXL side channel (vLLM engines outside agg) and its ``lmcache server``'s port (mp mode) come from
    the worker's port block, so ``pdkit config show`` and the plan cannot disagree."""
    group = dep.group(role)
    uses_nixl = role != "agg" and dep.engine == "vllm"
    lmcache_ports = server_ports(dep, role, index)
    return kv_transfer_config(
        role,
        lmcache=dep.lmcache,
        nixl=dep.nixl,
        side_channel_port=group.nixl_side_channel_port_base + index if uses_nixl else None,
        side_channel_host=group.host if uses_nixl else None,
        hash_seed=dep.hash_seed,
        as_dict=True,
        vllm_version=dep.vllm_version,
        lmcache_server_port=lmcache_ports[0] if lmcache_ports else None,
    )


def worker_spec(dep: Deployment, role: Role, index: int, run_dir: Path) -> ProcessSpec:
    """The worker agent process for worker ``index`` of ``role`` (it starts the engine itself)."""
    group = dep.group(role)
    name = f"{role}-{index}"
    host = group.host
    http_port = group.http_port_base + index
    side_port = group.nixl_side_channel_port_base + index
    gpus = group.gpus[index] if index < len(group.gpus) else []
    fe = dep.frontend
    events = kv_events_config(dep, role, index, run_dir)
    uses_nixl = role != "agg" and dep.engine == "vllm"
    role_kv = worker_kv(dep, role, index)
    kv = role_kv.kv_transfer_config if dep.engine == "vllm" else None
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if dep.engine == "vllm":
        env.update(role_kv.env)
        # Each worker its own multiprocess metrics dir: shared dirs mix counters of different workers.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "prometheus" / name)
    else:
        env["PYTHONHASHSEED"] = str(dep.hash_seed)  # block hashes must match the frontend's
    env.update(group.extra_env)
    if dep.engine == "vllm":
        engine_argv = _vllm_argv(dep, role, http_port, host, group.tensor_parallel_size, role_kv, events)
    else:
        engine_argv = _sim_argv(dep, role, http_port, host, events)
    url = f"http://{host}:{http_port}"
    ports = {"http": http_port}
    if events["endpoint"].startswith("tcp://"):
        ports["kv_events"] = group.kv_events_port_base + index
    if uses_nixl:
        ports["nixl_side_channel"] = side_port
    agent_argv = _pdkit_cli() + [
        "worker",
        "--role", role,
        "--frontend", f"tcp://{fe.host}:{fe.zmq_port}",
        "--worker-id", name,
        "--url", url,
        "--served-model-name", dep.served_name,
        "--engine", dep.engine,
        "--startup-timeout-s", str(group.startup_timeout_s),
        "--kv-events-endpoint", events["endpoint"],
        "--block-size", str(dep.block_size or 16),
    ]  # fmt: skip
    if events.get("replay_endpoint"):
        agent_argv += ["--kv-events-replay-endpoint", events["replay_endpoint"]]
    if uses_nixl:
        agent_argv += ["--nixl-side-channel", f"{host}:{side_port}"]
    agent_argv += ["--", *engine_argv]
    cuda = ",".join(str(g) for g in gpus) if dep.engine == "vllm" else None
    if cuda is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda
    env[TOKEN_ENV] = TOKEN_PLACEHOLDER  # the supervisor puts the deployment's secret here
    return ProcessSpec(
        name=name, role=role, index=index, host=host, url=url, ports=ports, cuda_visible_devices=cuda,
        argv=agent_argv, engine_argv=engine_argv, env=env, kv_transfer_config=kv, kv_events_config=events,
        log_file=str(run_dir / f"{name}.log"), startup_timeout_s=group.startup_timeout_s,
    )  # fmt: skip


def build_plan(dep: Deployment) -> LaunchPlan:
    """All processes of ``dep``: frontend, then workers (decode before prefill in disagg)."""
    run_dir = (dep.run_dir or DEFAULT_RUN_DIR).resolve()
    procs = [frontend_spec(dep, run_dir)]
    for role in dep.roles():
        for i in range(dep.group(role).num_workers):
            worker = worker_spec(dep, role, i, run_dir)
            sidecar = server_spec(dep, role, i, run_dir, worker.cuda_visible_devices)
            procs += [sidecar, worker] if sidecar is not None else [worker]
    engines = [p for p in procs if p.sidecar_of is None]
    warnings = check_handshake_compat(engines) if dep.mode == "disagg" and dep.engine == "vllm" else []
    return LaunchPlan(
        secret=dep.frontend.token,
        api_key=dep.frontend.api_key,
        vllm_stack=_stack_summary(dep) if dep.engine == "vllm" else None,
        seeding=_seeding_summary(dep) if dep.mode == "disagg" else None,
        warnings=warnings,
        mode=dep.mode,
        engine=dep.engine,
        model=dep.model_path,
        served_model_name=dep.served_name,
        run_dir=str(run_dir),
        frontend_url=f"http://{dep.frontend.host}:{dep.frontend.port}",
        processes=procs,
        supervision=dep.supervision,
    )


def _stack_summary(dep: Deployment) -> dict[str, Any]:
    from pdkit.stack import installed_version, plan_stack

    stack = plan_stack(dep.vllm_version)
    source = "config" if dep.vllm_version is not None else "installed" if installed_version("vllm") else "default"
    return {"vllm": stack.vllm, "status": stack.status, "known": stack.known, "source": source}


def _seeding_summary(dep: Deployment) -> str:
    """One line for the plan: first-token seeding on or off for this deployment's decodes, and why."""
    from pdkit.stack import plan_stack, seeds_by_default

    setting = dep.frontend.seed_first_token
    if setting is not None:
        return f"{'on' if setting else 'off'} (frontend.seed_first_token: {str(setting).lower()})"
    if dep.engine != "vllm":
        return "on (the simulator serves seeded decodes)"
    version = plan_stack(dep.vllm_version).vllm
    if seeds_by_default("vllm", version):
        return f"on (proven on a GPU with vLLM {version})"
    return (f"off: not yet proven on a GPU with vLLM {version} (frontend.seed_first_token: true forces it; "
            "docs/seeding.md)")  # fmt: skip


def check_handshake_compat(procs: list[ProcessSpec]) -> list[str]:
    """Refuse a plan whose prefill and decode would fail NIXL's handshake (checked per P/D pair).

    NIXL hashes the hybrid-KV-manager setting, dtypes, attention backend, block size and layout; a
    mismatch otherwise surfaces only at the first request as «compatibility hash mismatch».
    """
    from pdkit.connectors.compat import check_nixl_compat, format_mismatches, settings_from_serve

    def settings(p: ProcessSpec) -> dict[str, Any]:
        serve_at = p.engine_argv.index("serve") + 1
        out = settings_from_serve(p.engine_argv[serve_at:], p.env)
        out.setdefault("block_size", 16)  # vLLM's default on CUDA when no --block-size is given
        return out

    warnings: list[str] = []
    prefills = [p for p in procs if p.role == "prefill"]
    decodes = [p for p in procs if p.role == "decode"]
    for p in prefills:
        for d in decodes:
            found = check_nixl_compat(settings(p), settings(d))
            warnings += [f"{p.name}/{d.name}: {m}" for m in found if m.severity != "error"]
            errors = [m for m in found if m.severity == "error"]
            if errors:
                problem = format_mismatches(errors).replace("\n", "; ")
                raise ConfigError(
                    f"{p.name}/{d.name}",
                    f"prefill and decode would fail NIXL's handshake: {problem}",
                    "use the same setting on both roles (top-level config keys, not per-role extra_args)",
                )
    return warnings


def format_plan(plan: LaunchPlan) -> str:
    """Human-readable dry-run output: one block per process."""
    lines = [
        f"pdkit plan: mode={plan.mode} engine={plan.engine} model={plan.model} served as '{plan.served_model_name}'",
        f"frontend: {plan.frontend_url}   logs: {plan.run_dir}/",
        *([f"first-token seeding: {plan.seeding}"] if plan.seeding else []),
        *[f"warning: {w}" for w in plan.warnings],
        "",
    ]
    for p in plan.processes:
        lines.append(f"[{p.name}]")
        if p.cuda_visible_devices is not None:
            lines.append(f"  CUDA_VISIBLE_DEVICES={p.cuda_visible_devices}")
        if p.role != "frontend" and p.sidecar_of is None and (after := plan.starts_after(p)):
            lines.append(f"  starts after: {', '.join(a.name for a in after)} (shared GPU)")
        lines.append("  ports: " + ", ".join(f"{k}={v}" for k, v in p.ports.items()))
        if p.sidecar_of is not None:
            lines.append(f"  serves: {p.sidecar_of} (starts before it; ready when {p.health_url} answers 200)")
        if p.kv_transfer_config is not None:
            lines.append(f"  kv-transfer-config: {json.dumps(p.kv_transfer_config)}")
        env = {k: (v if k != TOKEN_ENV else "***") for k, v in p.env.items()}
        if env:
            lines.append("  env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())))
        lines.append(f"  command: {shlex.join(p.engine_argv or p.argv)}")
        if p.engine_argv:
            lines.append(f"  agent: {shlex.join(p.argv[: p.argv.index('--')])}")
        lines.append("")
    return "\n".join(lines)
