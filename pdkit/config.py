"""Typed, validated description of a pdkit deployment.

Why pydantic models with ``extra="forbid"``: a typo in a YAML preset or a flag must be rejected before
any GPU is touched, with one line that names the field and the fix.  Settings that prefill and decode
must agree on for NIXL's compatibility hash (block size, KV-cache dtype, hybrid KV manager) live at the
top level, once, so the two roles cannot be configured apart by construction.

Loading order: built-in defaults < YAML file (``--config``) < CLI flags.  :func:`load_deployment` is
the one entry point; it returns a checked :class:`Deployment` or raises :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdkit.errors import ConfigError
from pdkit.model_files import SYNTHETIC_SERVED_NAME, default_model_dir

Role = Literal["prefill", "decode", "agg"]
Mode = Literal["agg", "disagg"]
Engine = Literal["vllm", "sim"]
Backend = Literal["local", "ray"]  # issue 20: where workers run (pdkit/backends/)
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveGB = Annotated[float, Field(gt=0)]

ROLES: tuple[Role, ...] = ("agg", "prefill", "decode")
REPO_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt key silently ignored is a deployment silently wrong.

    Every field has a docstring (pydantic's ``use_attribute_docstrings``: its description), the one place
    each setting is explained; docs/configuration.md is generated from them (``python -m pdkit.config_docs``).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FrontendConfig(_Strict):
    """The user-facing HTTP server and the ZMQ endpoints workers report to."""

    host: str = "127.0.0.1"
    """HTTP bind address; off loopback needs ``frontend.token``."""
    port: Port = 8000
    """HTTP port of the OpenAI API."""
    zmq_port: Port = 8100
    """Worker registration (ZMQ ROUTER)."""
    kv_events_port: Port = 8101
    """Unused since KV events are read from each worker's own socket (docs/security.md); kept so old configs
    load."""
    policy: Literal["round_robin", "least_loaded", "kv_aware"] = "least_loaded"
    """How a worker is picked for each request (docs/kv-routing.md for ``kv_aware``)."""
    token: str | None = None
    """Shared secret workers must present (env ``PDKIT_TOKEN``); unset: ``pdkit launch`` makes one per
    deployment."""
    disagg_min_prompt_tokens: int = Field(default=0, ge=0)
    """Shorter prompts skip prefill and go to a decode worker."""
    max_inflight_per_worker: int = Field(default=256, gt=0)
    """``--max-inflight-per-worker``: requests per worker at most; more wait in the admission queue
    (docs/frontend.md)."""
    prefill_timeout_s: float = Field(default=60.0, gt=0)
    """Prefill hop timeout before retrying elsewhere."""
    max_queued: int = Field(default=4096, ge=0)
    """``--max-queued``: the admission queue's bound (requests over ``max_inflight_per_worker`` wait, oldest
    first); past it, 503 + Retry-After."""
    queue_timeout_s: float = Field(default=600.0, gt=0)
    """``--queue-timeout-s``: the longest wait in the admission queue; past it, 503 + Retry-After."""
    decode_first_byte_timeout_s: float = Field(default=120.0, gt=0)
    """A streamed decode hop silent this long (no first byte) counts as failed (hung) and is retried
    elsewhere."""
    api_key: str | None = None
    """``--api-key`` / env ``PDKIT_API_KEY`` (vLLM's ``--api-key``): every ``/v1/*`` request needs
    ``Authorization: Bearer KEY`` (401 otherwise)."""
    seed_first_token: bool | None = None
    """``--seed-first-token`` / ``--no-seed-first-token`` (disagg): stream the prefill's first token at once
    and seed the decode with it (docs/seeding.md).  Unset: on for decode workers whose vLLM release has it
    proven on a GPU (vLLM 0.26.0 today; ``Stack.seeding_proven``) and for the simulator."""
    model_dir: str | None = None
    """KV-aware routing tokenizes prompts as the workers do: a local folder with the served model's
    ``tokenizer.json`` / ``tokenizer_config.json``; unset: the deployment's model folder (or the embedded
    one)."""


class WorkerGroupConfig(_Strict):
    """Workers of one role: ``gpus`` lists the GPU ids of each worker (a TP group per worker)."""

    count: int | None = Field(default=None, ge=0)
    """Workers of the role; unset: the number of ``gpus`` lists (sim: any number)."""
    gpus: list[list[int]] = Field(default_factory=list)
    """GPU ids per worker, one list per worker (``--prefill-gpu`` etc.)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """Must equal each worker's GPU count."""
    host: str = "127.0.0.1"
    """Address others reach the worker at (URL, NIXL side channel)."""
    http_port_base: Port
    """Worker *i* listens on base + *i*."""
    nixl_side_channel_port_base: Port
    """``VLLM_NIXL_SIDE_CHANNEL_PORT`` = base + *i*."""
    kv_events_port_base: Port
    """A worker off the frontend's host publishes KV events on base + *i* (local workers use ipc sockets in
    the run dir)."""
    extra_args: list[str] = Field(default_factory=list)
    """Appended to ``vllm serve``."""
    extra_env: dict[str, str] = Field(default_factory=dict)
    """Added to the worker's environment."""
    startup_timeout_s: float = Field(default=900.0, gt=0)
    """Readiness deadline per worker."""
    lmcache_port_base: Port | None = None
    """``lmcache.mode: mp``: worker *i*'s ``lmcache server`` takes ZMQ requests on base + *i*."""
    lmcache_http_port_base: Port | None = None
    """``lmcache.mode: mp``: worker *i*'s ``lmcache server`` answers HTTP (``/healthcheck``) on base + *i*."""

    @model_validator(mode="after")
    def _count_follows_gpus(self) -> WorkerGroupConfig:
        if self.count is None:
            self.count = len(self.gpus)
        return self

    @property
    def num_workers(self) -> int:
        return self.count or 0


