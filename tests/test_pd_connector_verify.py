"""``verify_transfers`` (issue 9 item 2): prefill fingerprints its blocks, decode checks what NIXL delivered.

Real: vLLM 0.26.0's config/factory, Request, SchedulerOutput/NewRequestData/CachedRequestData,
KVConnectorOutput, KVCacheBlocks, NIXL's real *scheduler* side on both roles (its request_finished params,
its reqs_to_recv), the kernels' torch reference (``pdkit.kernels.fingerprint``, what runs on CPU tensors),
Prometheus counters, the JSON hop of kv_transfer_params.
Fakes of GPU-only pieces (named so): the paged KV cache is plain CPU torch tensors in vLLM's
FLASH_ATTN logical shape ``(num_blocks, heads, block_size, 2*head_size)``; NIXL's transfer is a tensor
copy of the prefill blocks into the decode blocks (``fake_nixl_read``) plus ``FakeNixlWorker`` reporting
``finished_recving``; LMCache's engine is ``FakeLMCacheEngine``.  The ordering of calls below is the one
vLLM 0.26.0's Scheduler.update_from_output uses: request_finished, then update_connector_output.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from test_pd_connector import (  # noqa: E402
    FAKE_CHILDREN,
    empty_scheduler_output,
    kv_cache_config,
    make_blocks,
    nixl_worker,
)
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

import pdkit.connectors.pd_worker as pd_worker_module  # noqa: E402
from pdkit.connectors.pd_connector import PdConnector  # noqa: E402
from pdkit.connectors.pd_types import PD_STATS_KEY, PdWorkerMetadata  # noqa: E402
from pdkit.connectors.pd_verify import FINGERPRINTS_KEY, INJECT_FAULT_ENV, expected_for_pull  # noqa: E402
from pdkit.kernels.fingerprint import reference_fingerprints  # noqa: E402

BLOCK = 16
NUM_BLOCKS = 32
PROMPT = 5 * BLOCK - 11  # 5 blocks, the last one partial
P_BLOCKS = [3, 4, 5, 6, 7]
D_BLOCKS = [20, 21, 22, 23, 24]


@pytest.fixture(autouse=True)
def _no_fault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INJECT_FAULT_ENV, raising=False)


def fake_paged_kv(seed: int | None, layers: int = 2, heads: int = 2) -> dict[str, torch.Tensor]:
    """Fake of the GPU paged KV cache: CPU bf16 tensors, FLASH_ATTN/HND logical shape, random or zero."""
    out = {}
    for i in range(layers):
        shape = (NUM_BLOCKS, heads, BLOCK, 16)
        if seed is None:
            out[f"model.layers.{i}.self_attn.attn"] = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            gen = torch.Generator().manual_seed(seed + i)
            out[f"model.layers.{i}.self_attn.attn"] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    return out


def fake_nixl_read(src: dict[str, torch.Tensor], src_ids: list[int], dst: dict[str, torch.Tensor],
                   dst_ids: list[int]) -> None:  # fmt: skip
    """Fake of NIXL's RDMA read: copy the prefill blocks into the decode blocks, layer by layer."""
    for name, tensor in dst.items():
        tensor[dst_ids] = src[name][src_ids]


def config(role: str, lmcache: dict[str, Any] | None, **extra: Any) -> VllmConfig:
    ktc = KVTransferConfig(
        kv_connector="PdConnector",
        kv_connector_module_path="pdkit.connectors.pd_connector",
        kv_role=role,  # type: ignore[arg-type]
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "nixl": {"backends": ["UCX"]},
            "lmcache": lmcache,
            "verify_transfers": True,
            **FAKE_CHILDREN,
            **extra,
        },  # fmt: skip
    )
    return VllmConfig(kv_transfer_config=ktc, device_config=DeviceConfig(device="cpu"),
                      cache_config=CacheConfig(block_size=BLOCK))  # fmt: skip


def make(role: KVConnectorRole, cfg: VllmConfig, kv: dict[str, torch.Tensor] | None = None) -> PdConnector:
    pd = KVConnectorFactory.create_connector(cfg, role, kv_cache_config())
    assert isinstance(pd, PdConnector)
    if kv is not None:
        pd.register_kv_caches(kv)
    return pd


