"""The simulated engine's OpenAI API over real HTTP on loopback (aiohttp client and server)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from loopback import post_json as _post
from vllm_versions import only_vllm

from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import SimTokenizer


async def _sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """All SSE events of a streamed response; the final ``[DONE]`` is kept as a string."""
    out: list[Any] = []
    async with http.post(url, json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.text()
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ")
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completion_non_stream_shape(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    status, body = await _post(
        http, worker.url + "/v1/completions", {"model": "synth", "prompt": "Hello world", "max_tokens": 7}
    )
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "synth" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    tok = SimTokenizer(worker.settings.model)
    prompt_ids = tok.encode("Hello world")
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "total_tokens": len(prompt_ids) + 7,
        "completion_tokens": 7,
        "prompt_tokens_details": None,
    }
    assert body["kv_transfer_params"] is None
    expected = worker.engine.model.tokens(prompt_ids, 7)  # type: ignore[union-attr]
    assert choice["text"] == tok.decode(expected)


async def test_completion_stream_matches_non_stream(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    req = {"prompt": "The quick brown fox", "max_tokens": 5}
    _, full = await _post(http, worker.url + "/v1/completions", req)
    events = await _sse(
        http, worker.url + "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert len(chunks) == 5
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert all("usage" not in c for c in chunks)


async def test_chat_non_stream_and_stream(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    status, full = await _post(http, worker.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 4})
    assert status == 200
    assert full["id"].startswith("chatcmpl-") and full["object"] == "chat.completion"
    msg = full["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    tok = SimTokenizer(worker.settings.model)
    ids = tok.encode_chat(msgs)
    assert ids[0] == 1 and ids.count(1) == 2  # BOS written by the template once per message, none added
    assert full["usage"]["prompt_tokens"] == len(ids)

    events = await _sse(http, worker.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 4, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == msg["content"]


async def test_token_id_prompt_equals_text_prompt(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    tok = SimTokenizer(worker.settings.model)
    ids = tok.encode("Some prompt text")
    _, a = await _post(http, worker.url + "/v1/completions", {"prompt": "Some prompt text", "max_tokens": 6})
    _, b = await _post(http, worker.url + "/v1/completions", {"prompt": ids, "max_tokens": 6})
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


async def test_output_is_a_function_of_prompt_and_seed(http: aiohttp.ClientSession) -> None:
    body = {"prompt": "deterministic?", "max_tokens": 8, "temperature": 1.3, "top_p": 0.5, "seed": 42}
    texts = []
    for seed in (0, 0, 1):
        async with SimWorker(SimSettings(time_scale=0, seed=seed)) as w:
            _, r = await _post(http, w.url + "/v1/completions", body)
            texts.append(r["choices"][0]["text"])
    assert texts[0] == texts[1] != texts[2]


async def test_stop_string(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    _, full = await _post(http, worker.url + "/v1/completions", {"prompt": "stop test", "max_tokens": 6})
    words = full["choices"][0]["text"].split(" ")
    stop = words[3]  # the third generated word
    _, r = await _post(http, worker.url + "/v1/completions", {"prompt": "stop test", "max_tokens": 6, "stop": [stop]})
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop
    assert stop not in c["text"] and full["choices"][0]["text"].startswith(c["text"])


async def test_default_max_tokens_is_16_for_completions(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    _, r = await _post(http, worker.url + "/v1/completions", {"prompt": "x"})
    assert r["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    ("path", "body", "status", "etype", "param"),
    [
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "NotFoundError", "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
        ("/v1/completions", {"max_tokens": 3}, 400, "BadRequestError", "prompt"),
        (
            "/v1/completions",
            {"prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "BadRequestError",
            "stream_options",
        ),
        ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError", "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "BadRequestError", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "BadRequestError", "messages"),
        ("/v1/completions", [1, 2], 400, "BadRequestError", None),
    ],
)
async def test_validation_errors_are_vllm_shaped(
    worker: SimWorker, http: aiohttp.ClientSession, path: str, body: Any, status: int, etype: str, param: str | None
) -> None:
    code, r = await _post(http, worker.url + path, body)
    assert code == status
    assert set(r) == {"error"}
    assert set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["type"] == etype and r["error"]["code"] == status and r["error"]["param"] == param


async def test_invalid_json_body(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    async with http.post(
        worker.url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "BadRequestError"


async def test_models_health_version_metrics(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    async with http.get(worker.url + "/health") as r:
        assert r.status == 200
    async with http.get(worker.url + "/version") as r:
        assert (await r.json())["version"] == "0.26.0"
    async with http.get(worker.url + "/v1/models") as r:
        models = await r.json()
    assert models["object"] == "list" and models["data"][0]["id"] == "synth"
    assert models["data"][0]["max_model_len"] == 32768
    await _post(http, worker.url + "/v1/completions", {"prompt": "count me", "max_tokens": 3})
    async with http.get(worker.url + "/metrics") as r:
        text = await r.text()
    lbl = '{engine="0",model_name="synth"}'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert f"{name}{lbl}" in text, name
    assert f"vllm:generation_tokens_total{lbl} 3.0" in text
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="synth"} 1.0' in text


async def test_request_id_header_is_used(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    async with http.post(
        worker.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc123"}
    ) as r:
        assert (await r.json())["id"] == "cmpl-abc123"


@pytest.mark.vllm
@only_vllm("0.26", "vllm.entrypoints.openai.engine.protocol moved in 0.32")
async def test_bodies_are_fixed_points_of_vllms_response_models(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    """Parsing our JSON with vLLM 0.26.0's pydantic models and dumping it again changes nothing."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionStreamResponse,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionStreamResponse
    from vllm.entrypoints.openai.engine.protocol import ErrorResponse

    _, comp = await _post(http, worker.url + "/v1/completions", {"prompt": "shape check", "max_tokens": 3})
    assert CompletionResponse.model_validate(comp).model_dump(mode="json") == comp
    msgs = [{"role": "user", "content": "shape check"}]
    _, chat = await _post(http, worker.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 3})
    assert ChatCompletionResponse.model_validate(chat).model_dump(mode="json") == chat
    for path, model, body in (
        ("/v1/completions", CompletionStreamResponse, {"prompt": "s"}),
        ("/v1/chat/completions", ChatCompletionStreamResponse, {"messages": msgs}),
    ):
        events = await _sse(
            http,
            worker.url + path,
            {**body, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
        )
        for ev in events[:-2]:
            assert model.model_validate(ev).model_dump(mode="json", exclude_unset=True) == ev
        usage = events[-2]
        assert model.model_validate(usage).model_dump(mode="json", exclude_none=True) == usage
    _, err = await _post(http, worker.url + "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert ErrorResponse.model_validate(err).model_dump(mode="json") == err
