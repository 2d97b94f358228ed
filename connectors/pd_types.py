"""PdConnector's metadata, worker metadata, stats and Prometheus metrics.

Children's objects travel inside these keyed by child slot (``"nixl"``/``"lmcache"``), never by
position, so a child switched off (NIXL-only mode) cannot shift another child's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiKVConnectorStats
from vllm.logger import init_logger
from vllm.v1.metrics.utils import create_metric_per_engine

logger = init_logger(__name__)

PD_STATS_KEY = "PdConnector"


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, once per step.

    ``children``: each child's own metadata, bound to that child on the worker.
    ``awaited_sends``: for every request whose blocks stay allocated after it finished, the children
    whose async save/send must complete before the worker reports it in ``finished_sending``.
    """

    children: dict[str, KVConnectorMetadata]
    awaited_sends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # verify_transfers (connectors/pd_verify.py): prefill workers fingerprint these blocks after this
    # step's forward; decode workers check these requests (VerifySpec) once NIXL has received them.
    fingerprint_blocks: dict[str, list[int]] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    # verify_restores (connectors/lmcache_restore.py): LMCache loads to check (VerifySpec by request),
    # synchronous ones after this step's forward, asynchronous ones once LMCache reports them received.
    restore_verify: dict[str, Any] = field(default_factory=dict)
    restore_verify_async: dict[str, Any] = field(default_factory=dict)


