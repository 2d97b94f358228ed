"""LMCache tiers announced in vLLM's block-hash space (connectors/lmcache_tiers.py), end to end on CPU.

Real: vLLM 0.26.0's Request with its own block hasher (sha256, PYTHONHASHSEED), VllmConfig, the factory,
LMCacheConnectorV1's forwarding of LMCache's KV events from worker to scheduler, vLLM's KVEventBatch
encoded with msgspec as vLLM's ZMQ publisher does, pdkit's wire decoder, KvIndex, KvAwarePolicy and the
embedded model's tokenizer.  Fake (named so): the LMCache engine (``FakeLMCacheEngine`` from
test_pd_connector; the real one needs a GPU and the lmcache package).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import msgspec  # noqa: E402
from test_kv_aware import ctx, worker  # noqa: E402
from test_pd_connector import FAKE_CHILDREN, lm_engine  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheKVEvents  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core import kv_cache_utils as kcu  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm_scheduler import seed_block_hashing  # noqa: E402

from pdkit.connectors.lmcache_tiers import LMCacheTierSettings  # noqa: E402
from pdkit.connectors.pd_connector import PdConnector  # noqa: E402
from pdkit.model_files import default_model_dir  # noqa: E402
from pdkit.prompt_tokens import PromptTokenizer  # noqa: E402
from pdkit.routing import kv_events as ke  # noqa: E402
from pdkit.routing.block_hash import BlockHasher  # noqa: E402
from pdkit.routing.kv_aware import KvAwarePolicy  # noqa: E402
from pdkit.routing.kv_index import KvIndex  # noqa: E402

SEED = "7"
BLOCK = 16
CHUNK = 64
PROMPT = "the quick brown fox jumps over the lazy dog while the router keeps score, " * 11


@pytest.fixture(autouse=True)
def _seeded_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    seed_block_hashing(monkeypatch, SEED)


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(default_model_dir())


def connector(role: KVConnectorRole, lmcache: dict[str, Any], **extra: Any) -> PdConnector:
    ktc = KVTransferConfig(
        kv_connector="PdConnector",
        kv_connector_module_path="pdkit.connectors.pd_connector",
        kv_role="kv_producer",
        kv_connector_extra_config={"nixl": {"backends": ["UCX"]}, "lmcache": lmcache, **FAKE_CHILDREN, **extra},
    )
    config = VllmConfig(kv_transfer_config=ktc, device_config=DeviceConfig(device="cpu"),
                        cache_config=CacheConfig(block_size=BLOCK))  # fmt: skip
    from test_pd_connector import kv_cache_config

    pd = KVConnectorFactory.create_connector(config, role, kv_cache_config())
    assert isinstance(pd, PdConnector)
    return pd


def finished_prefill(rid: str, ids: list[int]) -> Request:
    """A real vLLM request with vLLM's own block hashes, finished after its one prefill step."""
    req = Request(
        request_id=rid,
        prompt_token_ids=ids,
        sampling_params=SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}}),
        pooling_params=None,
        block_hasher=kcu.get_request_block_hasher(BLOCK, sha256),
    )
    req.num_computed_tokens = len(ids)
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    return req


def to_index(events: list[Any], idx: KvIndex, wid: str = "p0") -> None:
    """vLLM's batch, msgpack-encoded as its ZMQ publisher sends it, decoded by the frontend's wire code."""
    payload = msgspec.msgpack.Encoder().encode(KVEventBatch(ts=time.time(), events=events))
    if not idx.has_worker(wid):
        idx.add_worker(wid)
    idx.apply(wid, ke.decode_batch(payload))


