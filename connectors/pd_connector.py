"""PdConnector: vLLM KV connector composing LMCache (local offload/reuse) and NIXL (P→D transfer).

vLLM 0.26.0 and 0.32.0 (the hooks 0.32 added are delegated below) load it with
``kv_connector="PdConnector"`` and ``kv_connector_module_path="pdkit.connectors.pd_connector"``;
configuration in ``pd_children.py``, design and the method-by-method table in ``docs/pd-connector.md``.

Composition, not a MultiConnector subclass: vLLM's HMA check special-cases the class *name*
``MultiConnector`` (a subclass named otherwise claims SupportsHMA through inheritance, keeps the hybrid
KV-cache manager on, then trips MultiConnector's own «HMA should not be enabled unless all
sub-connectors support it» assertion, since its children list lives under a key we do not use).
PdConnector does not implement SupportsHMA (LMCache does not), so vLLM turns HMA off on its own.
MultiConnector's generic behaviour is also wrong for P/D in three places fixed here: lookups ask every
child (LMCache's lookup has side effects even when NIXL will load), ``{}`` params from an offload child
poison the merge, and KV events from children are dropped.

Layout, as vLLM's own ``kv_connector/v1/nixl/`` package: this class builds the children and hands each
hook to the half its role needs, created on that role only: ``pd_scheduler.py`` (:class:`PdScheduler`:
which child loads a request, delayed frees, transfer params, KV events, verification bookkeeping) or
``pd_worker.py`` (:class:`PdWorker`: per-child metadata, the once-only report of delayed sends,
verification checks).  The children, the stats object, the block size and the verification flags are
shared: built here and passed to the half explicitly.  What belongs to neither role (stats, shutdown,
``has_pending_block_frees``, layout and class methods) stays here.  The rules each half applies are in
its module docstring.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    CopyBlocksOp,
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiKVConnectorStats
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadata
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

from pdkit.connectors.pd_children import LMCACHE, NIXL, call_hook, child_classes_and_configs, child_classes_from_extra
from pdkit.connectors.pd_scheduler import LMCACHE_EVENT_MODES, PdScheduler, merge_transfer_params
from pdkit.connectors.pd_types import (
    PD_STATS_KEY,
    PdConnectorMetadata,
    PdConnectorStats,
    PdPromMetrics,
    PdShared,
    PdWorkerMetadata,
    rebuild_stats,
)
from pdkit.connectors.pd_worker import PdWorker

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

__all__ = ["PdConnector", "PdConnectorMetadata", "PdWorkerMetadata", "PdConnectorStats", "merge_transfer_params"]


class PdConnector(KVConnectorBase_V1):
    """LMCache + NIXL for P/D serving; see the module docstring and docs/pd-connector.md."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        extra = ktc.kv_connector_extra_config or {}
        self.verify_transfers = bool(extra.get("verify_transfers", False))
        self._block_size = vllm_config.cache_config.block_size
        self._children: dict[str, KVConnectorBase_V1] = {
            name: cls(child_config, role, kv_cache_config)
            for name, (cls, child_config) in child_classes_and_configs(vllm_config).items()
        }
        # Shared with the half below: both add their counters to it; get_kv_connector_stats reports them.
        self._stats = PdConnectorStats()
        # LMCache tiers as vLLM-hash KV events (scheduler side); checked on both roles.
        self._lmcache_events = str(extra.get("lmcache_events", "vllm"))
        if self._lmcache_events not in LMCACHE_EVENT_MODES:
            raise ValueError(f"lmcache_events must be one of {LMCACHE_EVENT_MODES}, got {self._lmcache_events!r}")
        # verify_restores (connectors/lmcache_restore.py): LMCache's loads checked against saved fingerprints.
        self.verify_restores = bool(extra.get("verify_restores", False)) and LMCACHE in self._children
        # The half this role needs (vLLM's NixlConnector names them the same way); the other stays None.
        self.connector_scheduler: PdScheduler | None = None
        self.connector_worker: PdWorker | None = None
        shared = PdShared(self._children, self._stats, self._block_size, self.verify_transfers,
                          self.verify_restores, extra)  # fmt: skip
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = PdScheduler(
                shared, is_kv_producer=ktc.is_kv_producer, lmcache_events=self._lmcache_events
            )
        else:  # KVConnectorRole.WORKER
            self.connector_worker = PdWorker(shared, is_kv_consumer=ktc.is_kv_consumer)
        logger.info(
            "PdConnector (%s, role %s): children %s",
            role.name,
            self._kv_transfer_config.kv_role,
            {n: type(c).__name__ for n, c in self._children.items()},
        )

    # ------------------------------------------------------------------ helpers
    @property
    def children(self) -> dict[str, KVConnectorBase_V1]:
        """The live children by slot (``"nixl"``, ``"lmcache"``), NIXL first."""
        return self._children

    @property
    def _sched(self) -> PdScheduler:
        assert self.connector_scheduler is not None, "PdConnector: scheduler-side hook called on the worker role"
        return self.connector_scheduler

    @property
    def _worker(self) -> PdWorker:
        assert self.connector_worker is not None, "PdConnector: worker-side hook called on the scheduler role"
        return self.connector_worker

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        # One KV layout serves both children, so only when both can use it; verification fingerprints
        # per-layer tensors (register_kv_caches), so it keeps vLLM's per-layer layout.
        if self.verify_transfers or self.verify_restores:
            return False
        return bool(self._children) and all(
            getattr(c, "prefer_cross_layer_blocks", False) for c in self._children.values()
        )

    @property
    def requires_kv_delivery(self) -> bool:
        """vLLM 0.32+: only the NIXL producer leg hands KV off that must arrive (decode pulls it).

        LMCache runs as ``kv_both``, which the base class would count as a producer; its saves are
        best-effort (a dropped save is a later cache miss), so they must not force a preempted request
        to be recomputed.
        """
        nixl = self._children.get(NIXL)
        return bool(getattr(nixl, "requires_kv_delivery", False)) if nixl is not None else False

    # ------------------------------------------------------------------ worker side (PdWorker)
    def get_mem_pool_context(self) -> Any:
        """vLLM 0.32+: the memory pool the KV cache is allocated in (at most one child may have one)."""
        return self._worker.get_mem_pool_context()

    def finish_forward(self) -> None:
        """vLLM 0.32+: the model no longer reads this step's KV (NIXL may start sends/frees now)."""
        self._worker.finish_forward()

    def reset_capture_state(self) -> None:
        """vLLM 0.32+: after CUDA-graph capture, each child drops what capture runs left behind."""
        self._worker.reset_capture_state()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The per-layer KV cache tensors: NIXL registers them for RDMA, LMCache copies chunks in/out."""
        self._worker.register_kv_caches(kv_caches)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: type[AttentionBackend]) -> None:
        """The KV cache as one cross-layer tensor (when prefer_cross_layer_blocks), for both children."""
        self._worker.register_cross_layers_kv_cache(kv_cache, attn_backend)

    def set_host_xfer_buffer_ops(self, copy_operation: CopyBlocksOp) -> None:
        """The copy op for NIXL's host transfer buffer (LMCache's is a no-op)."""
        self._worker.set_host_xfer_buffer_ops(copy_operation)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """This step's metadata from the scheduler: each child gets its own, the wrapper stays here."""
        self._worker.bind_connector_metadata(connector_metadata)
        super().bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        """End of the step: every child drops its metadata, and so does the wrapper."""
        self._worker.clear_connector_metadata()
        super().clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Preempted requests: each child handles them with its own metadata."""
        self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Before the forward: start this step's loads (NIXL first, so its pulls overlap LMCache's load)."""
        self._worker.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before a layer's attention: wait for its KV (LMCache's layerwise mode only)."""
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """After a layer's attention: LMCache stores its KV (NIXL's is a no-op)."""
        self._worker.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        """After the forward: LMCache finishes its store, NIXL copies to its host buffer if it uses one."""
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM 0.26: finished sends (once, when the last delaying child is done) and receives."""
        return self._worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.32+: get_finished's merge, plus the children's failed receives."""
        return self._worker.get_transfer_results(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed (any child's, or failing verification): vLLM recomputes them."""
        return self._worker.get_block_ids_with_load_errors()

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        """LMCache's stored-chunk events, sent to the scheduler side (NIXL has none)."""
        return self._worker.get_kv_connector_kv_cache_events()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        """NIXL's P/D handshake metadata (LMCache has no handshake)."""
        return self._worker.get_handshake_metadata()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """Worker → scheduler after the step: each child's worker metadata and the computed fingerprints."""
        return self._worker.build_connector_worker_meta()

    # ------------------------------------------------------------------ both roles
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Worker side: children's stats by class name; scheduler side also PdConnector's own counters."""
        stats: MultiKVConnectorStats | None = None
        for child in self._children.values():
            child_stats = child.get_kv_connector_stats()
            if child_stats is None or child_stats.is_empty():
                continue
            stats = stats or MultiKVConnectorStats()
            stats[type(child).__name__] = child_stats
        if not self._stats.is_empty():
            stats = stats or MultiKVConnectorStats()
            stats[PD_STATS_KEY] = self._stats.clone_and_reset()
        return stats

    def has_pending_block_frees(self) -> bool:
        """vLLM 0.32+ (scheduler): whether any child's pending transfers will free blocks (answered on either role)."""
        return any(bool(call_hook(c, "has_pending_block_frees")) for c in self._children.values())

    def get_finished_count(self) -> int | None:
        return None

    def shutdown(self) -> None:
        error: Exception | None = None
        for child in self._children.values():
            try:
                child.shutdown()
            except Exception as exc:  # shut every child down, then re-raise the last failure
                logger.exception("PdConnector: %s.shutdown failed", type(child).__name__)
                error = exc
        if error is not None:
            raise error

    # ------------------------------------------------------------------ scheduler side (PdScheduler)
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        """vLLM 0.32+: each child binds the manager (and, through it, the GPU block pool) exactly once."""
        self._kv_cache_manager = kv_cache_manager
        self._sched.bind_kv_cache_manager(kv_cache_manager)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """vLLM 0.32+: the groups the loading child restores (NIXL: every transfer group; LMCache: cacheable)."""
        return self._sched.get_loaded_kv_cache_group_ids(
            request,
            lambda r: super(PdConnector, self).get_loaded_kv_cache_group_ids(r),  # type: ignore[misc]
        )

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> Any:
        """vLLM 0.32+: the hit's tier comes from the child that loads it (NIXL: P2P; LMCache: its own)."""
        return self._sched.get_external_cache_hit_sources(
            request,
            num_external_tokens,
            lambda r, n: super(PdConnector, self).get_external_cache_hit_sources(r, n),  # type: ignore[misc]
        )

    def register_finished_partial_tail(self, request: Request, block_ids: Any, partial_tail_offloads: Any) -> bool:
        """vLLM 0.32+: a finished request's partial last block; kept alive if any child takes it."""
        return self._sched.register_finished_partial_tail(request, block_ids, partial_tail_offloads)

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        """The scheduler's GPU block pool, for both children."""
        self._sched.bind_gpu_block_pool(gpu_block_pool)

    def on_new_request(self, request: Request) -> None:
        """A request entered the scheduler (NIXL starts lease heartbeats for remote prefills)."""
        self._sched.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens one child can load beyond the local prefix hit: NIXL first, LMCache when NIXL has none."""
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Blocks allocated: the loading child gets the count, the other the blocks and 0."""
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Scheduler → worker, once per step: each child's metadata, delayed frees, verification work."""
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """The workers' output of a step: each child sees its own worker metadata."""
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """A request finished: whether its blocks stay (any child delays) and the merged transfer params."""
        return self._sched.request_finished(request, block_ids)

    def take_events(self) -> Iterable[KVCacheEvent]:
        """KV events to publish next to vLLM's GPU ones (LMCache's tiers, per lmcache_events)."""
        return self._sched.take_events()

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        """The workers' handshake metadata: starts NIXL's side-channel listener (LMCache has no handshake)."""
        self._sched.set_xfer_handshake_metadata(metadata)

    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        """Same, keyed by (pipeline rank, TP rank)."""
        self._sched.set_xfer_handshake_metadata_pp_aware(metadata)

    def has_pending_push_work(self) -> bool:
        """Whether any child still has KV to push (NIXL push mode)."""
        return self._sched.has_pending_push_work()

    def reset_cache(self) -> bool | None:
        """Reset the prefix cache: every child resets; False when any child could not."""
        return self._sched.reset_cache()

    # ------------------------------------------------------------------ class methods
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        layouts = {
            layout
            for child_cls, child_config in child_classes_and_configs(vllm_config).values()
            if (layout := child_cls.get_required_kvcache_layout(child_config)) is not None
        }
        if len(layouts) > 1:
            raise ValueError(f"PdConnector children require different KV cache layouts: {sorted(layouts)}")
        return next(iter(layouts), None)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return any(
            child_cls.requires_piecewise_for_cudagraph(sub)
            for child_cls, sub in child_classes_from_extra(extra_config).values()
        )

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return rebuild_stats(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        children: dict[str, KVConnectorPromMetrics] = {}
        for child_cls, child_config in child_classes_and_configs(vllm_config).values():
            prom = child_cls.build_prom_metrics(child_config, metric_types, labelnames, per_engine_labelvalues)
            if prom is not None:
                children[child_cls.__name__] = prom
        return PdPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues, children)
