"""PdConnector against vLLM 0.26.0's real classes, on CPU.

Real: VllmConfig, KVTransferConfig, KVConnectorFactory, Request, SchedulerOutput, KVConnectorOutput,
KVCacheBlocks, LMCacheConnectorV1's own forwarding and KV-event code, and NIXL's real *scheduler* side.
Fake (each says so): LMCache's engine (the real one needs a GPU and the lmcache package) and NIXL's
*worker* (the real one needs a GPU and the nixl package).  They are injected through PdConnector's
documented seam, the ``lmcache_connector``/``nixl_connector`` extra-config keys, pointing at this module.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from vllm.config import DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_events import BlockStored  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import (  # noqa: E402
    LMCacheConnectorV1,
    LMCacheKVEvents,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import (  # noqa: E402
    NixlConnector,
    NixlConnectorMetadata,
    NixlPushConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from pdkit.connectors.pd_connector import PdConnector, PdConnectorMetadata, merge_transfer_params  # noqa: E402
from pdkit.connectors.pd_types import PD_STATS_KEY, PdConnectorStats  # noqa: E402

BLOCK = 16


# ---------------------------------------------------------------- fakes (real ones need a GPU)
class FakeLMCacheEngine:
    """Fake LMCache engine (the real LMCacheConnectorV1Impl needs a GPU and lmcache): scripted answers."""

    def __init__(self) -> None:
        self.hits: dict[str, int | None] = {}
        self.finished: dict[str, tuple[bool, dict[str, Any] | None]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.sending: set[str] = set()
        self.load_errors: set[int] = set()
        self.kv_events: list[Any] = []

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        self.calls.append(("lookup", request.request_id))
        return self.hits.get(request.request_id, 0)

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        self.calls.append(("alloc", request.request_id, num_external_tokens))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> str:
        return "lmcache-meta"

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.finished.get(request.request_id, (False, None))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        out, self.sending = self.sending, set()
        return out or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self.load_errors)

    def get_kv_events(self) -> list[Any]:
        out, self.kv_events = self.kv_events, []
        return out

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.calls.append(("start_load_kv",))

    def wait_for_save(self) -> None:
        self.calls.append(("wait_for_save",))


class FakeLMCacheConnectorV1(LMCacheConnectorV1):
    """vLLM's real LMCacheConnectorV1 code over a fake engine (the real engine needs a GPU and lmcache)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        KVConnectorBase_V1.__init__(self, vllm_config, role, kv_cache_config)
        self._lmcache_engine = FakeLMCacheEngine()  # type: ignore[assignment]
        self._kv_cache_events = None


class FakeNixlWorker:
    """Fake NIXL worker half (the real one registers GPU memory with the nixl library)."""

    def __init__(self) -> None:
        self.sending: set[str] = set()
        self.recving: set[str] = set()
        self.load_errors: set[int] = set()
        self.bound: list[Any] = []
        self.stats = NixlKVConnectorStats()
        self.failed: set[str] = set()
        self.xfer_handshake_metadata = "nixl-handshake"
        self.use_host_buffer = False
        self.copy_blocks = None
        self.pcp_rank = 0  # vLLM 0.32's NIXL connector reads these (context-parallel ranks)
        self.pcp_dcp_sharded = False

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    def get_finished(self) -> tuple[set[str], set[str]]:
        out = (self.sending, self.recving)
        self.sending, self.recving = set(), set()
        return out

    def get_transfer_results(self) -> Any:
        """vLLM 0.32's worker API: sends, receives and failed receives (failed ones also count as received)."""
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        failed, self.failed = self.failed, set()
        sending, recving = self.get_finished()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving | failed,
                                          failed_recving=failed)  # fmt: skip

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self.load_errors)

    def get_kv_connector_stats(self) -> NixlKVConnectorStats | None:
        return self.stats.clone_and_reset() if not self.stats.is_empty() else None

    def start_load_kv(self, metadata: NixlConnectorMetadata) -> None:
        self.bound.append(metadata)