def test_stored_prefix_announced_with_vllm_block_hashes_and_predicted_as_cpu_hit(tok: PromptTokenizer) -> None:
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    assert len(ids) > 2 * CHUNK and len(ids) % CHUNK != 0
    pd = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK})
    req = finished_prefill("p1", ids)
    pd.request_finished(req, list(range(len(ids) // BLOCK + 1)))
    events = list(pd.take_events())
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    ev = events[0]
    n_blocks = (len(ids) // CHUNK * CHUNK) // BLOCK  # whole LMCache chunks only, full vLLM blocks of them
    expected = [kcu.maybe_convert_block_hash(h) for h in req.block_hashes[:n_blocks]]
    assert ev.block_hashes == expected
    assert ev.block_hashes == BlockHasher(BLOCK, "sha256", SEED).event_hashes(ids)[:n_blocks]  # the router's own
    assert (ev.parent_block_hash, ev.block_size, ev.medium) == (None, BLOCK, "CPU")
    assert ev.token_ids == ids[: n_blocks * BLOCK]
    assert list(pd.take_events()) == []

    idx = KvIndex()
    to_index(events, idx)
    assert idx.size("p0")["CPU"] == n_blocks and idx.size("p0")["GPU"] == 0
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED, block_size=BLOCK)
    score = policy.score(worker("p0"), ctx({"prompt": PROMPT}))
    assert score.hit_blocks == n_blocks and score.tier_blocks == {"GPU": 0, "CPU": n_blocks, "DISK": 0}
    assert score.weighted == pytest.approx(0.8 * n_blocks)


def test_save_unfull_chunk_announces_every_full_block(tok: PromptTokenizer) -> None:
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    pd = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK, "lmcache.save_unfull_chunk": True})
    req = finished_prefill("p2", ids)
    pd.request_finished(req, [])
    (ev,) = list(pd.take_events())
    assert len(ev.block_hashes) == len(ids) // BLOCK == len(req.block_hashes)


def test_short_prompt_below_one_chunk_announces_nothing() -> None:
    pd = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK})
    pd.request_finished(finished_prefill("p3", list(range(100, 100 + CHUNK - 1))), [])
    assert list(pd.take_events()) == []


def chunk_event(ids: list[int], k: int, chunk_hash: int, parent: int | None, medium: str) -> BlockStored:
    """An LMCache stored-chunk event: its own opaque chunk hash, the chunk's tokens, the previous chunk."""
    return BlockStored(block_hashes=[chunk_hash], parent_block_hash=parent,
                       token_ids=ids[k * CHUNK : (k + 1) * CHUNK], block_size=CHUNK, lora_id=None,
                       medium=medium, lora_name=None)  # fmt: skip


def test_lmcache_write_through_to_disk_announced_in_vllm_hashes(tok: PromptTokenizer) -> None:
    """Stored-chunk events flow worker -> scheduler through vLLM's LMCacheConnectorV1 and are correlated
    (tokens + parent chain) with the announced prefix: a chunk LMCache also put on disk becomes DISK."""
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    sched = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK})
    worker_side = connector(KVConnectorRole.WORKER, {"lmcache.chunk_size": CHUNK})
    sched.request_finished(finished_prefill("p4", ids), [])
    hashes = list(sched.take_events())[0].block_hashes
    per_chunk = CHUNK // BLOCK
    lm_engine(worker_side).kv_events = [
        chunk_event(ids, 0, 9001, None, "LocalCPUBackend"),
        chunk_event(ids, 1, 9002, 9001, "LocalCPUBackend"),
        chunk_event(ids, 1, 9002, 9001, "LocalDiskBackend"),
        chunk_event(ids, 2, 9003, 5555, "LocalDiskBackend"),  # unknown parent: cannot be placed
    ]
    sched.update_connector_output(KVConnectorOutput(kv_cache_events=worker_side.get_kv_connector_kv_cache_events()))
    out = list(sched.take_events())
    assert [(e.block_hashes, e.parent_block_hash, e.medium) for e in out] == [
        (hashes[per_chunk : 2 * per_chunk], hashes[per_chunk - 1], "DISK")
    ]