@dataclass
class PdWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker → scheduler: each child's worker metadata (``None`` where a child sent none).

    ``fingerprints``: ``{request_id: {"block_ids": [...], "ranks": {rank: [int64, ...]}}}`` from prefill
    workers with ``verify_transfers``; ranks of a TP group are merged by :meth:`aggregate`.
    """

    children: dict[str, KVConnectorWorkerMetadata | None]
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, PdWorkerMetadata)
        merged: dict[str, KVConnectorWorkerMetadata | None] = dict(self.children)
        for name, meta in other.children.items():
            mine = merged.get(name)
            if mine is None:
                merged[name] = meta
            elif meta is not None:
                merged[name] = mine.aggregate(meta)
        fps = {rid: {"block_ids": e["block_ids"], "ranks": dict(e["ranks"])} for rid, e in self.fingerprints.items()}
        for rid, entry in other.fingerprints.items():
            if rid in fps:
                fps[rid]["ranks"].update(entry["ranks"])
            else:
                fps[rid] = {"block_ids": entry["block_ids"], "ranks": dict(entry["ranks"])}
        return PdWorkerMetadata(children=merged, fingerprints=fps)


PD_COUNTERS = (
    "lmcache_loads",  # requests whose prefix LMCache loaded
    "lmcache_hit_tokens",  # tokens LMCache loaded (scheduled loads, not lookups)
    "nixl_loads",  # requests whose KV NIXL pulled
    "nixl_load_tokens",
    "prefill_without_params",  # prefill (do_remote_decode) requests that ended without NIXL params
    "kv_verify_checked_blocks",  # decode workers: received blocks whose fingerprint was checked (per rank)
    "kv_verify_mismatch_blocks",  # decode workers: of those, mismatching (reported as load errors)
    "kv_verify_unsent",  # prefill: NIXL params sent without fingerprints (values not ready in time)
    "kv_verify_requests",  # decode workers: requests whose received blocks were checked
    "kv_verify_us",  # decode workers: device time checking them (µs; exported in seconds)
    "kv_fingerprint_requests",  # prefill workers: requests whose sent blocks were fingerprinted
    "kv_fingerprint_us",  # prefill workers: device time fingerprinting them (µs; exported in seconds)
    "lmcache_restore_checked_blocks",  # workers: blocks LMCache restored whose fingerprint was checked
    "lmcache_restore_mismatch_blocks",  # workers: of those, mismatching (reported as load errors: recomputed)
    "lmcache_restore_unverified_blocks",  # scheduler: restored blocks with no saved fingerprint to check
)
# Counters kept in µs (ints survive aggregation and serialisation) and exported in seconds.
MICROSECOND_COUNTERS = {"kv_verify_us": "kv_verify_seconds", "kv_fingerprint_us": "kv_fingerprint_seconds"}


@dataclass
class PdConnectorStats(KVConnectorStats):
    """Scheduler-side counters of PdConnector's own decisions (plain ints: serialisable)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = dict.fromkeys(PD_COUNTERS, 0)

    def add(self, key: str, value: int = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.add(key, int(value))
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def clone_and_reset(self) -> PdConnectorStats:
        out = PdConnectorStats(data=dict(self.data))
        self.reset()
        return out


def rebuild_stats(data: dict[str, Any] | None) -> MultiKVConnectorStats:
    """``build_kv_connector_stats``: objects in-process, ``{"data": ...}`` dicts after serialisation.

    Keys are connector class names (like MultiConnector) plus ``PdConnector`` for our counters; a class
    vLLM's registry does not know is dropped with a warning rather than crashing the stats logger.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if data is None:
        return MultiKVConnectorStats()
    rebuilt: dict[str, KVConnectorStats] = {}
    for name, value in data.items():
        if isinstance(value, KVConnectorStats):
            rebuilt[name] = value
            continue
        inner = value.get("data", value) if isinstance(value, dict) else None
        if inner is None:
            continue
        if name == PD_STATS_KEY:
            rebuilt[name] = PdConnectorStats(data=dict(inner))
            continue
        try:
            cls = KVConnectorFactory.get_connector_class_by_name(name)
        except ValueError:
            logger.warning_once("PdConnector: no registered connector %s to rebuild its stats", name)
            continue
        stats = cls.build_kv_connector_stats(data=inner)
        if stats is not None:
            rebuilt[name] = stats
    return MultiKVConnectorStats(data=rebuilt)


class PdPromMetrics(KVConnectorPromMetrics):
    """``pdkit:*`` counters for PdConnector's decisions, and each child's own metrics, by stats key."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
        children: dict[str, KVConnectorPromMetrics],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._children = children
        docs = {
            "lmcache_loads": "Requests whose prompt prefix PdConnector loaded from LMCache.",
            "lmcache_hit_tokens": "Prompt tokens PdConnector loaded from LMCache.",
            "nixl_loads": "Requests whose KV PdConnector pulled over NIXL.",
            "nixl_load_tokens": "Prompt tokens PdConnector pulled over NIXL.",
            "prefill_without_params": "Prefill requests (do_remote_decode) that ended without NIXL transfer params.",
            "kv_verify_checked_blocks": "Received KV blocks decode checked (verify_transfers; per TP rank).",
            "kv_verify_mismatch_blocks": "Received KV blocks failing their fingerprint (reported as load errors).",
            "kv_verify_unsent": "Prefill requests whose NIXL params went out without fingerprints.",
            "kv_verify_requests": "Requests whose received KV blocks decode checked (verify_transfers).",
            "kv_verify_us": "Device time decode spent checking received KV blocks (what it adds to TTFT).",
            "kv_fingerprint_requests": "Requests whose sent KV blocks prefill fingerprinted (verify_transfers).",
            "kv_fingerprint_us": "Device time prefill spent fingerprinting sent KV blocks (what it adds to TTFT).",
            "lmcache_restore_checked_blocks": "KV blocks restored from LMCache whose fingerprint was checked.",
            "lmcache_restore_mismatch_blocks": "KV blocks restored from LMCache that failed their fingerprint "
            "(recomputed).",
            "lmcache_restore_unverified_blocks": "KV blocks restored from LMCache with no saved fingerprint.",
        }
        self._counters = {
            key: create_metric_per_engine(
                self._counter_cls(
                    name=f"pdkit:{MICROSECOND_COUNTERS.get(key, key)}", documentation=doc, labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for key, doc in docs.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            inner = value.data if isinstance(value, KVConnectorStats) else value.get("data", value)
            if name == PD_STATS_KEY:
                for key, amount in inner.items():
                    if key in self._counters and amount:
                        scale = 1e-6 if key in MICROSECOND_COUNTERS else 1
                        self._counters[key][engine_idx].inc(amount * scale)  # type: ignore[union-attr]
            elif name in self._children:
                self._children[name].observe(inner, engine_idx)


@dataclass(frozen=True)
class PdShared:
    """What PdConnector hands the half its role creates (connectors/pd_scheduler.py or pd_worker.py):
    built once in ``PdConnector.__init__``, so both halves see the same children and one stats object."""

    children: dict[str, KVConnectorBase_V1]  # by slot ("nixl", "lmcache"), NIXL first
    stats: PdConnectorStats  # both halves add their counters; get_kv_connector_stats reports them
    block_size: int
    verify_transfers: bool
    verify_restores: bool
    extra: dict[str, Any]  # PdConnector's kv_connector_extra_config (the LMCache child's tier settings)
