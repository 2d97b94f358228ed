"""How PdConnector's two children are named, configured and resolved (shared by the class and its classmethods).

PdConnector's own ``kv_connector_extra_config`` (the contract produced by ``pdkit/kv_config.py``)::

    {
      "lmcache": {"lmcache.<field>": ...} | {} | null,   # null or absent: no LMCache child (NIXL only)
      "nixl": {"backends": ["UCX"], ...} | null,          # NixlConnector's own keys; null: no NIXL child (agg)
      "verify_transfers": false,                          # issue 9 (transfer fingerprints, pd_verify.py)
      "verify_restores": false,                           # issue 16 (LMCache restore check, lmcache_restore.py)
      "lmcache_events": "vllm" | "raw" | "both" | "off",  # LMCache tiers as KV events (lmcache_tiers.py)
      # optional, rarely needed: which class each child is
      "lmcache_connector": "LMCacheConnectorV1" | "LMCacheMPConnector" | {"kv_connector": ..., ...},
      "nixl_connector": "NixlConnector" | "NixlPushConnector" | {"kv_connector": ..., ...}
    }

Each child gets its own ``KVTransferConfig`` (like vLLM's MultiConnector builds them) whose
``kv_connector_extra_config`` is exactly its sub-dict, so LMCache sees its ``lmcache.*`` keys and NIXL its
own keys, never each other's.  Both children share the parent's ``engine_id``: NIXL publishes it in
``kv_transfer_params`` and in its handshake, and two ids in one engine break the decode side's lookup.

Why the LMCache child always runs as ``kv_both``: LMCache's ``kv_producer``/``kv_consumer`` roles switch
on *its own* P/D mode (a producer skips lookups and expects a disaggregation spec when saving; a
consumer never stores).  PdConnector uses LMCache only as a local offload tier, which is ``kv_both``.
The NIXL child keeps the parent's role (producer on prefill, consumer on decode): it decides who frees.

The ``*_connector`` overrides pick another class for a child: ``LMCacheConnectorV1Dynamic`` for LMCache
builds that dropped ``vllm_v1_adapter``, ``NixlPushConnector`` for push mode, or a test's fake (the
documented seam the CPU tests use, because the real children need a GPU and native libraries).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

NIXL = "nixl"
LMCACHE = "lmcache"
# Iteration order matters: NIXL is asked first (see PdScheduler.get_num_new_matched_tokens).
CHILD_ORDER = (NIXL, LMCACHE)
DEFAULT_CLASSES = {NIXL: "NixlConnector", LMCACHE: "LMCacheConnectorV1"}
LMCACHE_ROLE = "kv_both"


def call_hook(child: Any, hook: str) -> Any:
    """Call a no-argument hook vLLM 0.32 added to the base class; None on 0.26, where the child has no such method."""
    method = getattr(child, hook, None)
    return method() if method is not None else None


def child_extra(extra: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The sub-dict for child ``name``; ``None`` when the child is switched off (only LMCache may be)."""
    if name == NIXL:
        if NIXL in extra and extra[NIXL] is None:  # an explicit null: LMCache only (agg restore check)
            return None
        sub = extra.get(NIXL)
        return dict(sub) if sub else {}
    if LMCACHE not in extra or extra[LMCACHE] is None:
        return None
    return dict(extra[LMCACHE])


def child_class_spec(extra: dict[str, Any], name: str) -> tuple[str, str | None]:
    """(kv_connector, kv_connector_module_path) of child ``name``.

    The override is a registered class name (``"NixlPushConnector"``, what ``pdkit/kv_config.py`` writes
    for push mode) or a dict with ``kv_connector`` and optionally ``kv_connector_module_path``.
    """
    override = extra.get(f"{name}_connector") or {}
    if isinstance(override, str):
        return override, None
    return override.get("kv_connector", DEFAULT_CLASSES[name]), override.get("kv_connector_module_path")


def child_transfer_configs(parent: KVTransferConfig) -> dict[str, KVTransferConfig]:
    """One KVTransferConfig per enabled child, in ``CHILD_ORDER``."""
    extra = parent.kv_connector_extra_config or {}
    out: dict[str, KVTransferConfig] = {}
    for name in CHILD_ORDER:
        sub = child_extra(extra, name)
        if sub is None:
            continue
        connector, module_path = child_class_spec(extra, name)
        out[name] = dataclasses.replace(
            parent,
            kv_connector=connector,
            kv_connector_module_path=module_path,
            kv_connector_extra_config=sub,
            kv_role=LMCACHE_ROLE if name == LMCACHE else parent.kv_role,  # type: ignore[arg-type]
            engine_id=parent.engine_id,
        )
    return out


def child_classes_and_configs(vllm_config: VllmConfig) -> dict[str, tuple[type, VllmConfig]]:
    """Each child's connector class and a shallow copy of ``vllm_config`` carrying its KVTransferConfig."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    parent = vllm_config.kv_transfer_config
    if parent is None:
        raise ValueError("PdConnector needs vllm_config.kv_transfer_config")
    out: dict[str, tuple[type, VllmConfig]] = {}
    for name, ktc in child_transfer_configs(parent).items():
        temp = copy.copy(vllm_config)
        temp.kv_transfer_config = ktc
        out[name] = (KVConnectorFactory.get_connector_class(ktc), temp)
    return out


def child_classes_from_extra(extra: dict[str, Any]) -> dict[str, tuple[type, dict[str, Any]]]:
    """Child classes and their extra configs from an extra-config dict alone (for classmethods given only that)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for name in CHILD_ORDER:
        sub = child_extra(extra, name)
        if sub is None:
            continue
        connector, module_path = child_class_spec(extra, name)
        ktc = KVTransferConfig(kv_connector=connector, kv_connector_module_path=module_path, kv_role="kv_both")
        out[name] = (KVConnectorFactory.get_connector_class(ktc), sub)
    return out
