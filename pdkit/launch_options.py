"""The options ``pdkit launch agg`` and ``pdkit launch disagg`` share, declared once, and the config keys they set.

Why one dataclass: both commands take the same ~30 options (model, frontend, LMCache, Ray, dry run...);
written as two parameter lists they drifted apart one flag at a time.  :func:`pdkit.flags.takes_settings`
turns :class:`LaunchOptions` into the commands' typer options; :meth:`LaunchOptions.overrides` turns the
given ones into :func:`pdkit.config.load_deployment` overrides (flags > YAML > defaults).  Each role's
GPU and worker-count flags stay on their command (:func:`gpu_groups`, :func:`group_overrides`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pdkit.config import Role
from pdkit.errors import ConfigError
from pdkit.flags import Flag

CONFIG = Flag("--config", "YAML file or preset name from configs/.")
MODEL = Flag("--model", "Model folder or hub name (default: embedded synthetic Llama).")
SERVED_NAME = Flag("--served-model-name", "Name clients use.")
NO_LMCACHE = Flag("--no-lmcache", "Run without LMCache offloading.")
TP = Flag("--tp", "Tensor-parallel size of every worker.")

# The same flags for the commands that take them one by one (config show, doctor, worker).
ConfigOpt = Annotated[str | None, CONFIG.option()]
ModelOpt = Annotated[str | None, MODEL.option()]
NameOpt = Annotated[str | None, SERVED_NAME.option()]
NoLmcOpt = Annotated[bool, NO_LMCACHE.option()]
TpOpt = Annotated[int | None, TP]

# Option -> the deployment config key it sets (unset options set nothing).
CONFIG_KEYS = {
    "model": "model",
    "served_model_name": "served_model_name",
    "engine": "engine",
    "port": "frontend.port",
    "host": "frontend.host",
    "policy": "frontend.policy",
    "run_dir": "run_dir",
    "enforce_eager": "enforce_eager",
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "block_size": "block_size",
    "max_inflight_per_worker": "frontend.max_inflight_per_worker",
    "max_queued": "frontend.max_queued",
    "queue_timeout_s": "frontend.queue_timeout_s",
    "api_key": "frontend.api_key",
    "seed_first_token": "frontend.seed_first_token",
    "port_offset": "port_offset",
    "backend": "backend",
    "ray_address": "ray.address",
}


@dataclass
class LaunchOptions:
    """What both ``launch`` commands accept besides their roles' GPUs and worker counts."""

    config: Annotated[str | None, CONFIG] = None
    model: Annotated[str | None, MODEL] = None
    served_model_name: Annotated[str | None, SERVED_NAME] = None
    engine: Annotated[str | None, Flag("--engine", "vllm (GPU) or sim (simulated engine, CPU).")] = None
    port: Annotated[int | None, Flag("--port", "Frontend HTTP port (default 8000).")] = None
    host: Annotated[str | None, Flag("--host", "Frontend bind address (default 127.0.0.1).")] = None
    policy: Annotated[str | None, Flag("--policy", "round_robin | least_loaded | kv_aware.")] = None
    run_dir: Annotated[Path | None, Flag("--run-dir", "Logs and per-worker state (default ./pdkit-run).")] = None
    enforce_eager: Annotated[bool | None, Flag("--enforce-eager/--cuda-graphs", "vLLM --enforce-eager.")] = None
    max_model_len: Annotated[int | None, Flag("--max-model-len", "vLLM --max-model-len.")] = None
    gpu_memory_utilization: Annotated[float | None, Flag("--gpu-memory-utilization", "vLLM GPU memory share.")] = None
    block_size: Annotated[int | None, Flag("--block-size", "KV block size (same on every worker).")] = None
    no_lmcache: Annotated[bool, NO_LMCACHE] = False
    max_inflight_per_worker: Annotated[
        int | None,
        Flag("--max-inflight-per-worker", "Frontend: requests per worker at most; more wait in its queue."),
    ] = None
    max_queued: Annotated[
        int | None, Flag("--max-queued", "Frontend: requests that may wait for a slot; more get 503.")
    ] = None
    queue_timeout_s: Annotated[
        float | None, Flag("--queue-timeout-s", "Frontend: longest wait for a worker slot before 503.")
    ] = None
    api_key: Annotated[
        str | None,
        Flag("--api-key", "Frontend: require Authorization: Bearer KEY on /v1/*.", envvar="PDKIT_API_KEY"),
    ] = None
    seed_first_token: Annotated[
        bool | None,
        Flag(
            "--seed-first-token/--no-seed-first-token",
            "Frontend (disagg): stream the prefill's first token at once and seed the decode with it "
            "(config: frontend.seed_first_token; default: where the decode's vLLM has it proven, docs/seeding.md).",
        ),
    ] = None
    share_gpus: Annotated[
        bool,
        Flag(
            "--share-gpus",
            "Let workers share GPUs (development, one-GPU machines): each gets 0.9/N of a GPU unless "
            "--gpu-memory-utilization says otherwise; without GPU flags or --config every worker goes on GPU 0.",
        ),
    ] = False
    port_offset: Annotated[
        int | None,
        Flag(
            "--port-offset",
            "Add N to every port of the deployment (frontend, ZMQ, KV events, every worker's bases) "
            "to run a second deployment beside the first, e.g. 1000 (config: port_offset).",
        ),
    ] = None
    # issue 20: workers as Ray actors (pdkit/backends/, docs/multi-node-ray.md)
    backend: Annotated[str | None, Flag("--backend", "local (processes here) or ray (workers as Ray actors).")] = None
    ray_address: Annotated[
        str | None, Flag("--ray-address", "With --backend ray: auto, HOST:6379 or ray://HOST:10001.")
    ] = None
    frontend_on_cluster: Annotated[
        bool, Flag("--frontend-on-cluster", "With --backend ray: run the frontend in a Ray actor too.")
    ] = False
    dry_run: Annotated[bool, Flag("--dry-run", "Print the plan; start nothing.")] = False
    json_: Annotated[bool, Flag("--json", "With --dry-run: print the plan as JSON.")] = False
    smoke_test: Annotated[
        bool, Flag("--smoke-test", "Start, serve one chat completion through the frontend, stop.")
    ] = False
    vllm_version: Annotated[
        str | None, Flag("--vllm-version", "Plan for this vLLM release (default: the installed one).")
    ] = None
    allow_untested_stack: Annotated[
        bool, Flag("--allow-untested-stack", "Start even if pdkit doctor refuses this machine's stack.")
    ] = False

    def overrides(self) -> dict[str, Any]:
        """The config overrides these options make (``None``: not given, the YAML or default stands)."""
        out: dict[str, Any] = {}
        for name, key in CONFIG_KEYS.items():
            value = getattr(self, name)
            out[key] = str(value) if isinstance(value, Path) else value
        if self.no_lmcache:
            out["lmcache.enabled"] = False
        if self.share_gpus:
            out["share_gpus"] = True
        if self.frontend_on_cluster:
            out["ray.frontend_on_cluster"] = True
        if self.vllm_version:
            out["vllm_version"] = self.vllm_version
        return out


