"""Driving vLLM's real Scheduler with seeded decodes: the parts tests/test_seeding_vllm*.py share.

Import only after ``pytest.importorskip("vllm")``.  Why a module: the 0.26 and the 0.32 proofs build the
same NIXL scheduler, the same prompts and requests and the same hand-made model-runner step; what they
assert differs by version and stays in each file.
"""

from __future__ import annotations

from typing import Any

from vllm.config import KVEventsConfig, KVTransferConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core import kv_cache_utils as kcu
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.detokenizer import check_stop_strings
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm_scheduler import real_scheduler

BS = 16
SEED_TOKEN = 555
MODES = {"pull": "NixlConnector", "push": "NixlPushConnector"}
STOP_CASES = [(" abcdef", 7, ["ef", "bc"]), (" abcdef", 2, ["ef", "bc"]), (" abc def", 4, ["zz", "bc d", "c d"]),
              (" abcdef", 3, ["f", "def", "cdef"]), ("xyz", 1, ["q"]), ("aaaa", 2, ["aa", "a"])]  # fmt: skip


def cdiv(a: int) -> int:
    """Blocks of ``BS`` tokens that hold ``a`` tokens."""
    return -(-a // BS)


def vllm_stop(text: str, new: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """vLLM's own ``check_stop_strings`` verdict in ``seeding.check_stop``'s terms (its -1, "no truncation",
    as the text's full length), so each version's test compares against vLLM itself."""
    want = check_stop_strings(text, new, stops, include)
    if want is not None and want[1] == -1:
        want = (want[0], len(text))
    return want


def nixl_scheduler(connector: str, role: str) -> Scheduler:
    """A real scheduler with NIXL connector ``connector`` as ``role`` (UCX backend, no KV events)."""
    ktc = KVTransferConfig(kv_connector=connector, kv_role=role, kv_connector_extra_config={"backends": ["UCX"]})
    scheduler, _, _ = real_scheduler(block_size=BS, num_blocks=64, max_model_len=512,
                                     kv_events_config=KVEventsConfig(enable_kv_cache_events=False),
                                     kv_transfer_config=ktc)  # fmt: skip
    return scheduler


def prompt(n: int) -> list[int]:
    """``n`` prompt token ids, none of them special."""
    return [(7 * i) % 1000 + 3 for i in range(n)]


def request(rid: str, ids: list[int], max_tokens: int, params: dict[str, Any] | None) -> Request:
    """A vLLM request of ``ids`` carrying ``params`` as its kv_transfer_params."""
    extra = {"kv_transfer_params": params} if params is not None else None
    return Request(request_id=rid, prompt_token_ids=ids, pooling_params=None,
                   sampling_params=SamplingParams(max_tokens=max_tokens, extra_args=extra),
                   block_hasher=kcu.get_request_block_hasher(BS, sha256))  # fmt: skip


def step_outputs(scheduler: Scheduler, finished_recving: set[str] | None = None) -> tuple[Any, Any, Any]:
    """schedule -> (fake) model runner: one sampled token per request -> update_from_output; all three results."""
    so = scheduler.schedule()
    rids = list(so.num_scheduled_tokens)
    kv_out = KVConnectorOutput(finished_recving=finished_recving)
    mro = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                            sampled_token_ids=[[42] for _ in rids], kv_connector_output=kv_out)  # fmt: skip
    return so, mro, scheduler.update_from_output(so, mro)


def assert_seed_computed_then_decoding(scheduler: Scheduler, req: Request, n: int) -> None:
    """The two steps after a seeded decode's KV arrived: vLLM's recompute-the-last-token rule has the
    ``n`` prompt tokens come from the prefill and the seed token computed here, then plain decoding."""
    rid = req.request_id
    so, _, _ = step_outputs(scheduler)
    assert so.num_scheduled_tokens == {rid: 1}
    assert [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs] == [(rid, n)]
    assert list(req.output_token_ids) == [42] and req.status == RequestStatus.RUNNING
    so, _, _ = step_outputs(scheduler)
    assert so.num_scheduled_tokens == {rid: 1}  # plain decoding from here on


def add_seeded_decode(scheduler: Scheduler, rid: str, n: int, params: dict[str, Any]) -> tuple[Request, Any]:
    """Add decode request ``rid`` (the ``n``-token prompt plus the seed token) and run the step in which
    its KV transfer is reported done; (the request, its ``reqs_to_recv`` metadata)."""
    req = request(rid, [*prompt(n), SEED_TOKEN], max_tokens=4, params=params)
    scheduler.add_request(req)
    so, _, _ = step_outputs(scheduler, finished_recving={rid})
    return req, so.kv_connector_metadata.reqs_to_recv[rid]
