"""Predicted prefix hits against vLLM 0.26.0's real scheduler and its real ZMQ KV-event publisher, on CPU.

Why this file: the other routing tests check predictions against the simulator, whose cache is ours.
Here the cache that has to be predicted is vLLM's own: two real ``Scheduler`` objects (KVCacheManager,
prefix caching, sha256, ``PYTHONHASHSEED``) each publish through vLLM's ``ZmqEventPublisher`` (connect
mode, one topic per worker, a replay ROUTER) into the frontend's ``KvRouting`` (bound SUB socket, index,
``KvAwarePolicy``).  A multi-turn chat workload is tokenized by our ``PromptTokenizer`` (equal to vLLM's
renderer, see test_prompt_tokens.py), routed by the policy, run on the chosen scheduler, and the
``pdkit_kv_predicted_hit_tokens`` of every request must equal the hits vLLM records in its
``PrefixCacheStats`` (what ``vllm:prefix_cache_hits`` counts).  The caches are small, so vLLM evicts and
the index has to follow ``BlockRemoved`` events too.

Fake (needs a GPU): only the model runner; its output is built by hand (one sampled token per step).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from prometheus_client import CollectorRegistry  # noqa: E402
from vllm.config import KVEventsConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core import kv_cache_utils as kcu  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm_scheduler import real_scheduler  # noqa: E402

from pdkit.model_files import default_model_dir  # noqa: E402
from pdkit.protocol import Load, WorkerInfo  # noqa: E402
from pdkit.routing.kv_aware import KvRouting  # noqa: E402
from pdkit.routing.types import RequestContext  # noqa: E402

SEED = "13"
BLOCK = 16
NUM_BLOCKS = 20  # small on purpose: the workload does not fit, vLLM evicts, the index must follow
MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VllmWorker:
    """One real vLLM scheduler standing in for an engine; counts what it published and what it hit."""

    worker_id: str
    scheduler: Scheduler
    replay_endpoint: str
    info: WorkerInfo
    load: Load = field(default_factory=Load)
    inflight: int = 0
    published: int = 0
    removed_blocks: int = 0


def build_worker(wid: str, sub_endpoint: str, num_blocks: int = NUM_BLOCKS) -> VllmWorker:
    replay = f"tcp://*:{free_port()}"
    events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=sub_endpoint,
                            replay_endpoint=replay, topic=wid)  # fmt: skip
    scheduler, _, _ = real_scheduler(block_size=BLOCK, num_blocks=num_blocks, max_model_len=1024,
                                     kv_events_config=events)  # fmt: skip
    info = WorkerInfo(worker_id=wid, role="agg", url="http://127.0.0.1:1", model="synth", block_size=BLOCK,  # type: ignore[arg-type]
                      kv_events_topic=wid, kv_events_replay_endpoint=replay)  # fmt: skip
    w = VllmWorker(wid, scheduler, replay, info)
    real_publish = scheduler.kv_event_publisher.publish

    def counting_publish(batch: Any) -> None:
        w.published += 1
        w.removed_blocks += sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockRemoved))
        real_publish(batch)

    scheduler.kv_event_publisher.publish = counting_publish  # type: ignore[method-assign,assignment]
    return w


def run_together(w: VllmWorker, requests: list[tuple[str, list[int]]]) -> tuple[int, int]:
    """Add requests at once and step the real scheduler until all finish (a hand-built model output of
    one sampled token per request and step stands in for the GPU).

    Returns (hit tokens, queried tokens) summed from the ``SchedulerStats`` the steps emitted: the
    deltas that vLLM's ``vllm:prefix_cache_hits`` / ``_queries`` counters receive.
    """
    for rid, ids in requests:
        w.scheduler.add_request(Request(request_id=rid, prompt_token_ids=ids,
                                        sampling_params=SamplingParams(max_tokens=MAX_TOKENS), pooling_params=None,
                                        block_hasher=kcu.get_request_block_hasher(BLOCK, sha256)))  # fmt: skip
    hits = queries = 0
    for step in range(4 * (MAX_TOKENS + 2)):
        so = w.scheduler.schedule()
        rids = list(so.num_scheduled_tokens)
        if not rids:
            return hits, queries
        mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                                sampled_token_ids=[[100 + step] for _ in rids])  # fmt: skip
        for out in w.scheduler.update_from_output(so, mro).values():
            stats = out.scheduler_stats
            if stats is not None and stats.prefix_cache_stats is not None:
                hits += stats.prefix_cache_stats.hits
                queries += stats.prefix_cache_stats.queries
    raise AssertionError("requests did not finish")


def run_to_completion(w: VllmWorker, rid: str, token_ids: list[int]) -> tuple[int, int]:
    """One request, scheduled alone, stepped until it finishes; (hit, queried) tokens as vLLM counts them."""
    return run_together(w, [(rid, token_ids)])


async def link_up(kv: KvRouting, w: VllmWorker, timeout: float = 20.0) -> None:
    """Publish empty batches through the worker's real publisher until one reaches the index.

    Why: a connecting ZMQ PUB drops what it sends before the TCP link is up (the "slow joiner"); a real
    worker registers long after its publisher connected, a scheduler built a millisecond ago has not.
    A batch that did arrive after dropped ones reads as a gap and is filled by vLLM's replay endpoint.
    """
    deadline = time.monotonic() + timeout
    while (st := kv.index.worker(w.worker_id)) is None or st.last_seq is None:
        assert time.monotonic() < deadline, f"no KV-event batch of {w.worker_id} arrived"
        w.scheduler.kv_event_publisher.publish(KVEventBatch(ts=time.time(), events=[]))
        await asyncio.sleep(0.01)


async def synced(kv: KvRouting, workers: list[VllmWorker], timeout: float = 20.0) -> None:
    """Every batch each scheduler published has been applied to the frontend's index."""
    deadline = time.monotonic() + timeout
    while True:
        done = True
        for w in workers:
            st = kv.index.worker(w.worker_id)
            done &= w.published == 0 or (st is not None and st.last_seq == w.published - 1)
        if done:
            return
        assert time.monotonic() < deadline, "KV events did not reach the index"
        await asyncio.sleep(0.01)


