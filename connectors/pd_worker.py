"""PdConnector's worker half: per-child metadata, the once-only report of delayed sends, verification checks.

Created by PdConnector on the worker role only (``connectors/pd_connector.py``, whose hooks hand over to
it); the scheduler half is ``connectors/pd_scheduler.py``.  The children, the stats object, the block
size and the verification flags are PdConnector's, passed in explicitly.

Blocks of a finished request stay allocated until every child that asked for a delay (announced by the
scheduler in ``PdConnectorMetadata.awaited_sends``) reported the request in ``finished_sending``; the
worker reports it once, when the last one did.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    CopyBlocksOp,
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionBackend, AttentionMetadata

from pdkit.connectors.pd_children import NIXL, call_hook
from pdkit.connectors.pd_types import PdConnectorMetadata, PdShared, PdWorkerMetadata
from pdkit.connectors.pd_verify import WorkerFingerprints, rank_key

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVConnectorKVEvents
    from vllm.forward_context import ForwardContext

logger = init_logger(__name__)

# How many reported request ids a worker remembers to drop duplicates (ids are unique per request).
_REPORTED_MEMORY = 65536


class PdWorker:
    """PdConnector's worker-side state and hooks; see the module docstring."""

    def __init__(self, shared: PdShared, *, is_kv_consumer: bool):
        self._children, self._stats, self._block_size = shared.children, shared.stats, shared.block_size
        self._is_kv_consumer = is_kv_consumer
        self.verify_transfers, self.verify_restores = shared.verify_transfers, shared.verify_restores
        # Children still to report each delayed request in finished_sending.
        self._awaiting: dict[str, set[str]] = {}
        # Recently reported sends, so a late duplicate from a child is not reported twice (vLLM's
        # scheduler frees the blocks of a reported request; a second report would crash it).
        self._reported: OrderedDict[str, None] = OrderedDict()
        # verify_transfers (connectors/pd_verify.py).
        self._worker_fps: WorkerFingerprints | None = None  # built in register_kv_caches
        self._fingerprint_due: dict[str, list[int]] = {}
        # verify_restores (connectors/lmcache_restore.py).
        self._restore_sync: set[str] = set()  # this step's synchronous LMCache loads to check
        self._restore_blocks: dict[str, int] = {}  # restores awaiting their check -> blocks checked

    def _each(self, fn: Callable[[KVConnectorBase_V1], Any]) -> None:
        for child in self._children.values():
            fn(child)

    def get_mem_pool_context(self) -> Any:
        """vLLM 0.32+: the KV cache lives in one pool, so at most one child may supply it."""
        found = [
            (type(c).__name__, ctx) for c in self._children.values() if (ctx := call_hook(c, "get_mem_pool_context"))
        ]
        if len(found) > 1:
            raise ValueError(f"PdConnector: children {[n for n, _ in found]} each want their own KV cache memory pool")
        return found[0][1] if found else None

    def finish_forward(self) -> None:
        # vLLM 0.32+: the model no longer reads this step's KV (NIXL may start sends/frees now).
        self._each(lambda c: call_hook(c, "finish_forward"))

    def reset_capture_state(self) -> None:
        # vLLM 0.32+: after CUDA-graph capture, each child drops what capture runs left behind.
        self._each(lambda c: call_hook(c, "reset_capture_state"))

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
        rank = rank_key()  # here, once the TP/PP groups exist
        logger.info("PdConnector: verify_transfers on (rank %s, %s backend, layouts %s, %d kernel blocks per id)",
                    rank, fingerprinter.backend, sorted(fingerprinter.layouts), per_id)  # fmt: skip
        # Fault injection (GPU check) only ever corrupts *received* blocks: decode workers only.
        inject = None if self._is_kv_consumer else ""
        return WorkerFingerprints(fingerprinter, rank, inject_faults=inject)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: type[AttentionBackend]) -> None:
        self._each(lambda c: c.register_cross_layers_kv_cache(kv_cache, attn_backend))

    def set_host_xfer_buffer_ops(self, copy_operation: CopyBlocksOp) -> None:
        # Meant for NIXL's host buffer; LMCache's default is a no-op, so forwarding to both is harmless.
        self._each(lambda c: c.set_host_xfer_buffer_ops(copy_operation))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Each child gets its own metadata object (NIXL asserts its type); PdConnector keeps the wrapper
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

    def clear_connector_metadata(self) -> None:
        self._each(lambda c: c.clear_connector_metadata())

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
        """Blocks checked, mismatches, and device time spent, into this step's stats."""
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