class LMCacheConfig(_Strict):
    """LMCache offloading (prefill and agg workers); sizes are in GB and must be positive."""

    enabled: bool = True
    """``--no-lmcache`` turns it off (then prefill is plain NIXL)."""
    chunk_size: int = Field(default=256, gt=0)
    """Tokens per LMCache chunk."""
    cpu_gb: PositiveGB = 5.0
    """CPU cache size in GB."""
    disk_path: Path | None = None
    """Local disk tier's folder (with ``disk_gb``: both or neither)."""
    disk_gb: PositiveGB | None = None
    """Local disk tier's size in GB (with ``disk_path``: both or neither)."""
    remote_url: str | None = None
    """Remote LMCache server (``lm://host:port``)."""
    save_unfull_chunk: bool = False
    """LMCache also saves a prompt's last, partial chunk (``LMCACHE_SAVE_UNFULL_CHUNK``)."""
    mode: Literal["in_process", "mp"] | None = None
    """Issue 16.  ``in_process``: LMCache runs inside vLLM (LMCacheConnectorV1, the proven one).  ``mp``: one
    supervised ``lmcache server`` per LMCache-using worker and LMCacheMPConnector inside vLLM
    (docs/lmcache-mp.md).  Unset: ``mp`` where the stack cannot run LMCache in-process (vLLM >= 0.33), else
    ``in_process``."""
    server_python: str | None = None
    """``mp``: the Python that runs the server (e.g. a torch-2.13 venv beside a torch-2.14 vLLM); unset: this
    Python, ``-m lmcache.cli.main server``."""
    server_command: list[str] | None = None
    """``mp``: the whole server command before pdkit's own flags (instead of ``server_python``)."""
    server_args: list[str] = Field(default_factory=list)
    """``mp``: more ``lmcache server`` flags, after pdkit's (e.g. L2 tiers)."""
    server_startup_timeout_s: float = Field(default=120.0, gt=0)
    """``mp``: how long the server may take to answer ``/healthcheck`` before its worker starts."""
    verify_restores: bool = False
    """Restores are never silently wrong: fingerprints of saved blocks are checked when LMCache loads them
    back; a mismatch is reported as a load error (recomputed) and counted (connectors/lmcache_restore.py)."""


class NixlConfig(_Strict):
    """NIXL P->D transfer: pull (decode reads) or push (prefill writes), backends, extra-config keys.

    ``mode`` must be the same on both sides; it lives here, once, so it cannot differ.
    """

    mode: Literal["pull", "push"] = "pull"
    """``pull`` (decode reads) or ``push`` (prefill writes); the same on both roles."""
    backends: list[str] = Field(default_factory=lambda: ["UCX"])
    """NIXL backends."""
    extra_config: dict[str, Any] = Field(default_factory=dict)
    """More NixlConnector extra-config keys (e.g. ``kv_lease_duration``)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Env for both P and D (e.g. UCX transport settings); pdkit sets ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on``
    unless this overrides it."""
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    """Decode: recompute on a failed pull instead of failing the request."""
    verify_transfers: bool = False
    """Issue 9: prefill sends KV block fingerprints, decode (PdConnector, NIXL-only) checks them and reports
    mismatching blocks as load errors (recomputed with ``kv_load_failure_policy: recompute``)."""


