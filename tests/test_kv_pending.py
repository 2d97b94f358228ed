"""Pending blocks: a prompt routed to a worker counts as cached there until its events arrive.

Unit level (a hand-driven clock); the behaviour against vLLM's real scheduler is in
test_kv_routing_vllm_scheduler.py (bursts sharing a new prefix).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pdkit.model_files import default_model_dir
from pdkit.prompt_tokens import PromptTokenizer
from pdkit.protocol import Load, WorkerInfo
from pdkit.routing import kv_events as ke
from pdkit.routing.kv_aware import KvAwarePolicy
from pdkit.routing.kv_index import KvIndex
from pdkit.routing.pending import PendingBlocks
from pdkit.routing.types import RequestContext, WorkerState
from pdkit.worker_cli import prefix_caching_enabled

SEED = "3"
PROMPT = "a system prompt that every request of this test shares, word after word, " * 6


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def worker(wid: str, prefix_caching: bool = True) -> WorkerState:
    info = WorkerInfo(worker_id=wid, role="agg", url="http://127.0.0.1:1", model="synth",  # type: ignore[arg-type]
                      prefix_caching=prefix_caching)  # fmt: skip
    return WorkerState(info=info, last_seen=time.monotonic(), load=Load())


def ctx(suffix: str) -> RequestContext:
    return RequestContext(path="/v1/completions", model="synth", body={"prompt": PROMPT + suffix}, prompt_text=None,
                          prompt_token_ids=None, prompt_tokens=0, request_id=suffix)  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(default_model_dir())


def test_lifetime_in_flight_then_grace() -> None:
    clock = Clock()
    p = PendingBlocks(grace_s=1.0, max_pending_s=60.0, clock=clock)
    p.add("w", [1, 2])
    p.add("w", [2, 3])  # a second request shares block 2
    clock.t += 30
    assert p.has("w", 1) and p.has("w", 2) and p.has("w", 3)  # in flight: no time limit short of 60 s
    p.done("w", [1, 2])
    clock.t += 0.5
    assert p.has("w", 1)  # within the grace
    clock.t += 0.6
    assert not p.has("w", 1) and p.has("w", 2) and p.has("w", 3)  # 2 is still held by the other request
    p.done("w", [2, 3])
    clock.t += 1.1
    assert p.size("w") == 0 and not p.has("other", 1)


def test_max_pending_bounds_entries_whose_done_never_comes() -> None:
    clock = Clock()
    p = PendingBlocks(grace_s=1.0, max_pending_s=5.0, clock=clock)
    p.add("w", [1])
    clock.t += 5.1
    assert not p.has("w", 1)
    p.add("w", [2])  # the sweep drops the expired entry
    assert p._workers["w"].keys() == {2}


def test_events_settle_entries_and_removed_workers_drop_theirs() -> None:
    p = PendingBlocks(clock=Clock())
    p.add("w", [1, 2, 3])
    p.settle("w", [2])
    assert p.has("w", 1) and not p.has("w", 2)
    p.done("w", [1, 2, 3])  # a settled entry is simply skipped
    p.remove_worker("w")
    assert not p.has("w", 1) and p.size("w") == 0
    with pytest.raises(ValueError):
        PendingBlocks(max_pending_s=0)


def test_a_burst_sharing_a_new_prefix_sticks_to_the_first_choice(tok: PromptTokenizer) -> None:
    clock = Clock()
    idx = KvIndex()
    pending = PendingBlocks(grace_s=1.0, clock=clock)
    policy = KvAwarePolicy(idx, tok, hash_seed=SEED, pending=pending)
    ws = [worker("w0"), worker("w1")]
    first = policy.choose("agg", ws, c1 := ctx(" one"))
    followers = [policy.choose("agg", ws, ctx(f" {n}")) for n in ("two", "three", "four")]
    assert all(f is first for f in followers)  # no event has arrived, yet all follow the first
    blocks = policy.prompt_blocks(c1)
    assert blocks is not None
    s = policy.score(first, ctx(" five"))
    assert s.tier_blocks["pending"] == s.hit_blocks > 0
    # events announce the blocks: the index answers from now on, the pending entries are settled
    idx.add_worker(first.worker_id)
    idx.on_gpu_blocks = pending.settle
    stored = ke.BlockStored(block_hashes=blocks.hashes, parent_block_hash=None, token_ids=[], block_size=16,
                            lora_id=None, medium="GPU", lora_name=None)  # fmt: skip
    idx.apply(first.worker_id, ke.KVEventBatch(ts=time.time(), events=[stored]))
    s = policy.score(first, ctx(" six"))
    assert "pending" not in s.tier_blocks and s.tier_blocks["GPU"] == s.hit_blocks > 0
    # an eviction announced after the request was routed wins over its pending mark
    removed = ke.BlockRemoved(block_hashes=blocks.hashes[:1], medium="GPU")
    idx.apply(first.worker_id, ke.KVEventBatch(ts=time.time(), events=[removed]))
    assert policy.score(first, ctx(" seven")).hit_blocks == 0


def test_hop_done_releases_after_the_grace(tok: PromptTokenizer) -> None:
    clock = Clock()
    pending = PendingBlocks(grace_s=1.0, clock=clock)
    policy = KvAwarePolicy(KvIndex(), tok, hash_seed=SEED, pending=pending)
    ws = [worker("w0"), worker("w1")]
    c = ctx(" one")
    w = policy.choose("agg", ws, c)
    policy.hop_done(w, c)
    policy.hop_done(w, c)  # idempotent: the frontend may end a hop once only, but be safe
    assert policy.score(w, ctx(" two")).hit_blocks > 0
    clock.t += 1.5
    assert policy.score(w, ctx(" two")).hit_blocks == 0


def test_no_pending_on_a_worker_without_prefix_caching(tok: PromptTokenizer) -> None:
    pending = PendingBlocks(clock=Clock())
    policy = KvAwarePolicy(KvIndex(), tok, hash_seed=SEED, pending=pending)
    w = worker("p0", prefix_caching=False)
    policy.choose("prefill", [w], ctx(" one"))
    assert pending.size("p0") == 0
    assert policy.score(w, ctx(" two")).hit_blocks == 0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], True),
        (["/m", "--no-enable-prefix-caching"], False),
        (["--no-enable-prefix-caching", "--enable-prefix-caching"], True),
        (["--enable-prefix-caching=false"], False),
        (["--enable-prefix-caching=True"], True),
    ],
)
def test_agent_reads_prefix_caching_from_the_engine_command(argv: list[str], expected: bool) -> None:
    assert prefix_caching_enabled(argv) is expected


def test_worker_info_defaults_prefix_caching_on_for_older_agents() -> None:
    raw: dict[str, Any] = {"worker_id": "a", "role": "agg", "url": "http://h:1", "model": "m"}
    assert WorkerInfo.model_validate(raw).prefix_caching is True


def test_launched_prefill_without_prefix_caching_registers_as_such(tmp_path: Any) -> None:
    """What the agent reads is the engine command the plan gives it (after ``--``)."""
    from pdkit.config import load_deployment
    from pdkit.plan import worker_spec

    dep = load_deployment(overrides={"mode": "disagg", "prefill.extra_args": ["--no-enable-prefix-caching"]})
    for role, expected in (("prefill", False), ("decode", True)):
        argv = worker_spec(dep, role, 0, tmp_path).argv
        assert prefix_caching_enabled(argv[argv.index("--") + 1 :]) is expected, role


def test_no_pending_for_a_decode_hop_that_pulls_the_kv(tok: PromptTokenizer) -> None:
    """vLLM caches remotely loaded blocks only when the transfer is done: no early marks for that hop."""
    pending = PendingBlocks(clock=Clock())
    policy = KvAwarePolicy(KvIndex(), tok, hash_seed=SEED, pending=pending)
    c = ctx(" one")
    c.remote_kv = True
    w = policy.choose("decode", [worker("d0")], c)
    assert pending.size("d0") == 0
    c.remote_kv = False  # e.g. the retry that prefills locally on the same worker
    policy.choose("decode", [w], c)
    assert pending.size("d0") > 0
