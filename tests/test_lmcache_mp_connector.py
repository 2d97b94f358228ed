"""PdConnector over LMCache's multi-process connector, and the restore check (issue 16), on CPU.

Real: vLLM 0.26.0's config and factory, Request with vLLM's own block hasher, SchedulerOutput,
NewRequestData, KVConnectorOutput, KVCacheBlocks, NIXL's real scheduler side, the fingerprint kernels'
torch reference.  Stand-ins (named so): ``FakeLMCacheMPConnector`` for vLLM's LMCacheMPConnector (the
real one imports lmcache and moves KV through its GPU ``lmcache server``): it keeps LMCacheMPConnector's
observable contract read from vLLM 0.32/0.33's source -- ``request_finished`` returns ``(True, {})`` for a
request with transfer params (``(True, None)`` without) and the worker later reports it in
``finished_sending`` -- and its "server" is a dict of saved block tensors by vLLM block hash, which
``corrupt()`` damages the way LMCache#4492's restarted server does (wrong bytes, no error).  The paged
GPU KV cache is CPU tensors (``fake_paged_kv``).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from test_pd_connector import FAKE_CHILDREN, empty_scheduler_output, kv_cache_config, make_blocks  # noqa: E402
from test_pd_connector_verify import fake_paged_kv  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core import kv_cache_utils as kcu  # noqa: E402
from vllm.v1.core.sched.output import NewRequestData  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from pdkit.config import LMCacheConfig  # noqa: E402
from pdkit.connectors.pd_connector import PdConnector  # noqa: E402
from pdkit.connectors.pd_types import PD_STATS_KEY  # noqa: E402
from pdkit.kv_config import kv_transfer_dict  # noqa: E402

BLOCK = 16
PROMPT = 4 * BLOCK + 5  # 4 full blocks and a partial one


class FakeServer:
    """Stand-in for one ``lmcache server``'s store: saved blocks by vLLM block hash (per layer)."""

    def __init__(self) -> None:
        self.blocks: dict[Any, dict[str, torch.Tensor]] = {}

    def corrupt(self) -> None:
        """LMCache#4492's failure: after a server restart, restores return wrong bytes and no error."""
        for layers in self.blocks.values():
            for tensor in layers.values():
                tensor.add_(1.0)


SERVER = FakeServer()


class FakeMPMeta(KVConnectorMetadata):
    def __init__(self, loads: list[tuple[int, Any]], saves: list[tuple[int, Any]]) -> None:
        self.loads, self.saves = loads, saves


class FakeLMCacheMPConnector(KVConnectorBase_V1):
    """Stand-in for vLLM's LMCacheMPConnector (see the module docstring): synchronous loads, saves at the
    prompt's end, frees delayed until the worker reports the request (as the real one returns True)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        assert extra["lmcache.mp.host"] == "tcp://127.0.0.1" and isinstance(extra["lmcache.mp.port"], int)
        self._loads: list[tuple[int, Any]] = []
        self._saves: list[tuple[int, Any]] = []
        self._finished: set[str] = set()
        self.kv: dict[str, torch.Tensor] = {}

    # scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        hit = 0
        for block_hash in request.block_hashes:
            if block_hash not in SERVER.blocks:
                break
            hit += BLOCK
        return max(hit - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        ids = blocks.get_block_ids()[0]
        full = request.num_prompt_tokens // BLOCK
        for i in range(min(num_external_tokens // BLOCK, len(ids))):
            self._loads.append((ids[i], request.block_hashes[i]))
        self._saves += [(ids[i], request.block_hashes[i]) for i in range(full) if request.block_hashes[i] not in
                        SERVER.blocks]  # fmt: skip

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = FakeMPMeta(self._loads, self._saves)
        self._loads, self._saves = [], []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return True, ({} if request.kv_transfer_params is not None else None)

    # worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv = kv_caches

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FakeMPMeta)
        for block_id, block_hash in meta.loads:
            for name, tensor in self.kv.items():
                tensor[block_id] = SERVER.blocks[block_hash][name]

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FakeMPMeta)
        for block_id, block_hash in meta.saves:
            SERVER.blocks[block_hash] = {name: t[block_id].clone() for name, t in self.kv.items()}

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finished |= finished_req_ids
        out, self._finished = self._finished, set()
        return out or None, None


MP_CHILD = {"lmcache_connector": {"kv_connector": "FakeLMCacheMPConnector", "kv_connector_module_path": __name__}}


@pytest.fixture(autouse=True)
def _fresh_server() -> None:
    SERVER.blocks.clear()
    kcu.init_none_hash(sha256)  # what vLLM's engine does at start-up before any block hash


def pd_config(role: str) -> VllmConfig:
    """pdkit's own kv_transfer_dict for ``role`` in mp mode with verify_restores, children swapped for stand-ins."""
    lm = LMCacheConfig(mode="mp", verify_restores=True)
    fields = kv_transfer_dict(role, lm, vllm_version="0.33.0", lmcache_server_port=5910)  # type: ignore[arg-type]
    assert fields is not None and fields["kv_connector"] == "PdConnector"
    assert fields["kv_load_failure_policy"] == "recompute"  # a caught mismatch is recomputed, not failed
    extra = fields["kv_connector_extra_config"]
    assert extra["lmcache_connector"] == "LMCacheMPConnector" and extra["verify_restores"] is True
    extra.update(MP_CHILD if role == "agg" else {**FAKE_CHILDREN, **MP_CHILD})
    return VllmConfig(kv_transfer_config=KVTransferConfig(**fields), device_config=DeviceConfig(device="cpu"),
                      cache_config=CacheConfig(block_size=BLOCK))  # fmt: skip