class SupervisionConfig(_Strict):
    """How ``pdkit launch`` keeps processes up (``supervision:`` section).

    A crashed process is restarted with exponential backoff while it crashed fewer than ``max_restarts``
    times within the last ``restart_window_s``: the budget refills as old crashes age out, so a worker
    that crashes once an hour is never given up on, while one in a crash loop is.  A worker whose budget
    is spent stays down and the deployment serves with the rest; it stops only when a role the mode
    cannot do without is gone.  ``probe_timeout_s`` bounds each agent probe of its engine (/health,
    /metrics): a slower answer marks the worker unhealthy, so the frontend sends it nothing new.
    """

    max_restarts: int = Field(default=5, ge=0)
    """Restarts per process within ``restart_window_s``; past it the worker stays down and the rest keeps
    serving."""
    restart_window_s: float = Field(default=600.0, gt=0)
    """The window ``max_restarts`` counts crashes in."""
    restart_backoff_s: float = Field(default=2.0, ge=0)
    """The first restart's delay; it doubles with each crash in the window."""
    max_backoff_s: float = Field(default=30.0, ge=0)
    """The longest restart delay."""
    probe_timeout_s: float = Field(default=3.0, gt=0)
    """An agent's probe of its engine slower than this marks the worker unhealthy (no new requests)."""


class RayConfig(_Strict):
    """``backend: ray`` (``ray:`` section): each worker (agent + engine) in a Ray actor placed by a
    placement group; see docs/multi-node-ray.md."""

    address: str = "auto"
    """``--ray-address``: ``auto`` (the cluster ``ray start`` made on this machine, or ``RAY_ADDRESS``),
    ``HOST:6379``, ``ray://HOST:10001`` (Ray Client), or ``local``: a private one-node cluster started for
    this launch and gone with it."""
    namespace: str = "pdkit"
    """Ray namespace of the actors (``pdkit-<process>``) and placement groups (``pdkit-<role>``); one
    deployment per namespace."""
    frontend_on_cluster: bool = False
    """``--frontend-on-cluster``: run the frontend in an actor too."""
    cpus_per_worker: float = Field(default=1.0, ge=0)
    """CPUs in each worker's bundle."""
    gpus_per_worker: float | None = Field(default=None, ge=0)
    """Unset: ``tensor_parallel_size`` GPUs per worker (1/N of one with ``share_gpus``); 0 places simulated
    workers on a cluster without GPUs."""
    max_restarts: int | None = Field(default=None, ge=0)
    """Ray's restart count per actor, over its whole life (Ray has no window); unset:
    ``supervision.max_restarts``."""
    placement_timeout_s: float = Field(default=120.0, gt=0)
    """How long to wait for Ray to place a group on a busy cluster."""


# share_gpus: the part of one GPU's memory its workers split when gpu_memory_utilization is unset, and
# the most an explicit per-worker share may add up to (the rest is CUDA contexts and NCCL/NIXL buffers).
SHARED_GPU_MEMORY_BUDGET = 0.9
MAX_SHARED_GPU_MEMORY = 0.95


# Per-role defaults: distinct port ranges so the roles never collide on one host.
def _ports(http: int, side: int, events: int) -> dict[str, int]:
    return {"http_port_base": http, "nixl_side_channel_port_base": side, "kv_events_port_base": events}


ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "agg": {"gpus": [[0]], **_ports(8200, 5600, 5800)},
    "prefill": {"gpus": [[1]], **_ports(8300, 5610, 5810)},
    "decode": {"gpus": [[0]], **_ports(8400, 5620, 5820)},
}


# lmcache.mode=mp: each role's LMCache server ports (ZMQ request port, HTTP port).
for _role, (_zmq, _http) in {"agg": (5900, 6900), "prefill": (5910, 6910), "decode": (5920, 6920)}.items():
    ROLE_DEFAULTS[_role].update(lmcache_port_base=_zmq, lmcache_http_port_base=_http)