class _FakeNixlWorkerSide:
    """Mixin: the NIXL connector's real scheduler side, a fake worker side (the real worker needs a GPU)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        if role == KVConnectorRole.SCHEDULER:
            super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[call-arg]
            return
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        self.connector_worker = FakeNixlWorker()


class FakeNixlPushWorkerConnector(_FakeNixlWorkerSide, NixlPushConnector):
    """Push mode (NixlPushConnector): real scheduler side, fake worker side."""


class FakeNixlWorkerConnector(_FakeNixlWorkerSide, NixlConnector):
    """Pull mode (NixlConnector): real scheduler side, fake worker side."""

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert isinstance(self._connector_metadata, NixlConnectorMetadata)
        self.connector_worker.start_load_kv(self._connector_metadata)  # type: ignore[union-attr]


FAKE_CHILDREN = {
    "lmcache_connector": {"kv_connector": "FakeLMCacheConnectorV1", "kv_connector_module_path": __name__},
    "nixl_connector": {"kv_connector": "FakeNixlWorkerConnector", "kv_connector_module_path": __name__},
}


# ---------------------------------------------------------------- helpers
def pd_transfer_config(
    role: str = "kv_producer", lmcache: dict[str, Any] | None = None, **extra: Any
) -> KVTransferConfig:
    cfg: dict[str, Any] = {"nixl": {"backends": ["UCX"]}, "verify_transfers": False, **FAKE_CHILDREN, **extra}
    cfg["lmcache"] = {} if lmcache is None else lmcache
    return KVTransferConfig(
        kv_connector="PdConnector",
        kv_connector_module_path="pdkit.connectors.pd_connector",
        kv_role=role,  # type: ignore[arg-type]
        kv_connector_extra_config=cfg,
    )


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float16)
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer0"], spec)])


def make_connector(role: KVConnectorRole, ktc: KVTransferConfig | None = None) -> PdConnector:
    """Through vLLM's own factory, as the engine does."""
    config = VllmConfig(kv_transfer_config=ktc or pd_transfer_config(), device_config=DeviceConfig(device="cpu"))
    connector = KVConnectorFactory.create_connector(config, role, kv_cache_config())
    assert isinstance(connector, PdConnector)
    return connector


def make_request(rid: str, n_tokens: int = 64, params: dict[str, Any] | None = None) -> Request:
    extra = {"kv_transfer_params": params} if params is not None else None
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(n_tokens)),
        sampling_params=SamplingParams(max_tokens=1, extra_args=extra),
        pooling_params=None,
    )


def make_blocks(ids: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks(blocks=([KVCacheBlock(block_id=i) for i in ids],))


def empty_scheduler_output(finished: set[str] | None = None) -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={},
        total_num_scheduled_tokens=0,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        num_common_prefix_blocks=[0],
        finished_req_ids=finished or set(),
        free_encoder_mm_hashes=[],
    )


def lm_engine(connector: PdConnector) -> FakeLMCacheEngine:
    engine = connector.children["lmcache"]._lmcache_engine
    assert isinstance(engine, FakeLMCacheEngine)
    return engine


def nixl_worker(connector: PdConnector) -> FakeNixlWorker:
    worker = connector.children["nixl"].connector_worker
    assert isinstance(worker, FakeNixlWorker)
    return worker


DECODE_PARAMS = {
    "do_remote_prefill": True,
    "remote_block_ids": [[1, 2, 3, 4]],
    "remote_engine_id": "prefill-engine",
    "remote_request_id": "p-1",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "remote_num_tokens": 64,
}


