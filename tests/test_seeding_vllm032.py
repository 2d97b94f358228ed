"""A seeded decode (prompt + the prefill's first token) inside vLLM 0.32.0's real Scheduler and NIXL code, on CPU.

The 0.32 counterpart of tests/test_seeding_vllm.py (0.26).  What 0.32 does (evidence for docs/seeding.md):

* the prefill's ``request_finished`` returns ``remote_num_tokens`` = the tokens it computed (N),
  ``remote_block_ids`` (cdiv(N) per group) and, new in 0.32, ``transfer_mode`` ("pull" | "push");
* the decode's ``get_num_new_matched_tokens`` (pull and push) claims every prompt token, seed included
  (``_get_remote_prefill_token_count`` subtracts only a Mamba/MTP backoff, 0 here), blocks for N + 1 are
  allocated and the recompute-the-last-token rule leaves exactly the seed to compute;
* pull: the decode pairs its unhashed blocks with the prefill's from the ends (``_apply_prefix_caching``,
  new signature, same assertion as 0.26): ``seeded_kv_transfer_params``'s pad is still needed;
* push: 0.26's writer cut the longer list; 0.32's prefill writer calls the same ``_apply_prefix_caching``
  with the decode's registration as ``decode``: at N % block_size == 0 the registration is one block
  longer and the assertion fires on the prefill's writer thread (the push is dropped), or with a local
  hit every block lands one position off.  ``seeded_kv_transfer_params`` refuses that case, so the
  frontend decodes it unseeded; every other length pairs exactly.

Real: Scheduler, KVCacheManager, prefix caching, NIXL's scheduler-side connectors (producer and consumer),
NIXL's block-pairing function.  Fake (needs a GPU): the model runner output (built by hand) and the
NIXL transfer itself; ``_has_mamba`` is switched on by hand on a real connector to stand in for a Mamba
model's KV cache (the backoff case).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
from vllm_versions import since_vllm

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, since_vllm("0.32", "NIXL internals of 0.32 and 0.33; 0.26: test_seeding_vllm.py")]

import seeded_vllm  # noqa: E402
from seeded_vllm import BS, MODES, SEED_TOKEN, STOP_CASES, cdiv, nixl_scheduler, prompt, request, step_outputs  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlBaseConnectorWorker  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402
from vllm_scheduler import seed_block_hashing  # noqa: E402

from pdkit.frontend import seeding  # noqa: E402
from pdkit.frontend.seeding import SeedingError, seeded_kv_transfer_params  # noqa: E402

LENGTHS = [5, 15, 16, 17, 31, 32, 33]


@pytest.fixture(autouse=True)
def _seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    seed_block_hashing(monkeypatch, "11")


def step(scheduler: Scheduler, finished_recving: set[str] | None = None) -> tuple[Any, Any]:
    """schedule -> (fake) model runner -> update_from_output; (so, update_from_output result)."""
    so, mro, out = step_outputs(scheduler, finished_recving)
    return so, out


def prefill_params(mode: str, n: int, *, mamba: bool = False) -> dict[str, Any]:
    """What vLLM 0.32's prefill really returns for an ``n``-token prompt (``request_finished``)."""
    scheduler = nixl_scheduler(MODES[mode], "kv_producer")
    if mamba:  # stand-in for a Mamba model's KV cache config: NIXL's prefill backoff of one token
        scheduler.connector.connector_scheduler._has_mamba = True
    scheduler.add_request(request("pre-1", prompt(n), max_tokens=1, params={"do_remote_decode": True}))
    _, outputs = step(scheduler)
    (out,) = [o for eco in outputs.values() for o in eco.outputs if o.request_id == "pre-1"]
    assert out.finish_reason is not None and out.kv_transfer_params is not None
    return out.kv_transfer_params


