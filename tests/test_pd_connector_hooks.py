"""PdConnector's vLLM 0.32 hooks against 0.32's real base classes (skipped, with the reason, on 0.26).

Same seam and fakes as tests/test_pd_connector.py (a fake LMCache engine and a fake NIXL *worker*, each
needing a GPU for real); NIXL's scheduler side, LMCacheConnectorV1's forwarding code, VllmConfig and the
factory are vLLM's own.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")

from test_pd_connector import (  # noqa: E402
    DECODE_PARAMS,
    lm_engine,
    make_blocks,
    make_connector,
    make_request,
    nixl_worker,
    pd_transfer_config,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm_versions import since_vllm  # noqa: E402

from pdkit.connectors.pd_types import PdConnectorMetadata  # noqa: E402

pytestmark = [pytest.mark.vllm, since_vllm("0.32", "hooks added to KVConnectorBase_V1 after 0.26")]


def test_requires_kv_delivery_only_on_the_nixl_producer_leg() -> None:
    """Prefill: NIXL's hand-off must arrive (True); LMCache's kv_both saves alone would also say True,
    which would make vLLM recompute preempted requests for a best-effort cache."""
    prefill = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_producer"))
    decode = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_consumer"))
    assert prefill.requires_kv_delivery is True
    assert decode.requires_kv_delivery is False
    assert decode.children["lmcache"].requires_kv_delivery is True  # the base-class default PdConnector overrides


def test_get_transfer_results_merges_children_and_keeps_failed_receives() -> None:
    """0.32's model runner calls get_transfer_results: a failed NIXL pull must reach the scheduler."""
    pd = make_connector(KVConnectorRole.WORKER)
    pd.bind_connector_metadata(
        PdConnectorMetadata(
            children={"nixl": _nixl_meta(), "lmcache": "lm"},
            awaited_sends={"both": ("nixl", "lmcache")},
        )
    )
    nixl_worker(pd).sending = {"both"}
    nixl_worker(pd).recving = {"pulled"}
    nixl_worker(pd).failed = {"broken"}
    results = pd.get_transfer_results({"both"})
    assert results.finished_sending == set()  # LMCache still saving "both"
    assert results.finished_recving == {"pulled", "broken"}
    assert results.failed_recving == {"broken"}
    lm_engine(pd).sending = {"both"}
    assert pd.get_transfer_results(set()).finished_sending == {"both"}
    assert pd.get_transfer_results(set()).finished_sending == set()  # reported once


def test_cache_hit_source_and_loaded_groups_come_from_the_loading_child() -> None:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_consumer"))
    req = make_request("d1", 64, dict(DECODE_PARAMS))
    assert pd.get_num_new_matched_tokens(req, 0) == (64, True)
    pd.update_state_after_alloc(req, make_blocks([10, 11, 12, 13]), 64)
    assert pd.get_external_cache_hit_sources(req, 64) == {CacheHitSource.P2P: 64}
    assert pd.get_loaded_kv_cache_group_ids(req) == pd.children["nixl"].get_loaded_kv_cache_group_ids(req)

    hit = make_request("local", 64)
    lm_engine(pd).hits["local"] = 32
    assert pd.get_num_new_matched_tokens(hit, 0) == (32, False)
    pd.update_state_after_alloc(hit, make_blocks([1, 2]), 32)
    expected = pd.children["lmcache"].get_external_cache_hit_sources(hit, 32)
    assert pd.get_external_cache_hit_sources(hit, 32) == expected
    assert pd.get_external_cache_hit_sources(make_request("none", 16), 0) == {}


def test_worker_lifecycle_hooks_reach_every_child(monkeypatch: pytest.MonkeyPatch) -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    calls: list[tuple[str, str]] = []
    for name, child in pd.children.items():
        for hook in ("finish_forward", "reset_capture_state"):
            monkeypatch.setattr(child, hook, lambda n=name, h=hook: calls.append((n, h)))
    pd.finish_forward()
    pd.reset_capture_state()
    assert sorted(calls) == sorted((n, h) for n in pd.children for h in ("finish_forward", "reset_capture_state"))
    assert pd.get_mem_pool_context() is None
    assert pd.has_pending_block_frees() is False


def test_bind_kv_cache_manager_binds_each_child_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base class binds the block pool through bind_kv_cache_manager; PdConnector must not bind twice."""
    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_producer"))
    pools: list[tuple[str, Any]] = []
    for name, child in pd.children.items():
        monkeypatch.setattr(child, "bind_gpu_block_pool", lambda pool, n=name: pools.append((n, pool)))

    class Manager:  # a stand-in holding only what bind_kv_cache_manager reads (a real one needs a KV cache)
        block_pool = object()

    manager = Manager()
    pd.bind_kv_cache_manager(manager)  # type: ignore[arg-type]
    assert sorted(pools, key=lambda p: p[0]) == [("lmcache", manager.block_pool), ("nixl", manager.block_pool)]
    assert all(c._kv_cache_manager is manager for c in pd.children.values())


def _nixl_meta() -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnectorMetadata

    return NixlConnectorMetadata()