def gpu_groups(flag: str, values: list[str] | None, tp: int) -> list[list[int]] | None:
    """``["1"]`` or ``["0,1", "2"]`` -> GPU ids split into groups of ``tp`` (one group per worker)."""
    if not values:
        return None
    ids: list[int] = []
    for value in values:
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            if not part.isdigit():
                raise ConfigError(flag, f"'{part}' is not a GPU id", "give GPU ids as integers, e.g. 0,1")
            ids.append(int(part))
    if len(ids) % tp:
        raise ConfigError(flag, f"{len(ids)} GPU(s) do not split into TP groups of {tp}", f"give a multiple of {tp}")
    return [ids[i : i + tp] for i in range(0, len(ids), tp)]


def group_overrides(role: Role, gpus: list[list[int]] | None, tp: int | None, count: int | None) -> dict[str, Any]:
    """The overrides of one role's GPU groups, TP size and worker count (a count alone: GPUs 0..count-1)."""
    out: dict[str, Any] = {}
    if gpus is not None:
        out[f"{role}.gpus"] = gpus
        out[f"{role}.count"] = len(gpus)
    if tp is not None:
        out[f"{role}.tensor_parallel_size"] = tp
    if count is not None:
        out[f"{role}.count"] = count
        if gpus is None:
            out[f"{role}.gpus"] = [[i] for i in range(count)]
    return out
