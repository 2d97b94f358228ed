"""Push mode pairs a decode with its prefill by request id: why a chat request is never seeded there.

Found on one H200 (vLLM 0.26, ``--backend ray``, ``nixl.mode: push``, 2026-12-02): the seeded decode of a
chat request got no first byte in 120 s.  vLLM's push prefill starts its WRITE only when a decode's
block registration matches one of its finished requests, and the match is by request id
(``NixlPushConnectorWorker._pop_matching_registration``: equal, or equal once the random ``-<8 hex>``
suffix is stripped).  Both hops carry the client's ``X-Request-Id``, but each API prefixes it: a chat
prefill is ``chatcmpl-<id>``, the seeded decode -- token ids, so ``/v1/completions`` -- is
``cmpl-<id>-0``.  Real: vLLM's serving code (where the prefixes come from) and its matching function;
the registry dict it searches is filled by hand (the rest of the writer thread needs a GPU and NIXL).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlPushConnectorWorker  # noqa: E402

from pdkit.frontend import seeding  # noqa: E402

RID = "3f2a9c"  # the X-Request-Id both hops carry


def source_of(module: str) -> str:
    """A vLLM module's source, read without importing it (the serving layer needs packages, e.g. orjson,
    that the CPU test environments of some releases leave out)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return Path(spec.origin).read_text()


def test_vllm_prefixes_the_request_id_per_api() -> None:
    """Where the two ids come from (so a vLLM release that changes them fails here first)."""
    chat = source_of("vllm.entrypoints.openai.chat_completion.serving")
    assert 'f"chatcmpl-{self._base_request_id(raw_request' in chat
    completions = source_of("vllm.entrypoints.openai.completion.serving")
    assert 'f"cmpl-{self._base_request_id(raw_request' in completions
    assert 'f"{request_id}-{i}"' in completions  # one engine request per prompt: ...-0 for ours


def pairs(prefill_id: str, decode_id: str) -> bool:
    """Does vLLM's push prefill find the decode's registration for its finished request?"""
    worker = SimpleNamespace(_pending_d_registrations={decode_id: {"request_id": decode_id}})
    return NixlPushConnectorWorker._pop_matching_registration(worker, prefill_id) is not None


def test_push_pairs_completions_hops_but_never_a_chat_prefill_with_a_seeded_decode() -> None:
    seeded_decode = f"cmpl-{RID}-0-0badf00d"
    assert pairs(f"cmpl-{RID}-0-12345678", seeded_decode)  # completions request, seeded: one pair
    assert pairs(f"chatcmpl-{RID}-12345678", f"chatcmpl-{RID}-9abcdef0")  # chat request, unseeded
    assert not pairs(f"chatcmpl-{RID}-12345678", seeded_decode)  # chat request, seeded: the hang


@pytest.mark.parametrize("where", ["params", "worker"])
def test_a_chat_request_in_push_mode_is_decoded_unseeded(where: str) -> None:
    """0.32's params name the mode; 0.26's do not, so the prefill worker's registered mode decides."""
    params = {"remote_num_tokens": 11, "remote_block_ids": [[4]]}
    mode = None
    if where == "params":
        params["transfer_mode"] = "push"
    else:
        mode = "push"
    with pytest.raises(seeding.SeedingError, match="request id"):
        seeding.seeded_kv_transfer_params(params, 16, chat=True, nixl_mode=mode)
    assert seeding.seeded_kv_transfer_params(params, 16, chat=False, nixl_mode=mode)["remote_block_ids"] == [[4]]
    pull = {**params, "transfer_mode": "pull"} if where == "params" else params
    assert seeding.seeded_kv_transfer_params(pull, 16, chat=True, nixl_mode=None if where == "params" else "pull")