# ---------------------------------------------------------------- configuration and loading
def test_vllm_factory_resolves_pd_connector_from_module_path() -> None:
    ktc = pd_transfer_config()
    assert KVConnectorFactory.get_connector_class(ktc) is PdConnector
    # PdConnector does not claim HMA support, so vLLM turns the hybrid KV-cache manager off for it,
    # while plain NIXL keeps it: the reason both sides pass --disable-hybrid-kv-cache-manager.
    assert KVConnectorFactory.supports_hma_config(ktc) is False
    assert KVConnectorFactory.supports_hma_config(KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_consumer"))


def test_lead_kv_config_validates_and_builds_real_children() -> None:
    """The dict pdkit/kv_config.py emits is a valid KVTransferConfig whose children vLLM can resolve."""
    from pdkit.connectors.pd_children import child_transfer_configs
    from pdkit.kv_config import kv_transfer_config
    from pdkit.stack import plan_stack

    ktc = kv_transfer_config("prefill").kv_transfer_config
    assert isinstance(ktc, KVTransferConfig)
    assert KVConnectorFactory.get_connector_class(ktc) is PdConnector
    children = child_transfer_configs(ktc)
    assert list(children) == ["nixl", "lmcache"]
    assert children["nixl"].kv_role == "kv_producer" and children["lmcache"].kv_role == "kv_both"
    assert children["nixl"].engine_id == children["lmcache"].engine_id == ktc.engine_id
    assert children["nixl"].kv_connector_extra_config == {"backends": ["UCX"]}
    assert KVConnectorFactory.get_connector_class(children["nixl"]) is NixlConnector
    stack = plan_stack()
    if stack.default_lmcache_mode() == "in_process":
        assert KVConnectorFactory.get_connector_class(children["lmcache"]) is LMCacheConnectorV1
    else:  # vLLM 0.33: no in-process LMCache; vLLM's MP connector imports lmcache itself, absent here
        assert children["lmcache"].kv_connector == stack.lmcache_mp_connector
        assert stack.lmcache_mp_connector in KVConnectorFactory._registry


def test_push_mode_nixl_child_from_lead_config() -> None:
    from pdkit.config import NixlConfig
    from pdkit.connectors.pd_children import child_transfer_configs
    from pdkit.kv_config import kv_transfer_config

    ktc = kv_transfer_config("prefill", nixl=NixlConfig(mode="push")).kv_transfer_config
    assert KVConnectorFactory.get_connector_class(child_transfer_configs(ktc)["nixl"]) is NixlPushConnector


def test_children_get_their_own_configs() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config(lmcache={"lmcache.chunk_size": 256}))
    lm, nixl = pd.children["lmcache"], pd.children["nixl"]
    assert lm._kv_transfer_config.kv_connector_extra_config == {"lmcache.chunk_size": 256}
    assert lm._kv_transfer_config.kv_role == "kv_both"
    assert nixl._kv_transfer_config.kv_role == "kv_producer"
    assert nixl.engine_id == pd._kv_transfer_config.engine_id


def test_nixl_only_mode_when_lmcache_is_null() -> None:
    ktc = pd_transfer_config("kv_consumer")
    ktc.kv_connector_extra_config["lmcache"] = None
    pd = make_connector(KVConnectorRole.SCHEDULER, ktc)
    assert list(pd.children) == ["nixl"]


# ---------------------------------------------------------------- scheduler-side decisions
def test_prefill_lookup_answered_by_lmcache_and_nixl_not_handed_its_blocks() -> None:
    """Prefill: NIXL (real scheduler) has nothing to load, LMCache's hit wins; NIXL gets blocks with 0."""
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("r1", 64, {"do_remote_decode": True})
    lm_engine(pd).hits["r1"] = 48
    assert pd.get_num_new_matched_tokens(req, 0) == (48, False)

    seen: list[tuple[str, list[int], int]] = []
    nixl = pd.children["nixl"]
    original = nixl.update_state_after_alloc

    def spy(request: Request, blocks: KVCacheBlocks, n: int) -> None:
        seen.append((request.request_id, blocks.get_block_ids()[0], n))
        original(request, blocks, n)

    nixl.update_state_after_alloc = spy
    pd.update_state_after_alloc(req, make_blocks([1, 2, 3, 4]), 48)
    assert ("alloc", "r1", 48) in lm_engine(pd).calls
    assert seen == [("r1", [1, 2, 3, 4], 0)]
    meta = pd.build_connector_meta(empty_scheduler_output())
    assert isinstance(meta, PdConnectorMetadata)
    nixl_meta = meta.children["nixl"]
    assert isinstance(nixl_meta, NixlConnectorMetadata)
    assert nixl_meta.reqs_to_recv == {}  # NIXL loads nothing for a prefill request
    assert "r1" in nixl_meta.reqs_in_batch
    assert meta.children["lmcache"] == "lmcache-meta"


def test_decode_remote_prefill_answered_by_nixl_alone() -> None:
    """Decode with LMCache: a do_remote_prefill request is NIXL's; LMCache is not even asked."""
    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_consumer"))
    req = make_request("d1", 64, dict(DECODE_PARAMS))
    lm_engine(pd).hits["d1"] = 32  # a partial LMCache hit must not win over the NIXL pull
    assert pd.get_num_new_matched_tokens(req, 0) == (64, True)
    assert ("lookup", "d1") not in lm_engine(pd).calls
    pd.update_state_after_alloc(req, make_blocks([10, 11, 12, 13]), 64)
    assert ("alloc", "d1", 0) in lm_engine(pd).calls
    meta = pd.build_connector_meta(empty_scheduler_output())
    recv = meta.children["nixl"].reqs_to_recv
    assert [list(g) for g in recv["d1"].local_block_ids] == [[10, 11, 12, 13]]  # 0.32: a tuple of groups
    assert [list(g) for g in recv["d1"].remote.block_ids] == [[1, 2, 3, 4]]