class Engine:
    """One vLLM instance's two halves (scheduler and worker PdConnector) over one CPU KV cache."""

    def __init__(self, role: str = "agg") -> None:
        cfg = pd_config(role)
        self.kv = fake_paged_kv(seed=7)
        self.sched = KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kv_cache_config())
        self.worker = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kv_cache_config())
        assert isinstance(self.sched, PdConnector) and isinstance(self.worker, PdConnector)
        self.worker.register_kv_caches(self.kv)

    def step(self, rid: str, block_ids: list[int], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One prompt, one prefill step in vLLM 0.26.0's call order; returns what the step produced."""
        extra = {"kv_transfer_params": params} if params is not None else None
        req = Request(request_id=rid, prompt_token_ids=list(range(PROMPT)), pooling_params=None,
                      sampling_params=SamplingParams(max_tokens=1, extra_args=extra),
                      block_hasher=kcu.get_request_block_hasher(BLOCK, sha256))  # fmt: skip
        ext, load_async = self.sched.get_num_new_matched_tokens(req, 0)
        assert ext is not None and load_async is False
        self.sched.update_state_after_alloc(req, make_blocks(block_ids), ext)
        so = empty_scheduler_output()
        so.scheduled_new_reqs = [NewRequestData.from_request(req, (list(block_ids),))]
        so.num_scheduled_tokens = {rid: PROMPT - ext}
        so.total_num_scheduled_tokens = PROMPT - ext
        meta = self.sched.build_connector_meta(so)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)  # LMCache restores the prefix (synchronously)
        self.worker.wait_for_save()
        self.worker.get_finished(set())
        errors = self.worker.get_block_ids_with_load_errors()
        worker_meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
        req.num_computed_tokens = PROMPT
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        delay, out_params = self.sched.request_finished(req, list(block_ids))
        self.sched.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker_meta))
        return {"ext": ext, "errors": errors, "delay": delay, "params": out_params, "meta": meta}

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for half in (self.sched, self.worker):
            stats = half.get_kv_connector_stats()
            if stats is not None and PD_STATS_KEY in stats.data:
                for key, value in stats.data[PD_STATS_KEY].data.items():
                    out[key] = out.get(key, 0) + value
        return out


def test_agg_composes_lmcache_mp_alone_and_a_good_restore_passes() -> None:
    eng = Engine("agg")
    assert set(eng.sched.children) == {"lmcache"}  # "nixl": null -> LMCache only
    first = eng.step("r1", [3, 4, 5, 6, 7])
    assert first["ext"] == 0 and first["meta"].fingerprint_blocks == {"r1": [3, 4, 5, 6]}
    assert first["delay"] is True and first["params"] is None  # the MP child delays; no params invented
    second = eng.step("r2", [10, 11, 12, 13, 14])  # same prompt: LMCache restores 4 blocks
    assert second["ext"] == 4 * BLOCK
    assert second["meta"].restore_verify["r2"].local_block_ids == [10, 11, 12, 13]
    assert second["errors"] == set()
    assert torch.equal(eng.kv["model.layers.0.self_attn.attn"][10], eng.kv["model.layers.0.self_attn.attn"][3])
    counters = eng.counters()
    assert counters["lmcache_restore_checked_blocks"] == 4 and counters.get("lmcache_restore_mismatch_blocks", 0) == 0


def test_a_corrupted_restore_after_a_server_restart_is_caught_reported_and_counted() -> None:
    eng = Engine("agg")
    eng.step("r1", [3, 4, 5, 6, 7])
    SERVER.corrupt()  # LMCache#4492: the restarted server hands back wrong KV, HTTP 200, nothing logged
    hit = eng.step("r2", [10, 11, 12, 13, 14])
    assert hit["ext"] == 4 * BLOCK
    # Every restored block is reported as a load error: vLLM (kv_load_failure_policy=recompute) drops the
    # step's output for r2 and recomputes from the first bad block instead of answering from wrong KV.
    assert hit["errors"] == {10, 11, 12, 13}
    counters = eng.counters()
    assert counters["lmcache_restore_mismatch_blocks"] == 4 and counters["lmcache_restore_checked_blocks"] == 4


def test_a_restore_with_no_saved_fingerprint_is_counted_unverified() -> None:
    eng = Engine("agg")
    other = Engine("agg")  # another engine (e.g. before this one restarted) saved the prefix
    other.step("r0", [3, 4, 5, 6, 7])
    hit = eng.step("r1", [10, 11, 12, 13, 14])
    assert hit["ext"] == 4 * BLOCK and hit["errors"] == set() and not hit["meta"].restore_verify
    assert eng.counters()["lmcache_restore_unverified_blocks"] == 4


def test_prefill_composes_nixl_and_lmcache_mp_and_returns_only_nixls_params() -> None:
    eng = Engine("prefill")
    assert list(eng.sched.children) == ["nixl", "lmcache"]  # NIXL first
    assert type(eng.sched.children["lmcache"]).__name__ == "FakeLMCacheMPConnector"
    out = eng.step("p1", [3, 4, 5, 6, 7], params={"do_remote_decode": True})
    params = out["params"]
    # The MP child answered {} (as LMCacheMPConnector does); the merge keeps NIXL's params only.
    assert params is not None and params["do_remote_decode"] is False and params["remote_block_ids"]
    assert out["delay"] is True
    awaited = eng.sched.build_connector_meta(empty_scheduler_output()).awaited_sends
    assert set(awaited["p1"]) == {"nixl", "lmcache"}  # freed once, after both children reported it


def test_the_mp_connector_name_is_registered_in_the_installed_vllm() -> None:
    """Its class imports lmcache (absent in CI), so only the registry entry is checked here."""
    from pdkit.stack import plan_stack

    assert plan_stack().lmcache_mp_connector in KVConnectorFactory._registry
