"""``seeding.release_request`` against vLLM's own serving-layer code (0.26 and 0.32 alike).

Why: a request that the prefill's first token ends (EOS, stop) runs no decode hop, so the prefill's NIXL
blocks stay leased.  vLLM frees them early for a decode-side request its serving layer rejects: the body
must validate as a ``CompletionRequest``, ``_check_model`` must answer it with an ErrorResponse (404), and
``_with_kv_transfer_rejection_cleanup`` must then hand the prefill's params to
``notify_kv_transfer_request_rejected``.  What follows in the engine (a pre-aborted request, an empty
read, the notification) is tested with the real scheduler in test_seeding_vllm.py / test_seeding_vllm032.py.

Real: CompletionRequest, BaseServing._check_model, GenerateBaseServing._with_kv_transfer_rejection_cleanup.
Stand-ins (they would need a running engine): the served-models registry and the engine client, which
records the notification instead of submitting it.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.entrypoints.generate.base.serving import GenerateBaseServing  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402
from vllm.entrypoints.serve.engine.serving import BaseServing  # noqa: E402

from pdkit.frontend import seeding  # noqa: E402

try:  # the module moved between 0.26 and 0.32
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
except ImportError:
    from vllm.entrypoints.openai.engine.protocol import ErrorResponse  # type: ignore[no-redef]

PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[3, 4]],
          "remote_engine_id": "prefill-0", "remote_request_id": "cmpl-p-0", "remote_host": "127.0.0.1",
          "remote_port": 5600, "tp_size": 1, "remote_num_tokens": 20, "transfer_mode": "pull"}  # fmt: skip


class EngineClientStandIn:
    """Records what the serving layer asks the engine to release (the real one submits a pre-aborted request)."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str, dict[str, Any]]] = []

    async def notify_kv_transfer_request_rejected(
        self, request_id: str, kv_transfer_params: dict[str, Any], *, data_parallel_rank: int | None = None
    ) -> None:
        self.rejected.append((request_id, kv_transfer_params))


def serving_stand_in(engine: EngineClientStandIn) -> Any:
    """A decode worker's completions server serving "my-model": vLLM's own methods on stand-in state."""
    models = types.SimpleNamespace(is_base_model=lambda name: name == "my-model", lora_requests={},
                                   base_model_paths=[types.SimpleNamespace(name="my-model")])  # fmt: skip
    s = types.SimpleNamespace(request_logger=None, models=models, has_kv_connector=True, engine_client=engine)
    s._is_model_supported = types.MethodType(BaseServing._is_model_supported, s)
    s.create_error_response = BaseServing.create_error_response
    s._get_data_parallel_rank = GenerateBaseServing._get_data_parallel_rank
    return s


def test_the_release_request_is_rejected_and_hands_the_params_to_the_engine() -> None:
    first = seeding.FirstToken(9, "x", tuple(range(20)), "stop", None, None, PARAMS, "c", 1, "m", answer={})
    got = seeding.release_request(first)
    assert got is not None
    path, body = got
    assert path == "/v1/completions"
    request = CompletionRequest.model_validate(body)  # the decode's body validation accepts it
    engine = EngineClientStandIn()
    s = serving_stand_in(engine)

    async def run() -> Any:
        check = BaseServing._check_model(s, request)
        return await GenerateBaseServing._with_kv_transfer_rejection_cleanup(s, check, request, None)

    answer = asyncio.run(run())
    assert isinstance(answer, ErrorResponse) and answer.error.code == 404  # before any prompt work
    assert engine.rejected == [(request.request_id, PARAMS)]


def test_a_served_model_name_is_not_released() -> None:
    """The same path with the served model: no rejection, no release (a normal decode request)."""
    request = CompletionRequest.model_validate({"model": "my-model", "prompt": [9], "kv_transfer_params": PARAMS})
    engine = EngineClientStandIn()
    s = serving_stand_in(engine)

    async def run() -> Any:
        check = BaseServing._check_model(s, request)
        return await GenerateBaseServing._with_kv_transfer_rejection_cleanup(s, check, request, None)

    assert asyncio.run(run()) is None and engine.rejected == []