def test_decode_full_local_hit_stays_with_nixl() -> None:
    """0 tokens to pull (local prefix hit) on a remote prefill: still not LMCache's request."""
    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_consumer"))
    req = make_request("d2", 64, dict(DECODE_PARAMS))
    lm_engine(pd).hits["d2"] = 32
    assert pd.get_num_new_matched_tokens(req, 64) == (0, False)
    assert ("lookup", "d2") not in lm_engine(pd).calls


def test_plain_request_without_transfer_params_uses_lmcache() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("plain", 64)
    lm_engine(pd).hits["plain"] = 0
    assert pd.get_num_new_matched_tokens(req, 0) == (0, False)
    lm_engine(pd).hits["plain"] = None  # LMCache not done looking: ask again
    assert pd.get_num_new_matched_tokens(req, 0) == (None, False)


# ---------------------------------------------------------------- request_finished
def test_request_finished_returns_nixl_params_despite_empty_dict_from_lmcache() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("r2", 64, {"do_remote_decode": True})
    lm_engine(pd).finished["r2"] = (False, {})  # the pitfall: {} instead of None
    pd.get_num_new_matched_tokens(req, 0)
    pd.update_state_after_alloc(req, make_blocks([1, 2, 3, 4]), 0)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    req.num_computed_tokens = 64
    delay, params = pd.request_finished(req, [1, 2, 3, 4])
    assert delay is True  # NIXL holds the blocks for the decode read
    assert params is not None
    assert params["do_remote_prefill"] is True and params["remote_block_ids"] == ([1, 2, 3, 4],)
    assert params["remote_engine_id"] == pd._kv_transfer_config.engine_id
    meta = pd.build_connector_meta(empty_scheduler_output({"r2"}))
    assert meta.awaited_sends == {"r2": ("nixl",)}


def test_request_finished_empty_dict_alone_means_no_params() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("plain2", 32)
    lm_engine(pd).finished["plain2"] = (False, {})
    req.status = RequestStatus.FINISHED_STOPPED
    assert pd.request_finished(req, [1, 2]) == (False, None)
    assert merge_transfer_params({"lmcache": {}, "nixl": None}) is None
    assert merge_transfer_params({"nixl": {"a": 1}, "lmcache": {"a": 2, "b": 3}}) == {"a": 1, "b": 3}


def test_request_finished_delays_while_either_child_is_async() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("r3", 64, {"do_remote_decode": True})
    lm_engine(pd).finished["r3"] = (True, None)  # LMCache save still in flight
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    req.num_computed_tokens = 64
    delay, params = pd.request_finished(req, [5, 6, 7, 8])
    assert delay is True and params is not None
    assert pd.build_connector_meta(empty_scheduler_output()).awaited_sends == {"r3": ("nixl", "lmcache")}
    # Aborted prefill: NIXL frees at once, but LMCache's save still holds the blocks.
    req4 = make_request("r4", 64, {"do_remote_decode": True})
    lm_engine(pd).finished["r4"] = (True, None)
    req4.status = RequestStatus.FINISHED_ABORTED
    assert pd.request_finished(req4, [9]) == (True, None)
    assert pd.build_connector_meta(empty_scheduler_output()).awaited_sends == {"r4": ("lmcache",)}


def test_prefill_ending_without_nixl_params_is_counted() -> None:
    pd = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("r5", 64, {"do_remote_decode": True})
    req.status = RequestStatus.FINISHED_ABORTED
    assert pd.request_finished(req, [1]) == (False, None)
    stats = pd.get_kv_connector_stats()
    assert stats is not None and stats.data[PD_STATS_KEY].data["prefill_without_params"] == 1


# ---------------------------------------------------------------- worker side
def test_bind_metadata_reaches_both_children_and_start_load() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    nixl_meta = NixlConnectorMetadata()
    pd.bind_connector_metadata(PdConnectorMetadata(children={"nixl": nixl_meta, "lmcache": "lm"}))
    assert pd.has_connector_metadata()
    assert pd.children["nixl"]._connector_metadata is nixl_meta
    assert pd.children["lmcache"]._connector_metadata == "lm"
    pd.start_load_kv(None)
    assert nixl_worker(pd).bound == [nixl_meta]
    assert ("start_load_kv",) in lm_engine(pd).calls
    pd.clear_connector_metadata()
    assert not pd.has_connector_metadata()
    assert pd.children["nixl"]._connector_metadata is None and pd.children["lmcache"]._connector_metadata is None