PUSH_CHILD = {
    "nixl_connector": {"kv_connector": "FakeNixlPushWorkerConnector", "kv_connector_module_path": "test_pd_connector"}
}


def decode_request(rid: str, wire: dict[str, Any]) -> Request:
    """The decode hop's request: the prompt again, with the params prefill returned (after JSON)."""
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(PROMPT)),
        pooling_params=None,
        sampling_params=SamplingParams(max_tokens=8, extra_args={"kv_transfer_params": wire}),
    )


class Pair:
    """One prefill (PdConnector: NIXL producer + LMCache) and one decode (PdConnector, NIXL only).

    ``push``: both sides' NIXL child is (the fake-worker form of) NixlPushConnector instead of the pull one.
    """

    def __init__(self, p_kv: dict[str, torch.Tensor] | None = None, d_kv: dict[str, torch.Tensor] | None = None,
                 push: bool = False):  # fmt: skip
        self.p_kv = p_kv if p_kv is not None else fake_paged_kv(seed=1)
        self.d_kv = d_kv if d_kv is not None else fake_paged_kv(seed=None)
        extra = PUSH_CHILD if push else {}
        self.p_sched = make(KVConnectorRole.SCHEDULER, config("kv_producer", {}, **extra))
        self.p_worker = make(KVConnectorRole.WORKER, config("kv_producer", {}, **extra), self.p_kv)
        self.d_sched = make(KVConnectorRole.SCHEDULER, config("kv_consumer", None, **extra))
        self.d_worker = make(KVConnectorRole.WORKER, config("kv_consumer", None, **extra), self.d_kv)

    def prefill(self, rid: str = "r1") -> dict[str, Any]:
        """One prefill step of a max_tokens=1 request, in vLLM 0.26.0's call order; returns the params."""
        req = Request(request_id=rid, prompt_token_ids=list(range(PROMPT)), pooling_params=None,
                      sampling_params=SamplingParams(max_tokens=1, extra_args={
                          "kv_transfer_params": {"do_remote_decode": True}}))  # fmt: skip
        assert self.p_sched.get_num_new_matched_tokens(req, 0) == (0, False)
        self.p_sched.update_state_after_alloc(req, make_blocks(P_BLOCKS), 0)
        so = empty_scheduler_output()
        so.scheduled_new_reqs = [NewRequestData.from_request(req, (list(P_BLOCKS),))]
        so.num_scheduled_tokens = {rid: PROMPT}
        so.total_num_scheduled_tokens = PROMPT
        meta = self.p_sched.build_connector_meta(so)
        assert meta.fingerprint_blocks == {rid: P_BLOCKS}
        # Worker: bind, (forward writes the KV: here it is already in the fake cache), then the outputs.
        self.p_worker.bind_connector_metadata(meta)
        self.p_worker.get_finished(set())
        worker_meta = self.p_worker.build_connector_worker_meta()
        self.p_worker.clear_connector_metadata()
        # Scheduler.update_from_output: the request stops -> request_finished ... then update_connector_output.
        req.num_computed_tokens = PROMPT
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        delay, params = self.p_sched.request_finished(req, list(P_BLOCKS))
        assert delay is True and params is not None
        assert FINGERPRINTS_KEY not in params  # not yet: the worker's values arrive just after
        self.p_sched.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker_meta))
        return params  # the same dict object vLLM serialises after update_from_output returns

    def decode(self, params: dict[str, Any], rid: str = "d1", corrupt: int | None = None,
               local: list[int] | None = None) -> tuple[set[str] | None, set[int]]:  # fmt: skip
        """Receive on decode (pull, or push); ``corrupt``: flip a bit of that decode block after the fake transfer."""
        wire = json.loads(json.dumps(params))  # the HTTP hop through the frontend
        sent = list(wire["remote_block_ids"][0])  # (push mode's scheduler empties the field in place)
        local = local if local is not None else list(D_BLOCKS)
        req = decode_request(rid, wire)
        n_cached = (len(P_BLOCKS) - len(local)) * BLOCK  # a local prefix hit of whole blocks
        tokens, load_async = self.d_sched.get_num_new_matched_tokens(req, n_cached)
        assert tokens and load_async is True
        self.d_sched.update_state_after_alloc(req, make_blocks(local), tokens)
        meta = self.d_sched.build_connector_meta(empty_scheduler_output())
        assert rid in meta.verify and meta.verify[rid].local_block_ids == local
        fake_nixl_read(self.p_kv, sent[-len(local) :], self.d_kv, local)
        if corrupt is not None:
            self.d_kv["model.layers.1.self_attn.attn"][corrupt, 1, 3, 5] += 1.0
        self.d_worker.bind_connector_metadata(meta)
        self.d_worker.start_load_kv(None)
        nixl_worker(self.d_worker).recving = {rid}  # NIXL: the read is complete
        _, recving = self.d_worker.get_finished(set())
        errors = self.d_worker.get_block_ids_with_load_errors()
        self.d_worker.clear_connector_metadata()
        return recving, errors

    def worker_counters(self) -> dict[str, int]:
        stats = self.d_worker.get_kv_connector_stats()
        return dict(stats.data[PD_STATS_KEY].data) if stats is not None and PD_STATS_KEY in stats.data else {}


