"""A seeded decode (prompt + the prefill's first token) inside vLLM 0.26.0's real Scheduler and NIXL code, on CPU.

Why this file: first-token seeding relies on how vLLM's decode side treats a request whose prompt is
one token longer than the KV the prefill holds.  What vLLM does (evidence for docs/seeding.md):

* ``NixlPullConnectorScheduler`` / ``NixlPushConnectorScheduler.get_num_new_matched_tokens`` claim
  *every* prompt token as external for ``do_remote_prefill`` (``remote_num_tokens`` is not read there),
  so N + 1 tokens are reported and blocks for N + 1 tokens are allocated;
* after the transfer, ``Scheduler._update_waiting_for_remote_kv`` sees a "full hit" and applies the
  recompute-the-last-token rule: ``num_computed_tokens`` becomes N and the first step computes one
  token, the seed, whose KV the prefill never had -- N tokens loaded, 1 computed, for every N;
* pull mode reads remote blocks into the local unhashed blocks paired from the ends
  (``NixlBaseConnectorWorker._apply_prefix_caching``, asserting ``num_local_blocks <= remote``): when N
  is a multiple of the block size the seed opens a block the prefill never had, which asserts (no local
  hit) or shifts every block by one (a local hit).  ``seeding.seeded_kv_transfer_params`` pads the list;
* push mode registers the decode's blocks with the prefill (``push_registrations``); the prefill's
  writer cuts the longer list from the end (``_xfer_blocks_for_req``), so the extra block stays unwritten.

Real: Scheduler, KVCacheManager, prefix caching (sha256, PYTHONHASHSEED), NIXL's scheduler-side
connectors, NIXL's worker-side pairing function.  Fake (needs a GPU): the model runner output (built by
hand: which requests finished receiving, one sampled token) and the NIXL transfer itself.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from vllm_versions import only_vllm

pytest.importorskip("vllm")
pytestmark = [
    pytest.mark.vllm,
    only_vllm(
        "0.26",
        "the proof drives vLLM 0.26's NIXL internals (0.32 changed _apply_prefix_caching's signature); "
        "0.32: test_seeding_vllm032.py",
    ),
]

import seeded_vllm  # noqa: E402
from seeded_vllm import BS, MODES, SEED_TOKEN, STOP_CASES, cdiv, nixl_scheduler, prompt, request, step_outputs  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlBaseConnectorWorker  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402
from vllm_scheduler import seed_block_hashing  # noqa: E402

from pdkit.frontend import seeding  # noqa: E402
from pdkit.frontend.seeding import seeded_kv_transfer_params  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    seed_block_hashing(monkeypatch, "11")


def decode_scheduler(connector: str) -> Scheduler:
    return nixl_scheduler(connector, "kv_consumer")


def step(scheduler: Scheduler, finished_recving: set[str] | None = None) -> tuple[Any, Any]:
    """schedule -> (fake) model runner -> update_from_output; (so, model runner output)."""
    so, mro, out = step_outputs(scheduler, finished_recving)
    return so, mro


def prefill_params(n: int) -> dict[str, Any]:
    """What a prefill of ``n`` tokens returns (NixlPullConnectorScheduler.request_finished's shape)."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [list(range(100, 100 + cdiv(n)))],
            "remote_engine_id": "prefill-0", "remote_request_id": "cmpl-p-0", "remote_host": "127.0.0.1",
            "remote_port": 5600, "tp_size": 1, "remote_num_tokens": n, "remote_blocks_expiry_time": None}  # fmt: skip


def pair_blocks(local: list[list[int]], remote: list[list[int]]) -> list[tuple[int, int]]:
    """vLLM's own pull-side pairing (NixlBaseConnectorWorker._apply_prefix_caching), non-Mamba model."""
    worker = SimpleNamespace(_has_mamba=False)
    loc, rem = NixlBaseConnectorWorker._apply_prefix_caching(worker, local, remote, 1)  # type: ignore[arg-type]
    return list(zip(loc[0], rem[0], strict=True))


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("n", [15, 16, 17, 31, 32, 33])
def test_seeded_decode_loads_n_tokens_and_computes_one(mode: str, n: int) -> None:
    scheduler = decode_scheduler(MODES[mode])
    remote = prefill_params(n)
    params = seeded_kv_transfer_params(remote, BS)
    req = request("dec-1", [*prompt(n), SEED_TOKEN], max_tokens=4, params=params)
    scheduler.add_request(req)

    so, _ = step(scheduler, finished_recving={"dec-1"})  # the (fake) worker reports the transfer done
    assert so.num_scheduled_tokens == {}  # nothing computed while the KV is in flight
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.prefill_stats is not None
    # the connector claims the whole prompt, seed included (remote_num_tokens is not consulted)
    assert req.prefill_stats.num_external_cached_tokens == n + 1
    meta = so.kv_connector_metadata
    local = meta.reqs_to_recv["dec-1"].local_block_ids
    assert [len(g) for g in local] == [cdiv(n + 1)]  # blocks for prompt + seed
    if mode == "pull":
        pairs = pair_blocks(local, meta.reqs_to_recv["dec-1"].remote.block_ids)
        # every local block holding prompt positions < n gets the prefill's block of the same positions
        assert [r for _, r in pairs[: cdiv(n)]] == remote["remote_block_ids"][0]
        assert len(pairs) == cdiv(n + 1)
    else:
        registered = meta.push_registrations["dec-1"]["local_block_ids"]
        assert [len(g) for g in registered] == [cdiv(n + 1)]
        # the prefill writes its cdiv(n) blocks into the first cdiv(n) registered ones (P cuts the longer list)
        assert len(registered[0]) - len(remote["remote_block_ids"][0]) == (1 if n % BS == 0 else 0)

    seeded_vllm.assert_seed_computed_then_decoding(scheduler, req, n)