def _default_group(role: str) -> WorkerGroupConfig:
    return WorkerGroupConfig(**ROLE_DEFAULTS[role])


class Deployment(_Strict):
    """A whole deployment: frontend plus the worker groups its mode uses."""

    mode: Mode = "disagg"
    """``agg`` or ``disagg`` (set by the ``launch`` subcommand)."""
    engine: Engine = "vllm"
    """``vllm``, or ``sim`` for the simulated engine (no GPU)."""
    model: str | None = None
    """Model folder or hub name; a folder must exist and hold ``config.json``; ``engine: sim`` needs a local
    folder with ``tokenizer.json`` (it downloads nothing).  Unset: the embedded synthetic Llama-8B."""
    served_model_name: str | None = None
    """The name clients send; unset: ``synth`` for the embedded model, else ``model``."""
    load_format: str | None = None
    """vLLM ``--load-format``; unset: ``dummy`` for folders without weights, else vLLM's."""
    max_model_len: int | None = Field(default=8192, gt=0)
    """vLLM ``--max-model-len``."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """vLLM ``--gpu-memory-utilization``; unset: vLLM's (with ``share_gpus``: 0.9/N)."""
    enforce_eager: bool = False
    """vLLM ``--enforce-eager`` (faster start, slower decode)."""
    block_size: int | None = Field(default=None, gt=0)
    """KV block size, the same on every worker; unset: vLLM's (16)."""
    kv_cache_dtype: str = "auto"
    """KV-cache dtype, the same on every worker (NIXL hashes it)."""
    hash_seed: int = 0
    """``PYTHONHASHSEED`` for every worker (LMCache chunk hashes)."""
    share_gpus: bool = False
    """``--share-gpus``: allow several workers on one GPU; each gets 0.9/N of it unless
    ``gpu_memory_utilization`` is set (at most 0.95/N), and workers on one GPU start one after the other
    (vLLM's memory profile would count a neighbour's start-up)."""
    port_offset: int = Field(default=0, ge=0)
    """``--port-offset N``: added to every port of the deployment (frontend ports, each role's bases) by
    load_deployment, so deployments run side by side; no port may pass 65535.  The port fields of a loaded
    Deployment include it."""
    run_dir: Path | None = None
    """Logs (one file per process) and per-worker metrics dirs; unset: ``./pdkit-run``."""
    frontend: FrontendConfig = Field(default_factory=FrontendConfig)
    """The frontend (``frontend.*``)."""
    agg: WorkerGroupConfig = Field(default_factory=lambda: _default_group("agg"))
    """The agg workers (``mode: agg``)."""
    prefill: WorkerGroupConfig = Field(default_factory=lambda: _default_group("prefill"))
    """The prefill workers (``mode: disagg``)."""
    decode: WorkerGroupConfig = Field(default_factory=lambda: _default_group("decode"))
    """The decode workers (``mode: disagg``)."""
    lmcache: LMCacheConfig = Field(default_factory=LMCacheConfig)
    """LMCache (``lmcache.*``)."""
    nixl: NixlConfig = Field(default_factory=NixlConfig)
    """NIXL (``nixl.*``)."""
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    """Restarts and probes (``supervision.*``)."""
    vllm_version: str | None = None
    """``--vllm-version``: plan for this vLLM release (connector names, flags, env from pdkit/stack.py)
    instead of the installed one; unset: the installed vLLM."""

    @field_validator("vllm_version")
    @classmethod
    def _check_vllm_version(cls, value: str | None) -> str | None:
        """A release like ``0.32.0``; the stack table (pdkit/stack.py) decides what it means."""
        from pdkit.stack import parse_version

        if value is not None:
            parse_version(value)  # ValueError -> one validation line naming the field
        return value

    backend: Backend = "local"
    """``--backend``: ``local`` processes, or ``ray``: every worker in a Ray actor placed by a placement group
    (docs/multi-node-ray.md)."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray (``ray.*``, ``backend: ray``)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_group_defaults(cls, data: Any) -> Any:
        """A partial group (e.g. only ``gpus`` from a flag) keeps the role's default ports."""
        if isinstance(data, dict):
            for role, defaults in ROLE_DEFAULTS.items():
                if isinstance(data.get(role), dict):
                    data[role] = {**defaults, **data[role]}
        return data

    def roles(self) -> tuple[Role, ...]:
        """Worker roles this deployment runs, in start-up order (decode first: it must be up to pull)."""
        return ("agg",) if self.mode == "agg" else ("decode", "prefill")

    def group(self, role: Role) -> WorkerGroupConfig:
        return getattr(self, role)

    def workers_per_gpu(self) -> int:
        """The most workers of this deployment placed on one GPU of one host (1 without sharing)."""
        count: dict[tuple[str, int], int] = {}
        for role in self.roles():
            group = self.group(role)
            for gpus in group.gpus[: group.num_workers]:
                for gpu in gpus:
                    count[(group.host, gpu)] = count.get((group.host, gpu), 0) + 1
        return max(count.values(), default=1)

    @property
    def effective_gpu_memory_utilization(self) -> float | None:
        """What each vLLM gets: the configured share, else with ``share_gpus`` 0.9 split between the
        workers of the fullest GPU (rounded down), else vLLM's own default (None)."""
        if self.gpu_memory_utilization is not None or not self.share_gpus:
            return self.gpu_memory_utilization
        return SHARED_GPU_MEMORY_BUDGET * 100 // self.workers_per_gpu() / 100

    @property
    def model_path(self) -> str:
        return self.model or str(default_model_dir())

    @property
    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return SYNTHETIC_SERVED_NAME if self.model is None else self.model