def test_prefill_attaches_reference_fingerprints_in_nixl_block_order() -> None:
    pair = Pair()
    params = pair.prefill()
    payload = params[FINGERPRINTS_KEY]
    assert payload["v"] == 1 and payload["block_size"] == BLOCK
    assert list(params["remote_block_ids"][0]) == P_BLOCKS
    assert payload["ranks"] == {"0": reference_fingerprints(pair.p_kv, P_BLOCKS).tolist()}
    json.dumps(params)  # wire-safe
    stats = pair.p_worker.get_kv_connector_stats()  # what fingerprinting cost, for pdkit:kv_fingerprint_seconds
    assert stats is not None
    cost = stats.data[PD_STATS_KEY].data
    assert cost["kv_fingerprint_requests"] == 1 and cost["kv_fingerprint_us"] > 0


def test_clean_transfer_reports_nothing_and_counts_checked_blocks() -> None:
    pair = Pair()
    recving, errors = pair.decode(pair.prefill())
    assert recving == {"d1"} and errors == set()
    counters = pair.worker_counters()
    assert counters["kv_verify_checked_blocks"] == 5 and counters["kv_verify_mismatch_blocks"] == 0
    assert counters["kv_verify_requests"] == 1 and counters["kv_verify_us"] > 0
    assert pair.worker_counters().get("kv_verify_requests", 0) == 0  # drained: each step reports only its own work


def test_corrupted_block_is_reported_as_load_error_and_counted() -> None:
    pair = Pair()
    recving, errors = pair.decode(pair.prefill(), corrupt=22)
    assert recving == {"d1"}  # reported done, so vLLM looks at the errors for this async load
    assert errors == {22}
    assert pair.d_worker.get_block_ids_with_load_errors() == set()  # reported once
    counters = pair.worker_counters()
    assert counters["kv_verify_checked_blocks"] == 5 and counters["kv_verify_mismatch_blocks"] == 1


@pytest.mark.parametrize("corrupt", [None, 22])
def test_push_mode_carries_fingerprints_and_checks_the_written_blocks(corrupt: int | None) -> None:
    """nixl.mode: push (prefill WRITEs into the blocks decode registered): the same params carry the
    fingerprints, decode plans the check from NixlPushConnector's own reqs_to_recv and catches a bad block."""
    pair = Pair(push=True)
    params = pair.prefill()
    assert params[FINGERPRINTS_KEY]["ranks"]["0"] == reference_fingerprints(pair.p_kv, P_BLOCKS).tolist()
    recving, errors = pair.decode(params, corrupt=corrupt)
    assert recving == {"d1"}
    assert errors == (set() if corrupt is None else {corrupt})
    assert pair.worker_counters()["kv_verify_checked_blocks"] == 5


def test_local_prefix_hit_checks_only_the_pulled_tail() -> None:
    """Decode already had the first 2 blocks: NIXL reads the last 3 remote blocks into 3 local ones."""
    pair = Pair()
    params = pair.prefill()
    assert expected_for_pull(params[FINGERPRINTS_KEY], [7, 8, 9], BLOCK) == {
        "0": params[FINGERPRINTS_KEY]["ranks"]["0"][-3:]
    }
    recving, errors = pair.decode(params, local=[30, 31, 29], corrupt=31)
    assert errors == {31}
    assert pair.worker_counters()["kv_verify_checked_blocks"] == 3


