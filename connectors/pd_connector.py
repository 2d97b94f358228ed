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

Rules, for both roles (prefill: kv_producer with LMCache; decode: kv_consumer, LMCache optional):
* NIXL is asked first; when NIXL will load (``do_remote_prefill`` on decode), LMCache is not asked.
* Exactly one child loads a request; the other gets ``update_state_after_alloc(req, blocks, 0)``, which
  is what vLLM itself passes for a request with nothing to load.
* Blocks of a finished request stay allocated until every child that asked for a delay reported the
  request in ``finished_sending``; PdConnector reports it once, when the last one did.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
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

from pdkit.connectors.lmcache_events import relabel_events
from pdkit.connectors.lmcache_restore import RestoreLedger
from pdkit.connectors.lmcache_tiers import LMCacheTierEvents, LMCacheTierSettings
from pdkit.connectors.pd_children import (
    LMCACHE,
    NIXL,
    child_classes_and_configs,
    child_classes_from_extra,
    child_extra,
)
from pdkit.connectors.pd_types import (
    PD_STATS_KEY,
    PdConnectorMetadata,
    PdConnectorStats,
    PdPromMetrics,
    PdWorkerMetadata,
    rebuild_stats,
)
from pdkit.connectors.pd_verify import (
    FINGERPRINTS_KEY,
    ProducerFingerprints,
    VerifySpec,
    WorkerFingerprints,
    expected_for_pull,
    rank_key,
)

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

# How many reported request ids a worker remembers to drop duplicates (ids are unique per request).
_REPORTED_MEMORY = 65536
# "lmcache_events": what PdConnector publishes for LMCache's tiers.  "vllm": vLLM block hashes of the
# prefixes LMCache holds (connectors/lmcache_tiers.py; the router can use these), "raw": LMCache's own
# chunk events (medium normalised), "both", or "off".
LMCACHE_EVENT_MODES = ("vllm", "raw", "both", "off")

__all__ = ["PdConnector", "PdConnectorMetadata", "PdWorkerMetadata", "PdConnectorStats", "merge_transfer_params"]