def test_handshake_metadata_comes_from_nixl() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    assert pd.get_handshake_metadata() == "nixl-handshake"


def test_get_finished_reports_each_request_once_after_all_awaited_children() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    pd.bind_connector_metadata(
        PdConnectorMetadata(
            children={"nixl": NixlConnectorMetadata(), "lmcache": "lm"},
            awaited_sends={"both": ("nixl", "lmcache"), "only-nixl": ("nixl",)},
        )
    )
    nixl_worker(pd).sending = {"both", "only-nixl"}
    nixl_worker(pd).recving = {"loaded"}
    assert pd.get_finished({"both", "only-nixl"}) == ({"only-nixl"}, {"loaded"})
    assert pd.get_finished(set()) == (None, None)
    lm_engine(pd).sending = {"both"}
    assert pd.get_finished(set()) == ({"both"}, None)
    assert pd.get_finished(set()) == (None, None)


def test_get_finished_ignores_report_from_child_that_did_not_delay() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    pd.bind_connector_metadata(
        PdConnectorMetadata(children={"nixl": NixlConnectorMetadata(), "lmcache": "lm"}, awaited_sends={"x": ("nixl",)})
    )
    lm_engine(pd).sending = {"x"}  # LMCache says "done" for a request only NIXL delayed
    assert pd.get_finished({"x"}) == (None, None)
    nixl_worker(pd).sending = {"x"}
    assert pd.get_finished(set()) == ({"x"}, None)


def test_load_errors_are_the_union_of_both_children() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    nixl_worker(pd).load_errors = {3, 4}
    lm_engine(pd).load_errors = {4, 9}
    assert pd.get_block_ids_with_load_errors() == {3, 4, 9}


def test_stats_from_both_sides_and_rebuild_after_serialisation() -> None:
    worker = make_connector(KVConnectorRole.WORKER)
    nixl_worker(worker).stats.record_failed_transfer()
    worker_stats = worker.get_kv_connector_stats()
    assert worker_stats is not None and set(worker_stats.data) == {"FakeNixlWorkerConnector"}

    sched = make_connector(KVConnectorRole.SCHEDULER)
    req = make_request("s1", 64)
    lm_engine(sched).hits["s1"] = 48
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, make_blocks([1, 2, 3]), 48)
    sched_stats = sched.get_kv_connector_stats()
    assert sched_stats is not None
    pd_stats = sched_stats.data[PD_STATS_KEY]
    assert pd_stats.data["lmcache_hit_tokens"] == 48 and pd_stats.data["lmcache_loads"] == 1
    assert sched.get_kv_connector_stats() is None  # reset after being taken

    # After msgspec/pickle across processes the logger gets {"name": {"data": {...}}}.
    serialised = {
        PD_STATS_KEY: {"data": dict(pd_stats.data)},
        "NixlPullConnector": {"data": worker_stats.data["FakeNixlWorkerConnector"].data},
    }
    rebuilt = PdConnector.build_kv_connector_stats(serialised)
    assert rebuilt is not None
    assert isinstance(rebuilt.data[PD_STATS_KEY], PdConnectorStats)
    assert isinstance(rebuilt.data["NixlPullConnector"], NixlKVConnectorStats)
    assert rebuilt.reduce()[PD_STATS_KEY]["lmcache_hit_tokens"] == 48


def test_prom_metrics_include_pdkit_counters_and_nixl() -> None:
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    config = VllmConfig(kv_transfer_config=pd_transfer_config(), device_config=DeviceConfig(device="cpu"))
    prom = PdConnector.build_prom_metrics(
        config, {Gauge: Gauge, Counter: Counter, Histogram: Histogram}, ["model_name", "engine"], {0: ["m", "0"]}
    )
    try:
        prom.observe({PD_STATS_KEY: {"data": {"lmcache_hit_tokens": 32, "lmcache_loads": 1}}}, 0)
        value = REGISTRY.get_sample_value("pdkit:lmcache_hit_tokens_total", {"model_name": "m", "engine": "0"})
        assert value == 32
        assert "FakeNixlWorkerConnector" in prom._children
    finally:
        for collector in list(REGISTRY._collector_to_names):
            names = REGISTRY._collector_to_names.get(collector, [])
            if any(n.startswith(("pdkit:", "vllm:nixl")) for n in names):
                REGISTRY.unregister(collector)