def chat_ctx(messages: list[dict[str, str]], rid: str) -> RequestContext:
    body = {"model": "synth", "messages": messages, "max_tokens": MAX_TOKENS}
    return RequestContext(path="/v1/chat/completions", model="synth", body=body, prompt_text=None,
                          prompt_token_ids=None, prompt_tokens=0, request_id=rid)  # fmt: skip


def predicted_tokens(kv: KvRouting) -> float:
    """What the policy booked as predicted hits so far (``pdkit_kv_predicted_hit_tokens``, all labels)."""
    return sum(s.value for fam in kv.metrics.predicted_hit_tokens.collect() for s in fam.samples
               if s.name.endswith("_total"))  # fmt: skip


def conversations(n: int) -> list[list[dict[str, str]]]:
    """``n`` chats of four user turns; two system prompts shared across chats (shared prefixes)."""
    systems = [
        "You are a careful assistant for storage engineers. Answer in short sentences. " * 3,
        "You help with network questions and keep answers brief and exact. " * 3,
    ]
    chats = []
    for c in range(n):
        msgs = [{"role": "system", "content": systems[c % 2]}]
        for t in range(4):
            msgs.append(
                {"role": "user", "content": f"chat {c} turn {t}: how do I size the cache for case {c * 7 + t}?"}
            )
            chats.append([dict(m) for m in msgs])
            msgs.append({"role": "assistant", "content": f"For case {c * 7 + t} use {t + 2} blocks per layer."})
    return chats


def test_predicted_hits_equal_vllm_scheduler_hits_under_eviction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", SEED)
    kcu.init_none_hash(sha256)

    async def scenario() -> None:
        kv = KvRouting(default_model_dir(), hash_seed=SEED, registry=CollectorRegistry(), block_size=BLOCK)
        kv.start()
        workers = [build_worker(wid, kv.endpoint) for wid in ("w0", "w1")]
        try:
            for w in workers:
                kv.add_worker(w)
                await link_up(kv, w)
            per_turn = conversations(6)
            # interleave the chats turn by turn so that both caches fill up and evict
            order = [per_turn[c * 4 + t] for t in range(4) for c in range(6)]
            predicted_total = actual_total = 0
            chosen: dict[str, int] = {"w0": 0, "w1": 0}
            for i, messages in enumerate(order):
                await synced(kv, workers)
                ctx = chat_ctx(messages, f"r{i}")
                p0 = predicted_tokens(kv)
                w = kv.policy.choose("agg", workers, ctx)
                predicted = predicted_tokens(kv) - p0
                blocks = kv.policy.prompt_blocks(ctx, BLOCK)
                assert blocks is not None
                hit, queried = run_to_completion(w, f"r{i}", blocks.token_ids)
                kv.policy.hop_done(w, ctx)
                assert queried == len(blocks.token_ids)
                assert predicted == hit, f"request {i} on {w.worker_id}"
                predicted_total += predicted
                actual_total += hit
                chosen[w.worker_id] += 1
            await synced(kv, workers)
            assert predicted_total == actual_total and actual_total > 0
            assert all(n > 0 for n in chosen.values()), chosen  # both workers served
            assert all(w.removed_blocks > 0 for w in workers), "the workload must make vLLM evict"
            assert all(kv.index.size(w.worker_id)["GPU"] <= NUM_BLOCKS for w in workers)
        finally:
            for w in workers:
                w.scheduler.shutdown()
            await kv.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("track_pending", [True, False])