def test_fault_injection_env_corrupts_one_received_block_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_FAULT_ENV, "1")  # read by the decode worker when it registers its caches
    pair = Pair()
    _, errors = pair.decode(pair.prefill("r1"), rid="d1")
    assert errors == {D_BLOCKS[len(D_BLOCKS) // 2]}
    _, errors = pair.decode(pair.prefill("r2"), rid="d2")
    assert errors == set()  # budget of 1 spent
    assert pair.worker_counters()["kv_verify_mismatch_blocks"] == 1


def test_tp2_one_list_per_rank_each_rank_checks_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two prefill ranks (each its own heads) -> aggregated per-rank lists -> decode rank 1 checks its list."""
    pair = Pair()  # rank "0" everywhere
    rank1_p = fake_paged_kv(seed=50)
    rank1_d = fake_paged_kv(seed=None)
    monkeypatch.setattr(pd_worker_module, "rank_key", lambda: "1")  # the worker half asks for its rank
    p_worker1 = make(KVConnectorRole.WORKER, config("kv_producer", {}), rank1_p)
    d_worker1 = make(KVConnectorRole.WORKER, config("kv_consumer", None), rank1_d)

    original = pair.p_worker.build_connector_worker_meta

    def both_ranks() -> Any:
        # KVOutputAggregator folds the ranks' worker metadata with .aggregate, as here.
        mine = original()
        other = p_worker1.build_connector_worker_meta()
        assert isinstance(mine, PdWorkerMetadata) and isinstance(other, PdWorkerMetadata)
        return mine.aggregate(other)

    original_bind = pair.p_worker.bind_connector_metadata

    def bind_both(meta: Any) -> None:
        original_bind(meta)
        p_worker1.bind_connector_metadata(meta)

    pair.p_worker.bind_connector_metadata = bind_both  # type: ignore[method-assign,assignment,unused-ignore]
    pair.p_worker.build_connector_worker_meta = both_ranks  # type: ignore[method-assign,assignment,unused-ignore]
    params = pair.prefill()
    ranks = params[FINGERPRINTS_KEY]["ranks"]
    assert ranks == {"0": reference_fingerprints(pair.p_kv, P_BLOCKS).tolist(),
                     "1": reference_fingerprints(rank1_p, P_BLOCKS).tolist()}  # fmt: skip
    assert ranks["0"] != ranks["1"]

    # Decode rank 1 receives rank 1's heads; one of them is corrupted.
    meta = None
    wire = json.loads(json.dumps(params))
    req = decode_request("d1", wire)
    tokens, _ = pair.d_sched.get_num_new_matched_tokens(req, 0)
    pair.d_sched.update_state_after_alloc(req, make_blocks(D_BLOCKS), tokens)
    meta = pair.d_sched.build_connector_meta(empty_scheduler_output())
    fake_nixl_read(rank1_p, P_BLOCKS, rank1_d, D_BLOCKS)
    rank1_d["model.layers.0.self_attn.attn"][D_BLOCKS[0], 0, 0, 0] += 1.0
    d_worker1.bind_connector_metadata(meta)
    nixl_worker(d_worker1).recving = {"d1"}
    d_worker1.get_finished(set())
    assert d_worker1.get_block_ids_with_load_errors() == {D_BLOCKS[0]}


def test_fingerprints_arriving_before_request_finished_are_attached_directly() -> None:
    """A do_remote_decode request that outlives its prompt step: values first, request_finished later."""
    pair = Pair()
    rid = "long"
    req = Request(request_id=rid, prompt_token_ids=list(range(PROMPT)), pooling_params=None,
                  sampling_params=SamplingParams(max_tokens=4, extra_args={
                      "kv_transfer_params": {"do_remote_decode": True}}))  # fmt: skip
    pair.p_sched.update_state_after_alloc(req, make_blocks(P_BLOCKS[:2]), 0)
    # Chunked prefill: 32 tokens, then the rest with 3 new blocks (a cached request).
    so = empty_scheduler_output()
    so.scheduled_new_reqs = [NewRequestData.from_request(req, (P_BLOCKS[:2],))]
    so.num_scheduled_tokens = {rid: 32}
    assert pair.p_sched.build_connector_meta(so).fingerprint_blocks == {}
    req.num_computed_tokens = 32
    so2 = empty_scheduler_output()
    so2.scheduled_cached_reqs = CachedRequestData(
        req_ids=[rid], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
        new_block_ids=[(P_BLOCKS[2:],)], num_computed_tokens=[32], num_output_tokens=[0])  # fmt: skip
    so2.num_scheduled_tokens = {rid: PROMPT - 32}
    meta = pair.p_sched.build_connector_meta(so2)
    assert meta.fingerprint_blocks == {rid: P_BLOCKS}
    pair.p_worker.bind_connector_metadata(meta)
    worker_meta = pair.p_worker.build_connector_worker_meta()
    pair.p_sched.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker_meta))
    req.num_computed_tokens = PROMPT + 3
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    _, params = pair.p_sched.request_finished(req, list(P_BLOCKS))
    assert params is not None
    assert params[FINGERPRINTS_KEY]["ranks"]["0"] == reference_fingerprints(pair.p_kv, P_BLOCKS).tolist()


def test_params_without_fingerprints_are_counted_and_decode_skips_the_check() -> None:
    pair = Pair()
    req = Request(request_id="nofp", prompt_token_ids=list(range(PROMPT)), pooling_params=None,
                  sampling_params=SamplingParams(max_tokens=1, extra_args={
                      "kv_transfer_params": {"do_remote_decode": True}}))  # fmt: skip
    pair.p_sched.update_state_after_alloc(req, make_blocks(P_BLOCKS), 0)
    req.num_computed_tokens = PROMPT
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    _, params = pair.p_sched.request_finished(req, list(P_BLOCKS))
    pair.p_sched.update_connector_output(KVConnectorOutput())  # the worker sent nothing
    assert params is not None and FINGERPRINTS_KEY not in params
    stats = pair.p_sched.get_kv_connector_stats()
    assert stats is not None and stats.data[PD_STATS_KEY].data["kv_verify_unsent"] == 1
    wire = json.loads(json.dumps(params))
    dreq = decode_request("d-nofp", wire)
    tokens, _ = pair.d_sched.get_num_new_matched_tokens(dreq, 0)
    pair.d_sched.update_state_after_alloc(dreq, make_blocks(D_BLOCKS), tokens)
    assert pair.d_sched.build_connector_meta(empty_scheduler_output()).verify == {}


def test_verify_keeps_per_layer_kv_and_prom_counters() -> None:
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    pair = Pair()
    assert pair.d_worker.prefer_cross_layer_blocks is False
    pair.decode(pair.prefill(), corrupt=20)
    stats = pair.d_worker.get_kv_connector_stats()
    assert stats is not None
    cfg = config("kv_consumer", None)
    prom = PdConnector.build_prom_metrics(
        cfg, {Gauge: Gauge, Counter: Counter, Histogram: Histogram}, ["model_name", "engine"], {0: ["m", "0"]}
    )
    try:
        prom.observe({PD_STATS_KEY: {"data": dict(stats.data[PD_STATS_KEY].data)}}, 0)
        labels = {"model_name": "m", "engine": "0"}
        assert REGISTRY.get_sample_value("pdkit:kv_verify_mismatch_blocks_total", labels) == 1
        assert REGISTRY.get_sample_value("pdkit:kv_verify_checked_blocks_total", labels) == 5
        assert REGISTRY.get_sample_value("pdkit:kv_verify_requests_total", labels) == 1
        seconds = REGISTRY.get_sample_value("pdkit:kv_verify_seconds_total", labels)
        assert seconds == pytest.approx(stats.data[PD_STATS_KEY].data["kv_verify_us"] / 1e6) and seconds > 0
    finally:
        for collector in list(REGISTRY._collector_to_names):
            names = REGISTRY._collector_to_names.get(collector, [])
            if any(n.startswith(("pdkit:", "vllm:nixl")) for n in names):
                REGISTRY.unregister(collector)
