"""PdConnector inside vLLM 0.26.0's real ``Scheduler`` on CPU (schedule → worker → update_from_output).

Why this file: two features depend on *where* vLLM calls the connector, not only on what it does:

* LMCache tiers as vLLM-hash KV events must be taken by ``Scheduler.update_from_output`` (it calls the
  scheduler-side connector's ``take_events`` and hands the batch to its KV-event publisher);
* ``verify_transfers`` fills the fingerprints into the params that ``request_finished`` returned, in the
  ``update_connector_output`` call of the same ``update_from_output``; the values must be in the
  ``EngineCoreOutput`` the scheduler returns.

Real: Scheduler, KVCacheManager, the embedded model's ModelConfig, SchedulerConfig, CacheConfig
(prefix caching on, sha256, PYTHONHASHSEED), KVEventsConfig and the publisher object vLLM creates
(its ``publish`` is spied on, then called through), NIXL's scheduler side.
Fakes of GPU-only pieces (named so): the worker-side connector runs in-process over CPU tensors standing
in for the paged KV cache, the model runner output is built by hand (one sampled token), LMCache's
engine and NIXL's worker are the ``Fake*`` classes of test_pd_connector.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_pd_connector import FAKE_CHILDREN  # noqa: E402
from test_pd_connector_verify import fake_paged_kv  # noqa: E402
from vllm.config import KVEventsConfig, KVTransferConfig  # noqa: E402
from vllm.distributed.kv_events import BlockStored  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core import kv_cache_utils as kcu  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm_scheduler import real_scheduler, seed_block_hashing  # noqa: E402

from pdkit.connectors.pd_connector import PdConnector, PdConnectorMetadata  # noqa: E402
from pdkit.connectors.pd_verify import FINGERPRINTS_KEY  # noqa: E402
from pdkit.kernels.fingerprint import reference_fingerprints  # noqa: E402
from pdkit.routing.block_hash import BlockHasher  # noqa: E402

SEED = "5"
BLOCK = 16
NUM_BLOCKS = 32  # = fake_paged_kv's block count


@pytest.fixture(autouse=True)
def _seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    seed_block_hashing(monkeypatch, SEED)


def build(extra: dict[str, Any], role: str = "kv_producer") -> tuple[Scheduler, PdConnector, list[Any]]:
    """A real Scheduler with PdConnector; returns it, a worker-side PdConnector, the published batches."""
    ktc = KVTransferConfig(
        kv_connector="PdConnector",
        kv_connector_module_path="pdkit.connectors.pd_connector",
        kv_role=role,
        kv_load_failure_policy="recompute",  # type: ignore[arg-type]
        kv_connector_extra_config={"nixl": {"backends": ["UCX"]}, **FAKE_CHILDREN, **extra},
    )
    scheduler, config, kv_config = real_scheduler(
        block_size=BLOCK,
        num_blocks=NUM_BLOCKS,
        max_model_len=512,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"),
        kv_transfer_config=ktc,
    )
    assert isinstance(scheduler.connector, PdConnector)
    published: list[Any] = []
    real_publish = scheduler.kv_event_publisher.publish

    def spy(batch: Any) -> None:
        published.append(batch)
        real_publish(batch)

    scheduler.kv_event_publisher.publish = spy  # type: ignore[method-assign,assignment]
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_config)
    assert isinstance(worker, PdConnector)
    return scheduler, worker, published


def prefill_request(rid: str, n_tokens: int) -> Request:
    return Request(request_id=rid, prompt_token_ids=[(7 * i) % 1000 + 3 for i in range(n_tokens)],
                   sampling_params=SamplingParams(max_tokens=1, min_tokens=1, extra_args={
                       "kv_transfer_params": {"do_remote_decode": True}}), pooling_params=None,
                   block_hasher=kcu.get_request_block_hasher(BLOCK, sha256))  # fmt: skip


def one_step(scheduler: Scheduler, worker: PdConnector) -> Any:
    """schedule → (fake) model runner with the worker-side connector calls → update_from_output."""
    so = scheduler.schedule()
    worker.bind_connector_metadata(so.kv_connector_metadata)
    worker.start_load_kv(None)
    worker.wait_for_save()
    from vllm.v1.outputs import KVConnectorOutput

    kv_out = KVConnectorOutput()
    kv_out.finished_sending, kv_out.finished_recving = worker.get_finished(so.finished_req_ids)
    kv_out.invalid_block_ids = worker.get_block_ids_with_load_errors()
    kv_out.kv_cache_events = worker.get_kv_connector_kv_cache_events()
    kv_out.kv_connector_worker_meta = worker.build_connector_worker_meta()
    worker.clear_connector_metadata()
    rids = list(so.num_scheduled_tokens)
    mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                            sampled_token_ids=[[42] for _ in rids], kv_connector_output=kv_out)  # fmt: skip
    return so, scheduler.update_from_output(so, mro)


def test_fingerprints_reach_the_engine_core_output_of_the_finishing_step() -> None:
    scheduler, worker, _ = build({"lmcache": {}, "verify_transfers": True, "lmcache_events": "off"})
    kv = fake_paged_kv(seed=3, layers=1)
    worker.register_kv_caches(kv)
    req = prefill_request("v1", 5 * BLOCK - 3)
    scheduler.add_request(req)
    so, outputs = one_step(scheduler, worker)
    (out,) = outputs[0].outputs
    params = out.kv_transfer_params
    assert params is not None and params["do_remote_prefill"] is True
    blocks = list(params["remote_block_ids"][0])
    assert len(blocks) == 5
    assert params[FINGERPRINTS_KEY]["ranks"] == {"0": reference_fingerprints(kv, blocks).tolist()}


def test_lmcache_tier_events_are_published_by_the_scheduler_next_to_gpu_events() -> None:
    scheduler, worker, published = build({"lmcache": {"lmcache.chunk_size": 64}})
    req = prefill_request("t1", 150)
    scheduler.add_request(req)
    one_step(scheduler, worker)
    events = [e for batch in published for e in batch.events if isinstance(e, BlockStored)]
    by_medium = {e.medium: e.block_hashes for e in events}
    assert req.prompt_token_ids is not None
    router = BlockHasher(BLOCK, "sha256", SEED).event_hashes(req.prompt_token_ids)
    assert by_medium["GPU"] == router[: 150 // BLOCK]  # vLLM's own prefix-cache event
    assert by_medium["CPU"] == router[: 128 // BLOCK]  # LMCache holds 2 whole chunks of 64: same hashes


def test_decode_mismatch_makes_the_real_scheduler_recompute_from_the_bad_block() -> None:
    """Decode (PdConnector NIXL-only, kv_load_failure_policy=recompute): a corrupted received block is
    reported by verification and vLLM's scheduler recomputes the prompt from that block on."""
    ktc_extra = {"lmcache": None, "verify_transfers": True}
    scheduler, worker, _ = build(ktc_extra, role="kv_consumer")
    assert scheduler.recompute_kv_load_failures is True
    p_kv, d_kv = fake_paged_kv(seed=9, layers=1), fake_paged_kv(seed=None, layers=1)
    worker.register_kv_caches(d_kv)
    p_blocks = [3, 4, 5, 6, 7]
    n_tokens = 5 * BLOCK - 3
    params = {"do_remote_prefill": True, "remote_block_ids": [p_blocks], "remote_engine_id": "prefill-engine",
              "remote_request_id": "p-1", "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1,
              "remote_num_tokens": n_tokens,
              FINGERPRINTS_KEY: {"v": 1, "block_size": BLOCK,
                                 "ranks": {"0": reference_fingerprints(p_kv, p_blocks).tolist()}}}  # fmt: skip
    req = Request(request_id="d1", prompt_token_ids=[(5 * i) % 900 + 3 for i in range(n_tokens)],
                  sampling_params=SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params}),
                  pooling_params=None, block_hasher=kcu.get_request_block_hasher(BLOCK, sha256))  # fmt: skip
    scheduler.add_request(req)

    so = scheduler.schedule()  # NIXL takes the request: it waits for its remote KV
    assert so.num_scheduled_tokens == {}
    meta = so.kv_connector_metadata
    assert isinstance(meta, PdConnectorMetadata)
    spec = meta.verify["d1"]
    local = spec.local_block_ids
    assert len(local) == 5
    worker.bind_connector_metadata(meta)
    for name, tensor in d_kv.items():  # fake of NIXL's read
        tensor[local] = p_kv[name][p_blocks]
    d_kv["model.layers.0.self_attn.attn"][local[2], 1, 7, 3] += 1.0  # one corrupted received block
    from test_pd_connector import nixl_worker
    from vllm.v1.outputs import KVConnectorOutput

    nixl_worker(worker).recving = {"d1"}
    kv_out = KVConnectorOutput()
    kv_out.finished_sending, kv_out.finished_recving = worker.get_finished(set())
    kv_out.invalid_block_ids = worker.get_block_ids_with_load_errors()
    assert kv_out.invalid_block_ids == {local[2]}
    worker.clear_connector_metadata()
    scheduler.update_from_output(so, ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=kv_out))
    assert req.num_computed_tokens == 2 * BLOCK  # truncated at the first bad block

    so = scheduler.schedule()
    assert so.num_scheduled_tokens == {"d1": n_tokens - 2 * BLOCK}  # recomputes blocks 2..4, keeps 0..1