# ---------------------------------------------------------------- KV events
def test_lmcache_chunks_surface_as_cpu_kv_events() -> None:
    """``lmcache_events: raw``: worker collects LMCache's stored chunks; the scheduler side publishes them
    with medium CPU/DISK (the default, ``vllm``, is in tests/test_pd_connector_tiers.py)."""
    worker = make_connector(KVConnectorRole.WORKER, pd_transfer_config(lmcache_events="raw"))
    stored = [
        BlockStored(
            block_hashes=[11],
            parent_block_hash=None,
            token_ids=list(range(256)),
            block_size=256,
            lora_id=None,
            medium="cpu",
            lora_name=None,
        ),
        BlockStored(
            block_hashes=[12],
            parent_block_hash=11,
            token_ids=list(range(256)),
            block_size=256,
            lora_id=None,
            medium="LocalDiskBackend",
            lora_name=None,
        ),
    ]
    lm_engine(worker).kv_events = list(stored)
    events = worker.get_kv_connector_kv_cache_events()
    assert isinstance(events, LMCacheKVEvents)

    sched = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config(lmcache_events="raw"))
    sched.update_connector_output(KVConnectorOutput(kv_cache_events=events))
    published = list(sched.take_events())
    assert [(e.block_hashes, e.medium) for e in published] == [([11], "CPU"), ([12], "DISK")]
    assert list(sched.take_events()) == []


def test_update_connector_output_reaches_nixl() -> None:
    """NIXL stops lease heartbeats for requests whose pull finished (scheduler side, real NIXL)."""
    pd = make_connector(KVConnectorRole.SCHEDULER, pd_transfer_config("kv_consumer"))
    req = make_request("hb", 64, dict(DECODE_PARAMS))
    pd.on_new_request(req)
    nixl_sched = pd.children["nixl"].connector_scheduler
    assert "hb" in nixl_sched._heartbeat_req_engine
    pd.update_connector_output(KVConnectorOutput(finished_recving={"hb"}))
    assert "hb" not in nixl_sched._heartbeat_req_engine


def test_required_layout_is_nixls() -> None:
    config = VllmConfig(kv_transfer_config=pd_transfer_config(), device_config=DeviceConfig(device="cpu"))
    # No model config on this CPU test: NIXL then defers to vLLM's default (None); HND on GPU (see docs).
    assert PdConnector.get_required_kvcache_layout(config) is None
    assert PdConnector.requires_piecewise_for_cudagraph({"lmcache": {"use_layerwise": True}, **FAKE_CHILDREN}) is True


def test_handshake_metadata_reaches_nixl_side_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scheduler side: the workers' NIXL handshake payload is served on NIXL's real ZMQ side channel."""
    import socket

    import msgspec
    import zmq
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import GET_META_MSG, NixlHandshakePayload

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", str(port))
    pd = make_connector(KVConnectorRole.SCHEDULER)
    payload = NixlHandshakePayload(compatibility_hash="abc", agent_metadata_bytes=b"agent")
    try:
        pd.set_xfer_handshake_metadata_pp_aware({(0, 0): payload})
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(msgspec.msgpack.encode((GET_META_MSG, 0, 0)))
        assert sock.poll(10_000)
        reply, _ts = sock.recv_multipart()
        sock.close()
        ctx.term()
        got = msgspec.msgpack.decode(reply, type=NixlHandshakePayload)
        assert got.compatibility_hash == "abc" and got.agent_metadata_bytes == b"agent"
    finally:
        pd.shutdown()


def test_get_finished_both_children_in_one_step_reports_once() -> None:
    pd = make_connector(KVConnectorRole.WORKER)
    pd.bind_connector_metadata(
        PdConnectorMetadata(
            children={"nixl": NixlConnectorMetadata(), "lmcache": "lm"}, awaited_sends={"y": ("nixl", "lmcache")}
        )
    )
    nixl_worker(pd).sending = {"y"}
    lm_engine(pd).sending = {"y"}
    assert pd.get_finished({"y"}) == ({"y"}, None)
    nixl_worker(pd).sending = {"y"}  # a late duplicate must not free the blocks twice
    assert pd.get_finished(set()) == (None, None)