def merge_transfer_params(by_child: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """Merge children's ``kv_transfer_params``: empty dicts count as none; NIXL wins a key clash.

    ``{}`` from an offload child must not turn "no params" into "empty params" (proxies read any dict as
    P/D params) nor shadow NIXL's.  A clash is logged, not raised: raising here kills the engine core.
    """
    merged: dict[str, Any] | None = None
    for name in sorted(by_child, key=lambda n: n == NIXL):  # NIXL last, so its keys win
        params = by_child[name]
        if not params:
            continue
        if merged is None:
            merged = {}
        clash = set(merged) & set(params)
        if clash:
            logger.warning("PdConnector: kv_transfer_params key clash %s; keeping %s's", sorted(clash), name)
        merged.update(params)
    return merged


class PdConnector(KVConnectorBase_V1):
    """LMCache + NIXL for P/D serving; see the module docstring and docs/pd-connector.md."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.verify_transfers = bool(extra.get("verify_transfers", False))
        self._block_size = vllm_config.cache_config.block_size
        self._children: dict[str, KVConnectorBase_V1] = {
            name: cls(child_config, role, kv_cache_config)
            for name, (cls, child_config) in child_classes_and_configs(vllm_config).items()
        }
        # Scheduler side: which child loads each request (absent: none does).
        self._loader: dict[str, str] = {}
        # Scheduler side: delayed frees to announce to workers in the next metadata.
        self._awaited_out: dict[str, tuple[str, ...]] = {}
        # Worker side: children still to report each delayed request in finished_sending.
        self._awaiting: dict[str, set[str]] = {}
        # Worker side: recently reported sends, so a late duplicate from a child is not reported twice
        # (vLLM's scheduler frees the blocks of a reported request; a second report would crash it).
        self._reported: OrderedDict[str, None] = OrderedDict()
        self._stats = PdConnectorStats()
        # LMCache tiers as vLLM-hash KV events (scheduler side).
        self._lmcache_events = str(extra.get("lmcache_events", "vllm"))
        if self._lmcache_events not in LMCACHE_EVENT_MODES:
            raise ValueError(f"lmcache_events must be one of {LMCACHE_EVENT_MODES}, got {self._lmcache_events!r}")
        self._tiers: LMCacheTierEvents | None = None
        if role == KVConnectorRole.SCHEDULER and LMCACHE in self._children and self._lmcache_events in ("vllm", "both"):
            settings = LMCacheTierSettings.from_config(child_extra(extra, LMCACHE) or {})
            self._tiers = LMCacheTierEvents(self._block_size, settings)
        self._tiers_after_save: dict[str, Request] = {}
        # verify_transfers (connectors/pd_verify.py).
        ktc = self._kv_transfer_config
        self._producer_fps: ProducerFingerprints | None = None
        is_sched = role == KVConnectorRole.SCHEDULER
        if self.verify_transfers and is_sched and ktc.is_kv_producer and NIXL in self._children:
            self._producer_fps = ProducerFingerprints(self._block_size)
        self._verify_pending: dict[str, Any] = {}  # decode scheduler: request -> fingerprint payload
        self._worker_fps: WorkerFingerprints | None = None  # built in register_kv_caches
        self._fingerprint_due: dict[str, list[int]] = {}
        # verify_restores (connectors/lmcache_restore.py): LMCache's loads checked against saved fingerprints.
        self.verify_restores = bool(extra.get("verify_restores", False)) and LMCACHE in self._children
        self._restores: RestoreLedger | None = (
            RestoreLedger(self._block_size) if self.verify_restores and is_sched else None
        )
        self._restore_async: set[str] = set()  # scheduler: requests whose LMCache load is asynchronous
        self._restore_sync: set[str] = set()  # worker: this step's synchronous LMCache loads to check
        self._restore_blocks: dict[str, int] = {}  # worker: restores awaiting their check -> blocks checked
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

    def _each(self, fn: Callable[[KVConnectorBase_V1], Any]) -> None:
        for child in self._children.values():
            fn(child)

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

    # ------------------------------------------------------------------ worker side
    def get_mem_pool_context(self) -> Any:
        """vLLM 0.32+: the KV cache lives in one pool, so at most one child may supply it."""
        found = [(type(c).__name__, ctx) for c in self._children.values() if (ctx := _call(c, "get_mem_pool_context"))]
        if len(found) > 1:
            raise ValueError(f"PdConnector: children {[n for n, _ in found]} each want their own KV cache memory pool")
        return found[0][1] if found else None

    def finish_forward(self) -> None:
        # vLLM 0.32+: the model no longer reads this step's KV (NIXL may start sends/frees now).
        self._each(lambda c: _call(c, "finish_forward"))

    def reset_capture_state(self) -> None:
        # vLLM 0.32+: after CUDA-graph capture, each child drops what capture runs left behind.
        self._each(lambda c: _call(c, "reset_capture_state"))

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Both: NIXL registers the memory for RDMA, LMCache keeps the tensors to copy chunks in/out.
        self._each(lambda c: c.register_kv_caches(kv_caches))
        if (self.verify_transfers and NIXL in self._children) or self.verify_restores:
            self._worker_fps = self._make_worker_fingerprints(kv_caches)

    def _make_worker_fingerprints(self, kv_caches: dict[str, torch.Tensor]) -> WorkerFingerprints | None:
        from pdkit.kernels.fingerprint import KVFingerprinter, geometry

        try:
            tokens = geometry(next(iter(kv_caches.values()))).tokens
            per_id = self._block_size // tokens if tokens < self._block_size and self._block_size % tokens == 0 else 1
            fingerprinter = KVFingerprinter(kv_caches, blocks_per_id=per_id)
            fingerprinter([0])  # compile/warm the kernel at start-up, not in the first request's step
        except (TypeError, ValueError, IndexError, StopIteration) as exc:
            logger.warning("PdConnector: verify_transfers off, cannot fingerprint this KV cache: %s", exc)
            return None
        rank = rank_key()
        logger.info("PdConnector: verify_transfers on (rank %s, %s backend, layouts %s, %d kernel blocks per id)",
                    rank, fingerprinter.backend, sorted(fingerprinter.layouts), per_id)  # fmt: skip
        # Fault injection (GPU check) only ever corrupts *received* blocks: decode workers only.
        inject = None if self._kv_transfer_config.is_kv_consumer else ""
        return WorkerFingerprints(fingerprinter, rank, inject_faults=inject)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: type[AttentionBackend]) -> None:
        self._each(lambda c: c.register_cross_layers_kv_cache(kv_cache, attn_backend))

    def set_host_xfer_buffer_ops(self, copy_operation: CopyBlocksOp) -> None:
        # Meant for NIXL's host buffer; LMCache's default is a no-op, so forwarding to both is harmless.
        self._each(lambda c: c.set_host_xfer_buffer_ops(copy_operation))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Each child gets its own metadata object (NIXL asserts its type); the parent keeps the wrapper
        # so has_connector_metadata() stays true.
        assert isinstance(connector_metadata, PdConnectorMetadata)
        for rid, names in connector_metadata.awaited_sends.items():
            self._awaiting[rid] = set(names)
        if self._worker_fps is not None:
            self._worker_fps.expect(connector_metadata.verify)
            self._fingerprint_due = dict(connector_metadata.fingerprint_blocks)
            for specs in (connector_metadata.restore_verify, connector_metadata.restore_verify_async):
                self._worker_fps.expect(specs)
                self._restore_blocks.update({rid: len(spec.local_block_ids) for rid, spec in specs.items()})
            self._restore_sync = set(connector_metadata.restore_verify)
        for name, child in self._children.items():
            child.bind_connector_metadata(connector_metadata.children[name])
        super().bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        self._each(lambda c: c.clear_connector_metadata())
        super().clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, PdConnectorMetadata)
        for name, child in self._children.items():
            child.handle_preemptions(kv_connector_metadata.children[name])

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # NIXL first: it only posts async reads/notifications; LMCache's load is synchronous, so NIXL's
        # transfers overlap with it instead of waiting behind it.
        self._each(lambda c: c.start_load_kv(forward_context, **kwargs))

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Only LMCache's layerwise mode waits here; NIXL's is a no-op.
        self._each(lambda c: c.wait_for_layer_load(layer_name))

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        # LMCache stores; NIXL's is a no-op (decode reads the paged blocks directly).
        self._each(lambda c: c.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs))

    def wait_for_save(self) -> None:
        # LMCache finishes its store; NIXL copies to its host buffer when it uses one.
        self._each(lambda c: c.wait_for_save())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Union of loads; a send/save is reported once, when the last child that delayed it is done.

        vLLM 0.26's model runner calls this; 0.32's calls :meth:`get_transfer_results` (same rules, plus
        failed receives).
        """
        sending, recving, _ = self._collect_finished(finished_req_ids, with_failures=False)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.32+: :meth:`get_finished`'s merge, and the union of children's failed receives.

        Failed receives must pass through: vLLM 0.32 releases a request stuck waiting for a pull only
        when NIXL reports it in ``failed_recving`` (it also appears in ``finished_recving``).
        """
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        sending, recving, failed = self._collect_finished(finished_req_ids, with_failures=True)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def _collect_finished(self, finished_req_ids: set[str], with_failures: bool) -> tuple[set[str], set[str], set[str]]:
        sending: set[str] = set()
        recving: set[str] = set()
        failed: set[str] = set()
        for name, child in self._children.items():
            if with_failures:
                results = child.get_transfer_results(finished_req_ids)  # type: ignore[attr-defined]
                child_sending, child_recving = results.finished_sending, results.finished_recving
                failed |= results.failed_recving
            else:
                child_sending, child_recving = child.get_finished(finished_req_ids)
            recving |= child_recving or set()
            for rid in child_sending or ():
                waiting = self._awaiting.get(rid)
                if waiting is None:
                    # Never announced as delayed: pass through like MultiConnector, unless already reported.
                    if rid not in self._reported:
                        sending.add(rid)
                    continue
                waiting.discard(name)
                if not waiting:
                    del self._awaiting[rid]
                    sending.add(rid)
        for rid in sending:
            self._reported[rid] = None
        while len(self._reported) > _REPORTED_MEMORY:
            self._reported.popitem(last=False)
        if self._worker_fps is not None and self._restore_blocks:
            self._verify_restored(recving)
        if self._worker_fps is not None and recving:
            self._verify_received(recving)
        return sending, recving, failed

    def _verify_restored(self, recving: set[str]) -> None:
        """LMCache loads done by now (synchronous: this step's; asynchronous: reported received): check them."""
        fps = self._worker_fps
        assert fps is not None
        due = self._restore_sync | (recving & set(self._restore_blocks))
        self._restore_sync = set()
        if not due:
            return
        for rid, bad in fps.check(due):
            self._stats.add("lmcache_restore_mismatch_blocks", len(bad))
            logger.warning("PdConnector: request %s: %d KV block(s) restored from LMCache fail their fingerprint "
                           "(rank %s): %s; reporting them as load errors (recomputed)", rid, len(bad), fps.rank,
                           bad[:16])  # fmt: skip
        for rid in due:
            self._stats.add("lmcache_restore_checked_blocks", self._restore_blocks.pop(rid, 0))
        self._count_verify_work()

    def _verify_received(self, recving: set[str]) -> None:
        """Decode: NIXL says these pulls are done; check their fingerprints (bad blocks → load errors)."""
        fps = self._worker_fps
        assert fps is not None
        for rid, bad in fps.check(recving):
            logger.warning("PdConnector: request %s: %d received KV block(s) fail their fingerprint (rank %s): "
                           "%s; reporting them as load errors", rid, len(bad), fps.rank, bad[:16])  # fmt: skip
        self._count_verify_work()

    def _count_verify_work(self) -> None:
        """Worker side: blocks checked, mismatches, and device time spent, into this step's stats."""
        if self._worker_fps is not None:
            for key, amount in self._worker_fps.drain_counters().items():
                self._stats.add(key, amount)

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Union: vLLM recomputes (or fails, per kv_load_failure_policy) whichever child's load failed.
        failed: set[int] = set()
        for child in self._children.values():
            failed |= child.get_block_ids_with_load_errors()
        if self._worker_fps is not None:
            failed |= self._worker_fps.take_bad_blocks()
        return failed

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

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        # LMCache's stored-chunk events (NIXL has none); the scheduler side hands them to the LMCache
        # child in update_connector_output, and take_events publishes them.
        found: KVConnectorKVEvents | None = None
        for child in self._children.values():
            events = child.get_kv_connector_kv_cache_events()
            if events is None:
                continue
            if found is None:
                found = events
            else:
                found.add_events(events.get_all_events())
        return found

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        # Only NIXL takes part in the P/D handshake.
        nixl = self._children.get(NIXL)
        return nixl.get_handshake_metadata() if nixl is not None else None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        metas = {name: child.build_connector_worker_meta() for name, child in self._children.items()}
        fingerprints: dict[str, dict[str, Any]] = {}
        if self._worker_fps is not None and self._fingerprint_due:
            # After this step's forward (stream order), so the blocks hold the prompt's final KV.
            self._worker_fps.compute(self._fingerprint_due)
            self._fingerprint_due = {}
            fingerprints = self._worker_fps.take_computed()
            self._count_verify_work()
        if all(m is None for m in metas.values()) and not fingerprints:
            return None
        return PdWorkerMetadata(children=metas, fingerprints=fingerprints)

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

    # ------------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        """vLLM 0.32+: each child binds the manager (and, through it, the GPU block pool) exactly once."""
        self._kv_cache_manager = kv_cache_manager
        self._each(lambda c: c.bind_kv_cache_manager(kv_cache_manager))  # type: ignore[attr-defined]

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """vLLM 0.32+: the groups the loading child restores (NIXL: every transfer group; LMCache: cacheable)."""
        child = self._children.get(self._loader.get(request.request_id, ""))
        if child is None:
            return super().get_loaded_kv_cache_group_ids(request)  # type: ignore[misc]
        return child.get_loaded_kv_cache_group_ids(request)  # type: ignore[attr-defined]

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> Any:
        """vLLM 0.32+: the hit's tier comes from the child that loads it (NIXL: P2P; LMCache: its own)."""
        child = self._children.get(self._loader.get(request.request_id, ""))
        if child is None:
            return super().get_external_cache_hit_sources(request, num_external_tokens)  # type: ignore[misc]
        return child.get_external_cache_hit_sources(request, num_external_tokens)  # type: ignore[attr-defined]

    def register_finished_partial_tail(self, request: Request, block_ids: Any, partial_tail_offloads: Any) -> bool:
        # vLLM 0.32+: every child sees it; blocks stay alive if any takes responsibility.
        accepted = [
            c.register_finished_partial_tail(request, block_ids, partial_tail_offloads)  # type: ignore[attr-defined]
            for c in self._children.values()
        ]
        return any(accepted)

    def has_pending_block_frees(self) -> bool:
        return any(bool(_call(c, "has_pending_block_frees")) for c in self._children.values())

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._each(lambda c: c.bind_gpu_block_pool(gpu_block_pool))

    def on_new_request(self, request: Request) -> None:
        # NIXL starts lease heartbeats for do_remote_prefill requests here.
        self._each(lambda c: c.on_new_request(request))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """NIXL first; LMCache only when NIXL has nothing to load and the request is not a remote prefill.

        NIXL is always asked because its lookup also has prefill-side duties (Mamba prompt truncation).
        A ``do_remote_prefill`` request belongs to NIXL even when it has 0 tokens to pull (full local
        prefix hit): its prefill blocks must be released by NIXL's notification, and an LMCache load
        would race the pull.  LMCache is otherwise asked on both roles.
        """
        self._loader.pop(request.request_id, None)
        for name in (NIXL, LMCACHE):
            child = self._children.get(name)
            if child is None:
                continue
            tokens, load_async = child.get_num_new_matched_tokens(request, num_computed_tokens)
            if tokens is None:  # the child is still looking (async lookup): ask again next step
                return None, False
            if tokens > 0:
                self._loader[request.request_id] = name
                if name == LMCACHE and self._restores is not None:
                    self._restores.on_lookup(request.request_id, num_computed_tokens)
                    if load_async:
                        self._restore_async.add(request.request_id)
                return tokens, load_async
            if name == NIXL and _is_remote_prefill(request):
                return 0, False
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """The loading child gets the count; the other gets the real blocks and 0 (a plain request)."""
        loader = self._loader.get(request.request_id)
        if num_external_tokens > 0:
            if loader is None:
                logger.error(
                    "PdConnector: %d external tokens but no loader for %s", num_external_tokens, request.request_id
                )
            else:
                self._stats.add(f"{loader}_loads")
                self._stats.add("lmcache_hit_tokens" if loader == LMCACHE else "nixl_load_tokens", num_external_tokens)
        if self._producer_fps is not None and _is_remote_decode(request):
            self._producer_fps.track(request)
        if self.verify_transfers and loader == NIXL and num_external_tokens > 0 and _is_remote_prefill(request):
            # Read before NIXL's own update_state_after_alloc marks the params processed.
            payload = (request.kv_transfer_params or {}).get(FINGERPRINTS_KEY)
            if payload is not None:
                self._verify_pending[request.request_id] = payload
        if self._restores is not None:
            self._restores.track(request)
            if loader == LMCACHE and num_external_tokens > 0:
                self._restores.on_load(request, blocks, num_external_tokens)
        for name, child in self._children.items():
            child.update_state_after_alloc(request, blocks, num_external_tokens if name == loader else 0)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PdConnectorMetadata(
            children={name: c.build_connector_meta(scheduler_output) for name, c in self._children.items()},
            awaited_sends=self._awaited_out,
        )
        self._awaited_out = {}
        if self._producer_fps is not None:
            meta.fingerprint_blocks = self._producer_fps.due(scheduler_output)
        if self._verify_pending:
            meta.verify = self._verify_specs(meta.children.get(NIXL))
        if self._restores is not None:
            # Same rid in both: NIXL's list (every prompt block) starts with the ledger's (full blocks).
            meta.fingerprint_blocks = {**self._restores.due(scheduler_output), **meta.fingerprint_blocks}
            for rid, spec in self._restores.take_specs().items():
                target = meta.restore_verify_async if rid in self._restore_async else meta.restore_verify
                target[rid] = spec
                self._restore_async.discard(rid)
            unverified = self._restores.take_unverified()
            if unverified:
                self._stats.add("lmcache_restore_unverified_blocks", unverified)
        return meta

    def _verify_specs(self, nixl_meta: KVConnectorMetadata | None) -> dict[str, Any]:
        """Decode: the blocks NIXL pulls this step for each request with fingerprints, and their values."""
        recv = getattr(nixl_meta, "reqs_to_recv", None) or {}
        specs: dict[str, Any] = {}
        for rid, payload in self._verify_pending.items():
            req_meta = recv.get(rid)
            if req_meta is None or not req_meta.local_block_ids:
                continue
            local = list(req_meta.local_block_ids[0])
            expected = expected_for_pull(payload, local, self._block_size)
            if expected is None:
                logger.warning_once("PdConnector: received fingerprints cannot be checked here (block size, "
                                    "payload version or length differ); request %s not verified", rid)  # fmt: skip
                continue
            specs[rid] = VerifySpec(local_block_ids=local, expected=expected)
        self._verify_pending = {}
        return specs

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # Each child sees the output with its own worker metadata (LMCache also collects KV events here).
        wrapped = connector_output.kv_connector_worker_meta
        try:
            for name, child in self._children.items():
                if isinstance(wrapped, PdWorkerMetadata):
                    connector_output.kv_connector_worker_meta = wrapped.children.get(name)
                child.update_connector_output(connector_output)
        finally:
            connector_output.kv_connector_worker_meta = wrapped
        if self._producer_fps is not None:
            # Same Scheduler.update_from_output call as this step's request_finished: the params dicts
            # it returned are not serialised yet, so the fingerprints still reach them (pd_verify.py).
            if isinstance(wrapped, PdWorkerMetadata) and wrapped.fingerprints:
                self._producer_fps.on_worker_fingerprints(wrapped.fingerprints)
            missed = self._producer_fps.end_of_update()
            if missed:
                self._stats.add("kv_verify_unsent", len(missed))
                logger.warning("PdConnector: fingerprints for %s were not ready; sent unverified", missed[:8])
        if self._restores is not None and isinstance(wrapped, PdWorkerMetadata) and wrapped.fingerprints:
            self._restores.on_worker_fingerprints(wrapped.fingerprints)
        if self._tiers is not None:
            for rid in connector_output.finished_sending or ():
                request = self._tiers_after_save.pop(rid, None)
                if request is not None:
                    self._tiers.on_stored(request)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Both children are told; blocks stay while any child delays; params merged (NIXL's on prefill)."""
        delayed: list[str] = []
        params: dict[str, dict[str, Any] | None] = {}
        for name, child in self._children.items():
            delay, child_params = child.request_finished(request, block_ids)
            if delay:
                delayed.append(name)
            params[name] = child_params
        self._loader.pop(request.request_id, None)
        if self._restores is not None:
            self._restores.forget(request)
            self._restore_async.discard(request.request_id)
        if delayed:
            self._awaited_out[request.request_id] = tuple(delayed)
        merged = merge_transfer_params(params)
        if self._tiers is not None:
            if LMCACHE in delayed:  # LMCache's async save: announce once it reports the save done
                self._tiers_after_save[request.request_id] = request
            else:
                self._tiers.on_stored(request)
        if self._producer_fps is not None:
            self._producer_fps.on_request_finished(request, merged if _is_remote_decode(request) else None)
        if _is_remote_decode(request) and NIXL in self._children and not params.get(NIXL):
            self._stats.add("prefill_without_params")
            aborted = getattr(request.status, "name", "") == "FINISHED_ABORTED"
            (logger.info if aborted else logger.warning)(
                "PdConnector: prefill request %s finished with status %s and no NIXL params; the decode hop "
                "cannot pull it (send the prefill hop with max_tokens=1, min_tokens=1 so it ends by length)",
                request.request_id,
                request.status,
            )
        return bool(delayed), merged

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Consumed by vLLM 0.26.0's Scheduler.update_from_output and published next to its GPU events.

        LMCache's tiers go out in vLLM's block-hash space (``lmcache_events="vllm"``, the default; see
        connectors/lmcache_tiers.py), LMCache's own chunk events are only used to map evictions back,
        unless ``"raw"``/``"both"`` asks for them too.
        """
        for name, child in self._children.items():
            if name != LMCACHE:
                yield from child.take_events()
                continue
            raw = list(relabel_events(child.take_events()))
            if self._tiers is not None:
                self._tiers.on_lmcache_events(raw)
                yield from self._tiers.take()
            if self._lmcache_events in ("raw", "both"):
                yield from raw

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        # Starts NIXL's side-channel listener; LMCache has no handshake.
        nixl = self._children.get(NIXL)
        if nixl is not None:
            nixl.set_xfer_handshake_metadata(metadata)

    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        nixl = self._children.get(NIXL)
        if nixl is not None:
            nixl.set_xfer_handshake_metadata_pp_aware(metadata)

    def has_pending_push_work(self) -> bool:
        return any(c.has_pending_push_work() for c in self._children.values())

    def reset_cache(self) -> bool | None:
        return all([c.reset_cache() is not False for c in self._children.values()])

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


def _call(child: KVConnectorBase_V1, hook: str) -> Any:
    """Call a hook vLLM 0.32 added to the base class; None on 0.26, where the child has no such method."""
    method = getattr(child, hook, None)
    return method() if method is not None else None


def _is_remote_prefill(request: Request) -> bool:
    params = request.kv_transfer_params
    return bool(params and params.get("do_remote_prefill"))


def _is_remote_decode(request: Request) -> bool:
    params = request.kv_transfer_params
    return bool(params and params.get("do_remote_decode"))