def pair(decode: list[list[int]], prefill: list[list[int]]) -> list[tuple[int, int]]:
    """vLLM 0.32's own pairing (``NixlBaseConnectorWorker._apply_prefix_caching``), non-Mamba model, one
    physical block per logical one; pull calls it on the decode, push on the prefill's writer thread."""
    worker = SimpleNamespace(_has_mamba=False)
    dec, pre = NixlBaseConnectorWorker._apply_prefix_caching(worker, decode, prefill, 1, 1)  # type: ignore[arg-type]
    return list(zip(dec[0], pre[0], strict=True))


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("n", LENGTHS)
def test_the_prefill_reports_what_seeding_relies_on(mode: str, n: int) -> None:
    params = prefill_params(mode, n)
    assert params["do_remote_prefill"] is True and params["transfer_mode"] == mode
    assert params["remote_num_tokens"] == n  # every prompt token computed: no backoff
    assert [len(g) for g in params["remote_block_ids"]] == [cdiv(n)]


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("n", LENGTHS)
def test_seeded_decode_loads_n_tokens_and_computes_one(mode: str, n: int) -> None:
    remote = prefill_params(mode, n)
    if mode == "push" and n % BS == 0:
        with pytest.raises(SeedingError, match="push mode"):
            seeded_kv_transfer_params(remote, BS)
        return  # the frontend decodes this one unseeded (test_push_at_a_whole_block_cannot_be_paired)
    params = seeded_kv_transfer_params(remote, BS)
    scheduler = nixl_scheduler(MODES[mode], "kv_consumer")
    req = request("dec-1", [*prompt(n), SEED_TOKEN], max_tokens=4, params=params)
    scheduler.add_request(req)

    so, _ = step(scheduler, finished_recving={"dec-1"})  # the (fake) worker reports the transfer done
    assert so.num_scheduled_tokens == {}  # nothing computed while the KV is in flight
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.prefill_stats is not None and req.prefill_stats.num_external_cached_tokens == n + 1
    meta = so.kv_connector_metadata
    local = [list(g) for g in meta.reqs_to_recv["dec-1"].local_block_ids]
    assert [len(g) for g in local] == [cdiv(n + 1)]  # blocks for prompt + seed
    if mode == "pull":
        pairs = pair(local, [list(g) for g in meta.reqs_to_recv["dec-1"].remote.block_ids])
        # every local block holding prompt positions < n gets the prefill's block of the same positions
        assert [r for _, r in pairs[: cdiv(n)]] == remote["remote_block_ids"][0]
        assert len(pairs) == cdiv(n + 1)
    else:
        registered = [list(g) for g in meta.push_registrations["dec-1"]["local_block_ids"]]
        assert registered == local
        # the prefill's writer pairs its own blocks with the registration: block i into block i
        assert pair(registered, remote["remote_block_ids"]) == list(
            zip(local[0], remote["remote_block_ids"][0], strict=True)
        )

    seeded_vllm.assert_seed_computed_then_decoding(scheduler, req, n)


def warm_decode(connector: str, n: int) -> Scheduler:
    """A decode that already caches the prompt's first block (e.g. an earlier turn)."""
    scheduler = nixl_scheduler(connector, "kv_consumer")
    scheduler.add_request(request("warm", prompt(n)[:20], max_tokens=1, params=None))
    step(scheduler)  # computes 20 tokens, finishes by length, block 0 stays cached
    return scheduler


def test_pull_pad_is_still_needed_on_032() -> None:
    n = 32  # a multiple of the block size: the seed token opens block 3
    remote = prefill_params("pull", n)
    with pytest.raises(AssertionError):  # no local hit: 3 local blocks, 2 remote ones
        pair([[1, 2, 3]], remote["remote_block_ids"])
    first_remote = remote["remote_block_ids"][0]
    for padded in (False, True):
        scheduler = warm_decode("NixlConnector", n)
        params = seeded_kv_transfer_params(remote, BS) if padded else copy.deepcopy(remote)  # vLLM mutates it
        rid = f"dec-{padded}"
        req, meta = seeded_vllm.add_seeded_decode(scheduler, rid, n, params)
        assert req.prefill_stats is not None and req.prefill_stats.num_local_cached_tokens == BS
        pairs = pair([list(g) for g in meta.local_block_ids], [list(g) for g in meta.remote.block_ids])
        # local blocks for positions 16-31 and 32-47; the prefill's block of positions 16-31 is its second
        assert pairs[0][1] == (first_remote[1] if padded else first_remote[0])  # unpadded: one block off


