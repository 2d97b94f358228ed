"""The per-role vLLM KV-connector configuration: the one place it is built.

What is encoded here was proven with vLLM 0.26.0 + nixl 1.5.1 + lmcache 0.5.2 on 2xH200:

* prefill = PdConnector (LMCache offload/reuse + NIXL as ``kv_producer``);
* decode  = NixlConnector as ``kv_consumer``, plus ``--disable-hybrid-kv-cache-manager`` whenever the
  prefill side runs LMCache -- LMCache turns the hybrid KV-cache manager off on prefill and NIXL's
  compatibility hash covers it, so without the flag every transfer fails with «NIXL compatibility
  hash mismatch».  pdkit passes the flag on *both* sides so agreement does not depend on LMCache's
  internals;
* agg     = LMCacheConnectorV1 (``kv_both``);
* every vLLM instance on a host gets its own ``VLLM_NIXL_SIDE_CHANNEL_PORT``;
* NIXL workers get ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on`` (:data:`NIXL_UCX_ENV`): UCX's ``cuda_ipc`` turns
  GET (NIXL READ, what the default pull mode does) off where it finds no NVLink -- two workers on one
  GPU, PCIe-only hosts -- and the READ then falls back to TCP.  Measured on one H200 (two processes,
  scripts/nixl_probe.py): 0.55 GB/s -> 7 GB/s at 64 KiB descriptors, 0.57 -> 52 GB/s at 512 KiB; an
  8k-token prompt's P->D hop 2.15 s -> 0.14 s in vLLM.  Between NVLinked GPUs UCX already enables GET,
  so it changes nothing there.  ``nixl.env`` overrides it;
* LMCache settings travel as ``LMCACHE_*`` env, with usage tracking off (it phones home by default)
  and one ``PYTHONHASHSEED`` for every worker (LMCache's chunk hashes use Python's ``hash``).

Why ``kv_both`` is never used for P/D: NIXL deprecates it and the role decides which side frees
blocks.  Decode uses ``kv_load_failure_policy="recompute"`` so a failed pull costs a local prefill,
not a failed request.

LMCache's multi-process mode (``lmcache.mode: mp``, issue 16; docs/lmcache-mp.md): LMCache runs as an
``lmcache server`` of its own per worker (pdkit/lmcache_server.py starts it) and vLLM talks to it through
``LMCacheMPConnector`` (``lmcache.mp.host`` / ``lmcache.mp.port``): agg gets it directly, prefill gets it
as PdConnector's LMCache child; its settings travel as the server's flags, so vLLM gets no ``LMCACHE_*``
env.  The mode defaults to ``mp`` only where the stack cannot run LMCache in-process (vLLM >= 0.33).

Which vLLM release the names and flags are for comes from ``pdkit/stack.py`` (``vllm_version``: the
configured one, else the installed one, else the newest proven stack); nothing here compares versions.

Importable without vllm: ``kv_transfer_config`` returns a plain dict when vllm is absent, and the
``vllm.config.KVTransferConfig`` built from that same dict when it is present.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

from pdkit.config import LMCacheConfig, NixlConfig, Role
from pdkit.stack import STACKS, Stack, plan_stack

PD_CONNECTOR = "PdConnector"
PD_CONNECTOR_MODULE = "pdkit.connectors.pd_connector"
DISABLE_HMA_FLAG = "--disable-hybrid-kv-cache-manager"
# Every NIXL worker's environment (before nixl.env, which wins): see the module docstring.  Later NIXL
# releases enable cuda_ipc GET themselves (ai-dynamo/nixl#2208); nixl 1.5.1 does not.
NIXL_UCX_ENV = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "on"}


class RoleKVConfig(NamedTuple):
    """What one role needs: the KV-transfer config, extra ``vllm serve`` flags, extra env."""

    kv_transfer_config: Any  # vllm.config.KVTransferConfig, or the equal dict without vllm
    serve_args: list[str]
    env: dict[str, str]


MP_HOST = "tcp://127.0.0.1"
MP_HEARTBEAT_INTERVAL_S = 2.0
MP_MQ_TIMEOUT_S = 30.0


def lmcache_mode(lmcache: LMCacheConfig, stack: Stack | None = None) -> str:
    """``in_process`` or ``mp``: the configured one, else what ``stack`` can run (``in_process`` first)."""
    if lmcache.mode is not None:
        return lmcache.mode
    return (stack or plan_stack()).default_lmcache_mode()


def lmcache_mp_extra(lmcache: LMCacheConfig, server_port: int) -> dict[str, Any]:
    """LMCacheMPConnector's extra config: where its server is, plus the chunking pdkit's tier events need."""
    return {
        "lmcache.mp.host": MP_HOST,
        "lmcache.mp.port": server_port,
        # The worker re-registers its KV cache with a restarted server only once a heartbeat has seen
        # it unhealthy; with the default 10 s interval (== the ping timeout) a fast restart can go
        # unseen and LMCache stays silently off. A lookup lost with the old server waits mq_timeout
        # (default 300 s) before the request goes on without LMCache.
        "lmcache.mp.heartbeat_interval": MP_HEARTBEAT_INTERVAL_S,
        "lmcache.mp.mq_timeout": MP_MQ_TIMEOUT_S,
        # Read by PdConnector's tier announcer (connectors/lmcache_tiers.py), not by the MP connector;
        # the server gets the same chunk size as a flag. It stores whole chunks only, so the tier
        # events must not announce a partial tail chunk.
        "lmcache.chunk_size": lmcache.chunk_size,
        "lmcache.save_unfull_chunk": False,
    }


def lmcache_env(lmcache: LMCacheConfig, hash_seed: int = 0) -> dict[str, str]:
    """LMCache's settings as ``LMCACHE_*`` variables (its documented override layer)."""
    env = {
        "LMCACHE_CHUNK_SIZE": str(lmcache.chunk_size),
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": _gb(lmcache.cpu_gb),
        "LMCACHE_SAVE_UNFULL_CHUNK": str(lmcache.save_unfull_chunk),
        "LMCACHE_TRACK_USAGE": "false",
        # Stored chunks become KV events (medium CPU/DISK) that PdConnector forwards to the router.
        "LMCACHE_ENABLE_KV_EVENTS": "True",
        "DO_NOT_TRACK": "1",
        "PYTHONHASHSEED": str(hash_seed),
    }
    if lmcache.disk_path is not None:
        env["LMCACHE_LOCAL_DISK"] = f"file://{lmcache.disk_path}"
        env["LMCACHE_MAX_LOCAL_DISK_SIZE"] = _gb(lmcache.disk_gb or 0.0)
    if lmcache.remote_url:
        env["LMCACHE_REMOTE_URL"] = lmcache.remote_url
    return env


