"""PdConnector's scheduler half: which child loads each request, delayed frees, KV events, verification.

Created by PdConnector on the scheduler role only (``connectors/pd_connector.py``, whose hooks hand over
to it); the worker half is ``connectors/pd_worker.py``.  The children, the stats object, the block size
and the verification flags are PdConnector's, passed in explicitly (``extra``: PdConnector's
``kv_connector_extra_config``, read for the LMCache child's tier settings).

Rules, for both kv roles (prefill: kv_producer with LMCache; decode: kv_consumer, LMCache optional):

* NIXL is asked first; when NIXL will load (``do_remote_prefill`` on decode), LMCache is not asked.
* Exactly one child loads a request; the other gets ``update_state_after_alloc(req, blocks, 0)``, which
  is what vLLM itself passes for a request with nothing to load.
* A finished request's blocks stay allocated while any child delays its free; the delaying children are
  announced to the workers in the next ``PdConnectorMetadata.awaited_sends``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)
from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

from pdkit.connectors.lmcache_events import relabel_events
from pdkit.connectors.lmcache_restore import RestoreLedger
from pdkit.connectors.lmcache_tiers import LMCacheTierEvents, LMCacheTierSettings
from pdkit.connectors.pd_children import LMCACHE, NIXL, child_extra
from pdkit.connectors.pd_types import PdConnectorMetadata, PdShared, PdWorkerMetadata
from pdkit.connectors.pd_verify import FINGERPRINTS_KEY, ProducerFingerprints, VerifySpec, expected_for_pull

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = init_logger(__name__)

# "lmcache_events": what PdConnector publishes for LMCache's tiers.  "vllm": vLLM block hashes of the
# prefixes LMCache holds (connectors/lmcache_tiers.py; the router can use these), "raw": LMCache's own
# chunk events (medium normalised), "both", or "off".
LMCACHE_EVENT_MODES = ("vllm", "raw", "both", "off")


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


class PdScheduler:
    """PdConnector's scheduler-side state and hooks; see the module docstring."""

    def __init__(self, shared: PdShared, *, is_kv_producer: bool, lmcache_events: str):
        children, block_size = shared.children, shared.block_size
        self._children, self._stats, self._block_size = children, shared.stats, block_size
        self.verify_transfers = shared.verify_transfers
        self._lmcache_events = lmcache_events
        # Which child loads each request (absent: none does).
        self._loader: dict[str, str] = {}
        # Delayed frees to announce to workers in the next metadata.
        self._awaited_out: dict[str, tuple[str, ...]] = {}
        # LMCache tiers as vLLM-hash KV events.
        self._tiers: LMCacheTierEvents | None = None
        if LMCACHE in children and lmcache_events in ("vllm", "both"):
            settings = LMCacheTierSettings.from_config(child_extra(shared.extra, LMCACHE) or {})
            self._tiers = LMCacheTierEvents(block_size, settings)
        self._tiers_after_save: dict[str, Request] = {}
        # verify_transfers (connectors/pd_verify.py).
        self._producer_fps: ProducerFingerprints | None = None
        if shared.verify_transfers and is_kv_producer and NIXL in children:
            self._producer_fps = ProducerFingerprints(block_size)
        self._verify_pending: dict[str, Any] = {}  # decode: request -> fingerprint payload
        # verify_restores (connectors/lmcache_restore.py): LMCache's loads checked against saved fingerprints.
        self._restores: RestoreLedger | None = RestoreLedger(block_size) if shared.verify_restores else None
        self._restore_async: set[str] = set()  # requests whose LMCache load is asynchronous

    def _each(self, fn: Callable[[KVConnectorBase_V1], Any]) -> None:
        for child in self._children.values():
            fn(child)

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        """vLLM 0.32+: each child binds the manager (and, through it, the GPU block pool) exactly once."""
        self._each(lambda c: c.bind_kv_cache_manager(kv_cache_manager))  # type: ignore[attr-defined]

    def get_loaded_kv_cache_group_ids(self, request: Request, default: Callable[[Request], Any]) -> tuple[int, ...]:
        """vLLM 0.32+: the groups the loading child restores (NIXL: every transfer group; LMCache: cacheable).

        ``default`` (the base class's answer) when no child loads the request.
        """
        child = self._children.get(self._loader.get(request.request_id, ""))
        if child is None:
            return default(request)
        return child.get_loaded_kv_cache_group_ids(request)  # type: ignore[attr-defined]

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int, default: Callable[[Request, int], Any]
    ) -> Any:
        """vLLM 0.32+: the hit's tier comes from the child that loads it (NIXL: P2P; LMCache: its own).

        ``default`` (the base class's answer) when no child loads the request.
        """
        child = self._children.get(self._loader.get(request.request_id, ""))
        if child is None:
            return default(request, num_external_tokens)
        return child.get_external_cache_hit_sources(request, num_external_tokens)  # type: ignore[attr-defined]

    def register_finished_partial_tail(self, request: Request, block_ids: Any, partial_tail_offloads: Any) -> bool:
        # vLLM 0.32+: every child sees it; blocks stay alive if any takes responsibility.
        accepted = [
            c.register_finished_partial_tail(request, block_ids, partial_tail_offloads)  # type: ignore[attr-defined]
            for c in self._children.values()
        ]
        return any(accepted)

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


def _is_remote_prefill(request: Request) -> bool:
    params = request.kv_transfer_params
    return bool(params and params.get("do_remote_prefill"))


def _is_remote_decode(request: Request) -> bool:
    params = request.kv_transfer_params
    return bool(params and params.get("do_remote_decode"))