def test_vllm_0_26_lmcache_adapter_cannot_carry_removals() -> None:
    """Pin of a vLLM 0.26.0 limit: LMCacheConnectorV1.get_kv_connector_kv_cache_events rebuilds every
    LMCache event as a BlockStored, so an eviction event cannot reach the scheduler through it."""
    worker_side = connector(KVConnectorRole.WORKER, {"lmcache.chunk_size": CHUNK})
    lm_engine(worker_side).kv_events = [BlockRemoved(block_hashes=[9002], medium="LocalCPUBackend")]
    with pytest.raises(AttributeError, match="parent_block_hash"):
        worker_side.get_kv_connector_kv_cache_events()


def test_lmcache_evictions_map_back_to_announced_vllm_hashes(tok: PromptTokenizer) -> None:
    """The scheduler-side mapping for when removals do arrive (an adapter that forwards them; events put
    straight into LMCacheKVEvents here, since vLLM 0.26.0's adapter cannot, see the test above)."""
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    sched = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK})
    sched.request_finished(finished_prefill("p7", ids), [])
    announced = list(sched.take_events())
    hashes = announced[0].block_hashes
    per_chunk = CHUNK // BLOCK
    events = LMCacheKVEvents(num_workers=1)
    events.add_events(
        [
            chunk_event(ids, 0, 9001, None, "LocalCPUBackend"),
            chunk_event(ids, 1, 9002, 9001, "LocalCPUBackend"),
            BlockRemoved(block_hashes=[9002], medium="LocalCPUBackend"),
            BlockRemoved(block_hashes=[424242], medium="LocalCPUBackend"),  # never seen: nothing to map
        ]
    )
    sched.update_connector_output(KVConnectorOutput(kv_cache_events=events))
    out = list(sched.take_events())
    assert [(type(e).__name__, e.block_hashes, e.medium) for e in out] == [
        ("BlockRemoved", hashes[per_chunk : 2 * per_chunk], "CPU")
    ]
    idx = KvIndex()
    to_index(announced + out, idx)
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED, block_size=BLOCK)
    score = policy.score(worker("p0"), ctx({"prompt": PROMPT}))
    assert score.hit_blocks == per_chunk and score.tier_blocks["CPU"] == per_chunk  # prefix stops at the hole


def test_async_lmcache_save_announced_when_reported_done(tok: PromptTokenizer) -> None:
    ids = tok.request_ids({"prompt": PROMPT}, chat=False)
    pd = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK})
    req = finished_prefill("p5", ids)
    lm_engine(pd).finished["p5"] = (True, None)  # LMCache's save still in flight: blocks held
    delay, _ = pd.request_finished(req, [])
    assert delay is True
    assert list(pd.take_events()) == []
    pd.update_connector_output(KVConnectorOutput(finished_sending={"p5"}))
    (ev,) = list(pd.take_events())
    assert ev.medium == "CPU" and len(ev.block_hashes) == len(ids) // CHUNK * CHUNK // BLOCK


def test_raw_and_off_modes() -> None:
    ids = list(range(1000, 1000 + 2 * CHUNK))
    off = connector(KVConnectorRole.SCHEDULER, {"lmcache.chunk_size": CHUNK}, lmcache_events="off")
    off.request_finished(finished_prefill("p6", ids), [])
    assert list(off.take_events()) == []
    with pytest.raises(ValueError, match="lmcache_events"):
        connector(KVConnectorRole.SCHEDULER, {}, lmcache_events="bogus")


def test_tier_settings_from_lmcache_keys_and_env() -> None:
    assert LMCacheTierSettings.from_config({}, env={}) == LMCacheTierSettings(256, False, "CPU")
    env = {"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_SAVE_UNFULL_CHUNK": "True", "LMCACHE_LOCAL_DISK": "file:///d"}
    assert LMCacheTierSettings.from_config({}, env=env) == LMCacheTierSettings(128, True, "CPU")
    disk_only = {"lmcache.local_cpu": False, "lmcache.local_disk": "file:///d", "lmcache.chunk_size": 512}
    assert LMCacheTierSettings.from_config(disk_only, env=env) == LMCacheTierSettings(512, True, "DISK")