def _gb(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def nixl_connector_name(nixl: NixlConfig, stack: Stack | None = None) -> str:
    """The registry name of the NIXL connector for the chosen transfer direction on ``stack``'s vLLM."""
    stack = stack or plan_stack()
    return stack.nixl_push_connector if nixl.mode == "push" else stack.nixl_pull_connector


def nixl_mode_of(engine_argv: list[str]) -> Literal["pull", "push"] | None:
    """The NIXL direction of ``vllm serve ENGINE_ARGV``, read back from its ``--kv-transfer-config``.

    Why: the agent reports it at registration (``WorkerInfo.nixl_mode``), because vLLM 0.26's prefill
    answers do not name it and first-token seeding has a push-only rule.  The connector name is matched
    against every release's names in the version table (a standalone worker may run another release than
    the frontend's host); PdConnector names its NIXL child in ``nixl_connector``.  None: no NIXL connector,
    or a config this cannot read (the frontend then assumes pull, as before this field existed).
    """
    raw = None
    for i, arg in enumerate(engine_argv):
        if arg == "--kv-transfer-config" and i + 1 < len(engine_argv):
            raw = engine_argv[i + 1]
        elif arg.startswith("--kv-transfer-config="):
            raw = arg.split("=", 1)[1]
    try:
        config = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    extra = config.get("kv_connector_extra_config")
    names = [config.get("kv_connector"), extra.get("nixl_connector") if isinstance(extra, dict) else None]
    for name in names:
        if name in {s.nixl_push_connector for s in STACKS.values()}:
            return "push"
        if name in {s.nixl_pull_connector for s in STACKS.values()}:
            return "pull"
    return None


def kv_transfer_dict(
    role: Role,
    lmcache: LMCacheConfig | None = None,
    nixl: NixlConfig | None = None,
    vllm_version: str | None = None,
    lmcache_server_port: int | None = None,
) -> dict[str, Any] | None:
    """The KVTransferConfig fields for ``role`` as a plain dict (``None``: agg without LMCache).

    ``lmcache_server_port``: the ZMQ port of this worker's ``lmcache server`` (mp mode; default 5555,
    LMCache's own default).
    """
    lmcache = lmcache or LMCacheConfig()
    nixl = nixl or NixlConfig()
    stack = plan_stack(vllm_version)
    nixl_extra: dict[str, Any] = {"backends": list(nixl.backends), **nixl.extra_config}
    nixl_connector = nixl_connector_name(nixl, stack)
    mp = lmcache.enabled and lmcache_mode(lmcache, stack) == "mp"
    lmcache_extra: dict[str, Any] = lmcache_mp_extra(lmcache, lmcache_server_port or 5555) if mp else {}
    lmcache_connector = stack.lmcache_mp_connector if mp else stack.lmcache_connector
    if role == "agg":
        if not lmcache.enabled:
            return None
        if lmcache.verify_restores:
            # PdConnector with its LMCache child only: it checks what LMCache restores (restore check).
            return {
                "kv_connector": PD_CONNECTOR,
                "kv_connector_module_path": PD_CONNECTOR_MODULE,
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "lmcache": lmcache_extra,
                    "nixl": None,
                    "lmcache_connector": lmcache_connector,
                    "verify_restores": True,
                },
            }
        if mp:
            # A retrieve dropped while the server restarts is recomputed, not a failed request.
            return {
                "kv_connector": lmcache_connector,
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": lmcache_extra,
            }
        return {"kv_connector": stack.lmcache_connector, "kv_role": "kv_both"}
    if role == "prefill":
        if not lmcache.enabled and not nixl.verify_transfers:
            return {"kv_connector": nixl_connector, "kv_role": "kv_producer", "kv_connector_extra_config": nixl_extra}
        fields: dict[str, Any] = {
            "kv_connector": PD_CONNECTOR,
            "kv_connector_module_path": PD_CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {
                "lmcache": lmcache_extra if lmcache.enabled else None,
                "nixl": nixl_extra,
                "nixl_connector": nixl_connector,
                "lmcache_connector": lmcache_connector,
                "verify_transfers": nixl.verify_transfers,
            },
        }
        if lmcache.enabled and lmcache.verify_restores:
            fields["kv_connector_extra_config"]["verify_restores"] = True
            fields["kv_load_failure_policy"] = "recompute"
        return fields
    if role == "decode":
        if nixl.verify_transfers:
            # PdConnector in NIXL-only mode: it wraps NIXL to check what NIXL delivered.
            return {
                "kv_connector": PD_CONNECTOR,
                "kv_connector_module_path": PD_CONNECTOR_MODULE,
                "kv_role": "kv_consumer",
                "kv_load_failure_policy": nixl.kv_load_failure_policy,
                "kv_connector_extra_config": {
                    "lmcache": None,
                    "nixl": nixl_extra,
                    "nixl_connector": nixl_connector,
                    "verify_transfers": True,
                },
            }
        return {
            "kv_connector": nixl_connector,
            "kv_role": "kv_consumer",
            "kv_load_failure_policy": nixl.kv_load_failure_policy,
            "kv_connector_extra_config": nixl_extra,
        }
    raise ValueError(f"role must be one of prefill, decode, agg (got {role!r})")