@pytest.mark.parametrize("n", [16, 32])
def test_push_at_a_whole_block_cannot_be_paired(n: int) -> None:
    """Why seeding refuses push mode at N % block_size == 0 on 0.32 (0.26's writer cut the longer list)."""
    remote = prefill_params("push", n)["remote_block_ids"]
    scheduler = nixl_scheduler("NixlPushConnector", "kv_consumer")
    params = prefill_params("push", n)
    scheduler.add_request(request("dec-p", [*prompt(n), SEED_TOKEN], max_tokens=4, params=params))
    so, _ = step(scheduler)
    registered = [list(g) for g in so.kv_connector_metadata.push_registrations["dec-p"]["local_block_ids"]]
    assert [len(g) for g in registered] == [cdiv(n) + 1]
    with pytest.raises(AssertionError):  # on the prefill's writer thread: the push is dropped
        pair(registered, remote)
    # with a local hit of one block the counts fit, and every block is written one position off
    warm = warm_decode("NixlPushConnector", n)
    warm.add_request(request("dec-w", [*prompt(n), SEED_TOKEN], max_tokens=4, params=prefill_params("push", n)))
    so, _ = step(warm)
    registered = [list(g) for g in so.kv_connector_metadata.push_registrations["dec-w"]["local_block_ids"]]
    assert pair(registered, remote)[0][1] == remote[0][0]  # positions 0-15 land where 16-31 belong


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_a_prefill_with_backoff_is_not_seeded(mode: str) -> None:
    """Mamba/hybrid models (and 0.32's multi-token MTP, bounded replay): NIXL's prefill drops the prompt's
    last token, so its sampled token predicts a prompt token, not the first output token."""
    n = 20
    params = prefill_params(mode, n, mamba=True)
    assert params["remote_num_tokens"] == n - 1
    choice = {"text": "x", "token_ids": [9], "prompt_token_ids": prompt(n), "finish_reason": "length"}
    answer = {"id": "c", "created": 1, "model": "m", "kv_transfer_params": params, "choices": [choice]}
    with pytest.raises(SeedingError, match="backoff"):
        seeding.first_token_from_prefill(seeding.COMPLETIONS_PATH, answer)
    answer["kv_transfer_params"] = prefill_params(mode, n)
    assert seeding.first_token_from_prefill(seeding.COMPLETIONS_PATH, answer).token_id == 9


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_a_rejected_decode_request_queues_the_prefill_release(mode: str) -> None:
    """What ``seeding.release_request`` relies on: vLLM's serving layer, rejecting a decode-side request
    that carries ``do_remote_prefill`` params, submits it pre-aborted (``AsyncLLM.
    notify_kv_transfer_request_rejected``: add_request, then abort).  The scheduler then queues an empty
    read for the prefill's request: the pull worker's notify-only path, which frees the prefill's blocks."""
    params = prefill_params(mode, 20)
    scheduler = nixl_scheduler(MODES[mode], "kv_consumer")
    req = request("rel-1", [0], max_tokens=1, params=dict(params))
    scheduler.add_request(req)
    scheduler.finish_requests(["rel-1"], RequestStatus.FINISHED_ABORTED)  # EngineCore's abort_immediately
    so = scheduler.schedule()
    meta = so.kv_connector_metadata.reqs_to_recv["rel-1"]
    assert not any(meta.local_block_ids) and meta.remote.request_id == params["remote_request_id"]
    assert so.num_scheduled_tokens == {}
    first = seeding.FirstToken(9, "x", tuple(prompt(20)), "stop", None, None, params, "c", 1, "m", answer={})
    got = seeding.release_request(first)
    if mode == "pull":
        assert got is not None and got[1]["kv_transfer_params"] == params and " " in got[1]["model"]
    else:  # the push worker keeps an empty recv waiting and notifies nobody: only the lease frees P
        assert got is None


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(("text", "new", "stops"), STOP_CASES)
def test_check_stop_is_vllms_own_rule(text: str, new: int, stops: list[str], include: bool) -> None:
    want = seeded_vllm.vllm_stop(text, new, stops, include)
    assert seeding.check_stop(text, new, stops, include, earliest_end=True) == want