def test_bursts_sharing_a_new_prefix_stick_together_and_are_predicted(
    monkeypatch: pytest.MonkeyPatch, track_pending: bool
) -> None:
    """Each turn of six chats is routed as one burst, before any of it runs (the events of a burst can
    only arrive after vLLM scheduled it), then every worker schedules its share together.

    vLLM caches a prompt's blocks when it schedules it, so a later request of the same step hits them.
    With pending blocks (the default) the policy knows that at routing time: the chats sharing a system
    prompt go to one worker and the predicted hits equal vLLM's per burst.  Without it (the control
    case) the first burst spreads over both workers and its hits are under-predicted.
    """
    monkeypatch.setenv("PYTHONHASHSEED", SEED)
    kcu.init_none_hash(sha256)

    async def scenario() -> tuple[list[tuple[float, int]], list[dict[str, str]]]:
        kv = KvRouting(default_model_dir(), hash_seed=SEED, registry=CollectorRegistry(), block_size=BLOCK,
                       track_pending=track_pending)  # fmt: skip
        kv.start()
        workers = [build_worker(wid, kv.endpoint, num_blocks=400) for wid in ("w0", "w1")]
        by_id = {w.worker_id: w for w in workers}
        per_turn = conversations(6)
        bursts: list[tuple[float, int]] = []
        placements: list[dict[str, str]] = []
        try:
            for w in workers:
                kv.add_worker(w)
                await link_up(kv, w)
            for t in range(4):
                await synced(kv, workers)
                p0 = predicted_tokens(kv)
                share: dict[str, list[tuple[str, list[int]]]] = {"w0": [], "w1": []}
                routed = []
                placement = {}
                for c in range(6):
                    ctx = chat_ctx(per_turn[c * 4 + t], f"c{c}t{t}")
                    w = kv.policy.choose("agg", workers, ctx)
                    blocks = kv.policy.prompt_blocks(ctx, BLOCK)
                    assert blocks is not None
                    share[w.worker_id].append((ctx.request_id, blocks.token_ids))
                    routed.append((w, ctx))
                    placement[f"c{c}"] = w.worker_id
                predicted = predicted_tokens(kv) - p0
                actual = sum(run_together(by_id[wid], reqs)[0] for wid, reqs in share.items() if reqs)
                for w, ctx in routed:
                    kv.policy.hop_done(w, ctx)
                bursts.append((predicted, actual))
                placements.append(placement)
        finally:
            for w in workers:
                w.scheduler.shutdown()
            await kv.close()
        return bursts, placements

    bursts, placements = asyncio.run(scenario())
    first = placements[0]
    if track_pending:
        assert all(p == a for p, a in bursts), bursts
        # chats 0, 2, 4 share one system prompt, chats 1, 3, 5 the other: each group on one worker
        assert first["c0"] == first["c2"] == first["c4"] and first["c1"] == first["c3"] == first["c5"]
        assert all(p == placements[0] for p in placements)  # and every later turn follows its chat
    else:
        assert bursts[0][0] < bursts[0][1], bursts  # the blind window: hits vLLM had but nobody predicted


def test_stored_events_carry_the_hashes_the_frontend_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request's ``BlockStored`` hashes (vLLM's publisher, decoded by our subscriber) are the
    prompt's event hashes as ``BlockHasher`` computes them, block for block."""
    monkeypatch.setenv("PYTHONHASHSEED", SEED)
    kcu.init_none_hash(sha256)

    async def scenario() -> None:
        kv = KvRouting(default_model_dir(), hash_seed=SEED, registry=CollectorRegistry(), block_size=BLOCK)
        kv.start()
        w = build_worker("solo", kv.endpoint)
        stored: list[BlockStored] = []
        real = w.scheduler.kv_event_publisher.publish

        def keep(batch: Any) -> None:
            stored.extend(e for e in batch.events if isinstance(e, BlockStored))
            real(batch)

        w.scheduler.kv_event_publisher.publish = keep  # type: ignore[method-assign,assignment]
        try:
            kv.add_worker(w)
            await link_up(kv, w)
            body = {"model": "synth", "prompt": "tokens of a prompt that spans several blocks " * 8}
            ctx = RequestContext(path="/v1/completions", model="synth", body=body, prompt_text=None,
                                 prompt_token_ids=None, prompt_tokens=0, request_id="s")  # fmt: skip
            blocks = kv.policy.prompt_blocks(ctx, BLOCK)
            assert blocks is not None and len(blocks.hashes) >= 4
            run_to_completion(w, "s", blocks.token_ids)
            await synced(kv, [w])
            sent = [h for e in stored for h in e.block_hashes]
            assert sent[: len(blocks.hashes)] == blocks.hashes
            assert kv.index.prefix_tiers("solo", blocks.hashes) == [1] * len(blocks.hashes)
        finally:
            w.scheduler.shutdown()
            await kv.close()

    asyncio.run(scenario())