def kv_transfer_config(
    role: Role,
    *,
    lmcache: LMCacheConfig | None = None,
    nixl: NixlConfig | None = None,
    side_channel_port: int | None = None,
    side_channel_host: str | None = None,
    hash_seed: int = 0,
    as_dict: bool = False,
    vllm_version: str | None = None,
    lmcache_server_port: int | None = None,
) -> RoleKVConfig:
    """The right KV-connector configuration for one vLLM instance of ``role``.

    Usable without the pdkit CLI::

        from pdkit import kv_transfer_config
        ktc, args, env = kv_transfer_config("prefill", side_channel_port=5610)
        # vllm serve MODEL --kv-transfer-config "$(ktc.to_json())" *args   with env

    ``side_channel_port`` must differ for every vLLM instance on one host (NIXL's handshake listener).
    Returns ``vllm.config.KVTransferConfig`` when vllm imports (and ``as_dict`` is false), else a dict
    with the same fields.  ``vllm_version`` picks the stack (``pdkit/stack.py``); ``None``: the installed
    vLLM, else the newest proven stack.
    """
    lmcache = lmcache or LMCacheConfig()
    nixl = nixl or NixlConfig()
    stack = plan_stack(vllm_version)
    fields = kv_transfer_dict(role, lmcache, nixl, vllm_version=stack.vllm, lmcache_server_port=lmcache_server_port)
    serve_args: list[str] = list(stack.serve_args)
    env: dict[str, str] = {"PYTHONHASHSEED": str(hash_seed), **stack.env}
    mp = lmcache.enabled and lmcache_mode(lmcache, stack) == "mp"
    if role in ("prefill", "agg") and lmcache.enabled and not mp:
        env.update(lmcache_env(lmcache, hash_seed))
    if role == "agg" and mp:
        # LMCacheMPConnector refuses the hybrid KV-cache manager («only works without hybrid kv cache manager»).
        serve_args.append(DISABLE_HMA_FLAG)
    if role in ("prefill", "decode"):
        # Both sides state it: the NIXL handshake hashes the HMA setting (see module docstring), and vLLM
        # turns HMA off by itself for PdConnector but not for plain NIXL.
        if lmcache.enabled or nixl.verify_transfers:
            serve_args.append(DISABLE_HMA_FLAG)
        env.update(NIXL_UCX_ENV)
        env.update(nixl.env)
        if side_channel_port is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)
        if side_channel_host is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = side_channel_host
    config: Any = fields if (as_dict or fields is None) else _to_vllm(fields)
    return RoleKVConfig(config, serve_args, env)


def _to_vllm(fields: dict[str, Any]) -> Any:
    """``vllm.config.KVTransferConfig(**fields)`` when vllm imports, else the dict unchanged."""
    try:
        from vllm.config import KVTransferConfig
    except ImportError:
        return fields
    return KVTransferConfig(**fields)