# ---------------------------------------------------------------------------------------------------
# loading and overrides


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"'{key}' is not a section", "remove the conflicting value")
    node[keys[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a preset; a missing file, a folder or non-mapping YAML is a ConfigError, not a traceback."""
    names = preset_names()
    hint = f"give a YAML file or a preset: {', '.join(names)}" if names else "give an existing YAML file"
    if path.is_dir():
        raise ConfigError("--config", f"{path} is a directory, not a YAML file", hint)
    if not path.is_file():
        raise ConfigError("--config", f"file {path} does not exist", hint)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("--config", f"{path} is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of settings", "see configs/*.yaml")
    return data


def presets_dir() -> Path:
    """The folder of the shipped presets (``configs/*.yaml``).

    Why importlib.resources: from a wheel the presets live in the installed package ``pdkit.configs``
    (pyproject maps it to the top-level ``configs/``), from an editable install the same name resolves to
    the checkout's ``configs/``; only a bare checkout on ``sys.path`` (no install) falls back to the repo.
    """
    try:
        found = resources.files("pdkit.configs")
    except ModuleNotFoundError:
        return REPO_CONFIGS_DIR
    path = Path(str(found))
    return path if path.is_dir() else REPO_CONFIGS_DIR


def preset_names() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_config_path(config: str) -> Path:
    """A preset name (``disagg-1p1d``) or a path to a YAML file."""
    path = Path(config)
    if not path.suffix and not path.exists():
        return presets_dir() / f"{config}.yaml"
    return path


def _config_file(config: str) -> Path:
    """:func:`resolve_config_path`, with a name that is neither a file nor a preset said as such."""
    path = resolve_config_path(config)
    if path != Path(config) and not path.is_file():
        names = ", ".join(preset_names()) or "none found"
        raise ConfigError("--config", f"'{config}' is neither a file nor a preset", f"presets: {names}")
    return path


def load_deployment(
    config: str | Path | None = None, overrides: dict[str, Any] | None = None, *, check: bool = True
) -> Deployment:
    """Defaults < YAML < overrides (dotted keys, e.g. ``{"prefill.gpus": [[1]]}``); validated.

    ``check=False`` skips the whole-deployment checks (used by a lone ``pdkit worker``, which is one
    part of a deployment described elsewhere).
    """
    data: dict[str, Any] = read_yaml(_config_file(str(config))) if config is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, key, value)
    try:
        deployment = Deployment.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc) from None
    deployment = apply_port_offset(deployment)
    if check:
        validate_deployment(deployment)
    return deployment


def _port_names(section: BaseModel) -> list[str]:
    """A section's port settings, found by name so a port field added later is shifted too."""
    names = type(section).model_fields
    return [n for n in names if n.endswith(("port", "_port_base")) and isinstance(getattr(section, n), int)]


def port_fields(dep: Deployment) -> list[tuple[str, int]]:
    """Every port setting of ``dep`` as ``(config key, value)``: the frontend's ports, each role's bases."""
    sections: list[tuple[str, BaseModel]] = [("frontend", dep.frontend), *((r, dep.group(r)) for r in ROLES)]
    return [(f"{name}.{field}", getattr(sec, field)) for name, sec in sections for field in _port_names(sec)]


def apply_port_offset(dep: Deployment) -> Deployment:
    """``dep`` with ``port_offset`` added to every port; a port pushed past 65535 is a ConfigError.

    The highest port of a role is its base + (workers - 1), so that is what is checked for bases.
    """
    offset = dep.port_offset
    if not offset:
        return dep
    update: dict[str, BaseModel] = {}
    for name, section in [("frontend", dep.frontend), *((r, dep.group(r)) for r in ROLES)]:
        last_index = max(section.num_workers - 1, 0) if isinstance(section, WorkerGroupConfig) else 0
        shifted = {}
        for field in _port_names(section):
            value = getattr(section, field)
            top = value + offset + (last_index if field.endswith("_base") else 0)
            if top > 65535:
                problem = f"{name}.{field} {value} + port_offset {offset} reaches port {top} (> 65535)"
                raise ConfigError("port_offset", problem, "use a smaller offset")
            shifted[field] = value + offset
        update[name] = section.model_copy(update=shifted)
    return dep.model_copy(update=update)


_FIX_BY_TYPE = {
    "extra_forbidden": "remove it or check its spelling against docs/configuration.md",
    "missing": "add it",
    "greater_than": "use a positive value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "literal_error": "use one of the allowed values",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "float_parsing": "use a number",
    "list_type": "use a list",
    "dict_type": "use a mapping",
    "string_type": "use a string",
}


def _one_line(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].lower()
    if "input" in err and err["type"] != "extra_forbidden" and not isinstance(err["input"], dict):
        problem += f" (got {err['input']!r})"
    return ConfigError(field, problem, _FIX_BY_TYPE.get(err["type"], "fix the value"))


# ---------------------------------------------------------------------------------------------------
# cross-field checks


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (the frontend's registry needs no token there)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).exists()


def validate_deployment(dep: Deployment) -> None:
    """Everything pydantic cannot see field by field: GPUs, ports, TP, model path, roles."""
    if dep.engine == "sim":
        _check_sim_model(dep)
    elif dep.model is not None and _looks_like_path(dep.model):
        path = Path(dep.model).expanduser()
        if not path.is_dir():
            raise ConfigError("model", f"path {dep.model} does not exist", "pass an existing folder or a hub name")
        if not (path / "config.json").is_file():
            raise ConfigError("model", f"{dep.model} has no config.json", "point --model at a Hugging Face folder")
    if dep.lmcache.disk_path is not None and dep.lmcache.disk_gb is None:
        raise ConfigError("lmcache.disk_gb", "a disk path is set but no disk size", "set lmcache.disk_gb (GB, > 0)")
    if not is_loopback(dep.frontend.host) and not dep.frontend.token:
        raise ConfigError(
            "frontend.token",
            f"the frontend binds {dep.frontend.host} (off loopback) without a shared token",
            "set frontend.token (or PDKIT_TOKEN) so only your workers can register",
        )
    for role in dep.roles():
        _check_group(dep, role)
    _check_gpus(dep)
    _check_ports(dep)


def _check_sim_model(dep: Deployment) -> None:
    """The simulated engine tokenizes with the model folder's tokenizer.json (pdkit.sim.text) and never
    downloads: a hub name is refused here, not as a traceback once the workers start."""
    if dep.model is None:
        return  # the embedded synthetic model ships its tokenizer
    path = Path(dep.model).expanduser()
    fix = "give --engine sim a local model folder with tokenizer.json (or leave --model out: embedded model)"
    if not path.is_dir():
        what = "does not exist" if _looks_like_path(dep.model) else "is not a local folder (the sim downloads nothing)"
        raise ConfigError("model", f"{dep.model} {what}", fix)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError("model", f"{dep.model} has no tokenizer.json, which the simulated engine needs", fix)


def _check_group(dep: Deployment, role: Role) -> None:
    group = dep.group(role)
    if group.num_workers < 1:
        raise ConfigError(f"{role}.count", f"{dep.mode} mode needs at least one {role} worker", f"give --{role}-gpu")
    if dep.engine == "sim":
        return  # the simulator needs no GPU
    if len(group.gpus) != group.num_workers:
        raise ConfigError(
            f"{role}.gpus",
            f"count is {group.num_workers} but {len(group.gpus)} GPU groups are listed",
            f"list one GPU group per {role} worker (or drop count)",
        )
    for i, gpus in enumerate(group.gpus):
        if len(gpus) != group.tensor_parallel_size:
            raise ConfigError(
                f"{role}.gpus[{i}]",
                f"{len(gpus)} GPU(s) {gpus} for tensor_parallel_size {group.tensor_parallel_size}",
                f"give each {role} worker exactly tensor_parallel_size GPUs",
            )
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"{role}.gpus[{i}]", f"GPU listed twice in {gpus}", "list each GPU once")


def _check_gpus(dep: Deployment) -> None:
    if dep.engine == "sim":
        return
    if dep.share_gpus:
        # Several vLLM instances on one GPU (development, small models): each may take only its share.
        n = dep.workers_per_gpu()
        util = dep.gpu_memory_utilization
        if util is not None and util * n > MAX_SHARED_GPU_MEMORY:
            raise ConfigError(
                "gpu_memory_utilization",
                f"{n} workers share one GPU and each may take {util:.0%} of it ({util * n:.0%} in all)",
                f"set gpu_memory_utilization to at most {MAX_SHARED_GPU_MEMORY * 100 // n / 100}, or leave it "
                f"unset (share_gpus then gives each {SHARED_GPU_MEMORY_BUDGET * 100 // n / 100})",
            )
        return
    owner: dict[tuple[str, int], str] = {}
    for role in dep.roles():
        group = dep.group(role)
        for i, gpus in enumerate(group.gpus):
            for gpu in gpus:
                key = (group.host, gpu)
                me = f"{role}[{i}]"
                if key in owner:
                    raise ConfigError(
                        f"{role}.gpus",
                        f"GPU {gpu} is used by both {owner[key]} and {me}",
                        "give every worker its own GPUs (e.g. --prefill-gpu 1 --decode-gpu 0), or put "
                        "them on one GPU on purpose with --share-gpus (share_gpus: true; development)",
                    )
                owner[key] = me


def _check_ports(dep: Deployment) -> None:
    used: list[tuple[str, int, str]] = []
    fe = dep.frontend
    used += [(fe.host, fe.port, "frontend.port"), (fe.host, fe.zmq_port, "frontend.zmq_port")]
    used += [(fe.host, fe.kv_events_port, "frontend.kv_events_port")]
    for role in dep.roles():
        group = dep.group(role)
        for i in range(group.num_workers):
            used.append((group.host, group.http_port_base + i, f"{role}[{i}] HTTP port (http_port_base)"))
            used.append((group.host, group.kv_events_port_base + i, f"{role}[{i}] KV-events replay port"))
            if role != "agg" and dep.engine == "vllm":
                side = group.nixl_side_channel_port_base + i
                used.append((group.host, side, f"{role}[{i}] NIXL side-channel port"))
            used += _lmcache_server_ports(dep, role, i)
    counts = Counter((_norm_host(h), p) for h, p, _ in used)
    for host, port, what in used:
        if counts[(_norm_host(host), port)] > 1:
            others = [w for h, p, w in used if (_norm_host(h), p) == (_norm_host(host), port) and w != what]
            raise ConfigError(
                what, f"port {port} is also used by {others[0]}", "move one of them to a free port (change its base)"
            )
    for _host, port, what in used:
        if port > 65535:
            raise ConfigError(what, f"port {port} is out of range", "lower the port base")


def _lmcache_server_ports(dep: Deployment, role: Role, index: int) -> list[tuple[str, int, str]]:
    """Worker ``index``'s LMCache server ports, when it runs one (lmcache.mode=mp)."""
    from pdkit.lmcache_server import server_ports

    ports = server_ports(dep, role, index)
    if ports is None:
        return []
    host = dep.group(role).host
    return [
        (host, ports[0], f"{role}[{index}] LMCache server port (lmcache_port_base)"),
        (host, ports[1], f"{role}[{index}] LMCache server HTTP port (lmcache_http_port_base)"),
    ]


def _norm_host(host: str) -> str:
    return "loopback" if is_loopback(host) or host in ("0.0.0.0", "*", "::") else host