def test_unpadded_block_list_asserts_or_misaligns_in_vllms_pull_worker() -> None:
    n = 32  # a multiple of the block size: the seed token opens block 3
    remote = prefill_params(n)["remote_block_ids"]
    with pytest.raises(AssertionError):  # no local hit: 3 local blocks, 2 remote ones
        pair_blocks([[1, 2, 3]], remote)

    for padded in (False, True):
        # a decode that already caches the prompt's first block (e.g. an earlier turn)
        scheduler = decode_scheduler("NixlConnector")
        scheduler.add_request(request("warm", prompt(n)[:20], max_tokens=1, params=None))
        step(scheduler)  # computes 20 tokens, finishes by length, block 0 stays cached
        params = prefill_params(n)
        if padded:
            params = seeded_kv_transfer_params(params, BS)
        rid = f"dec-{padded}"
        req, meta = seeded_vllm.add_seeded_decode(scheduler, rid, n, params)
        assert req.prefill_stats is not None and req.prefill_stats.num_local_cached_tokens == BS
        pairs = pair_blocks(meta.local_block_ids, meta.remote.block_ids)
        # local blocks for positions 16-31 and 32-47; the prefill's block of positions 16-31 is 101
        assert pairs[0][1] == (101 if padded else 100)  # unpadded: block 0's KV lands at positions 16-31
        so, _ = step(scheduler)
        assert so.num_scheduled_tokens == {rid: 1}  # the scheduler itself is fine either way


def test_prompt_two_tokens_longer_is_not_caught_by_vllm() -> None:
    """Why the sim refuses a decode prompt more than one token past the prefill: vLLM would load N + 2
    tokens' worth of 'KV' from a prefill that had N, recompute only the last one, and never notice."""
    scheduler = decode_scheduler("NixlConnector")
    n = 20
    req = request("dec-2", [*prompt(n), SEED_TOKEN, SEED_TOKEN + 1], max_tokens=4, params=prefill_params(n))
    scheduler.add_request(req)
    step(scheduler, finished_recving={"dec-2"})
    so, _ = step(scheduler)
    assert so.num_scheduled_tokens == {"dec-2": 1}  # position n (the first seed) has no KV, silently


def real_prefill_params(connector: str, n: int, *, mamba: bool = False) -> dict[str, Any]:
    """What vLLM 0.26's prefill really returns for an ``n``-token prompt (``request_finished``)."""
    scheduler = nixl_scheduler(connector, "kv_producer")
    if mamba:  # stand-in for a Mamba model's KV cache config: NIXL's prefill backoff of one token
        scheduler.connector.connector_scheduler._has_mamba = True
    scheduler.add_request(request("pre-1", prompt(n), max_tokens=1, params={"do_remote_decode": True}))
    so = scheduler.schedule()
    mro = ModelRunnerOutput(req_ids=["pre-1"], req_id_to_index={"pre-1": 0}, sampled_token_ids=[[42]])
    outputs = scheduler.update_from_output(so, mro)
    (out,) = [o for eco in outputs.values() for o in eco.outputs if o.request_id == "pre-1"]
    assert out.kv_transfer_params is not None
    return out.kv_transfer_params


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_the_real_prefill_reports_n_tokens_and_no_transfer_mode(mode: str) -> None:
    params = real_prefill_params(MODES[mode], 32)
    assert params["remote_num_tokens"] == 32 and [len(g) for g in params["remote_block_ids"]] == [2]
    assert "transfer_mode" not in params  # 0.32 adds it; seeding reads its absence as 0.26's rules
    padded = seeded_kv_transfer_params(params, BS)  # vLLM's own BlockIds is a tuple of lists
    assert padded["remote_block_ids"] == [[*params["remote_block_ids"][0], params["remote_block_ids"][0][-1]]]
    assert real_prefill_params(MODES[mode], 20, mamba=True)["remote_num_tokens"] == 19  # the backoff seeding refuses


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_a_rejected_decode_request_queues_the_prefill_release(mode: str) -> None:
    """``seeding.release_request``'s mechanism on 0.26: a pre-aborted decode-side request
    (``notify_kv_transfer_request_rejected``) makes the scheduler queue an empty read (notify-only)."""
    params = prefill_params(20)
    scheduler = decode_scheduler(MODES[mode])
    scheduler.add_request(request("rel-1", [0], max_tokens=1, params=dict(params)))
    scheduler.finish_requests(["rel-1"], RequestStatus.FINISHED_ABORTED)  # EngineCore's abort_immediately
    so = scheduler.schedule()
    meta = so.kv_connector_metadata.reqs_to_recv["rel-1"]
    assert not any(meta.local_block_ids) and meta.remote.request_id == params["remote_request_id"]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(("text", "new", "stops"), STOP_CASES)
def test_check_stop_is_vllms_own_rule(text: str, new: int, stops: list[str], include: bool) -> None:
    want = seeded_vllm.vllm_stop(text, new, stops, include)
    assert seeding.check_stop(text, new, stops, include, earliest_end=False) == want
