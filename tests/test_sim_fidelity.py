"""The simulated engine answers vLLM 0.26's API options: n, echo, prompt lists, logprobs, sampling, limits.

Real HTTP on loopback against the real sim server; shapes are checked against vLLM 0.26's own pydantic
response models where the venv has vLLM.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from loopback import post_json as _post
from vllm_versions import only_vllm

from pdkit.sim.server import SimWorker
from pdkit.sim.settings import SimSettings

MSGS = [{"role": "user", "content": "tell me something"}]


async def _sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    async with http.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200
        raw = await r.text()
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block:
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    assert out[-1] == "[DONE]"
    return out[:-1]


async def test_n_choices_share_the_prompt_and_count_all_output(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/completions"
    _, one = await _post(http, url, {"prompt": "several answers", "max_tokens": 5})
    _, two = await _post(http, url, {"prompt": "several answers", "max_tokens": 5, "n": 3})
    assert [c["index"] for c in two["choices"]] == [0, 1, 2]
    # greedy: every choice is the one greedy answer (as in vLLM)
    assert {c["text"] for c in two["choices"]} == {one["choices"][0]["text"]}
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert two["usage"]["completion_tokens"] == 15
    # sampled with a seed: reproducible; choice j uses seed + j (vLLM's parallel sampling)
    body = {"prompt": "several answers", "max_tokens": 12, "n": 2, "temperature": 1.5, "seed": 11}
    _, a = await _post(http, url, body)
    _, b = await _post(http, url, body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    _, shifted = await _post(http, url, {**body, "n": 1, "seed": 12})
    assert shifted["choices"][0]["text"] == a["choices"][1]["text"]
    assert a["choices"][0]["text"] != one["choices"][0]["text"]


async def test_greedy_stream_is_unchanged_by_sampling_options(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/completions"
    _, plain = await _post(http, url, {"prompt": "same as before", "max_tokens": 10})
    _, greedy = await _post(
        http, url, {"prompt": "same as before", "max_tokens": 10, "temperature": 0, "seed": 3, "logprobs": 2}
    )
    assert greedy["choices"][0]["text"] == plain["choices"][0]["text"]
    lp = greedy["choices"][0]["logprobs"]
    # greedy picks the most likely token at every position
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == logprob == max(top.values())


async def test_prompt_lists_give_one_choice_per_prompt(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/completions"
    singles = [(await _post(http, url, {"prompt": p, "max_tokens": 4}))[1] for p in ("first one", "second one")]
    _, both = await _post(http, url, {"prompt": ["first one", "second one"], "max_tokens": 4, "n": 2})
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in both["choices"]]
    assert texts == [singles[0]["choices"][0]["text"]] * 2 + [singles[1]["choices"][0]["text"]] * 2
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert both["usage"]["completion_tokens"] == 16
    _, ids = await _post(http, url, {"prompt": [[1, 500, 600], [1, 700]], "max_tokens": 2})
    assert [c["index"] for c in ids["choices"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 5
    events = await _sse(
        http, url, {"prompt": ["first one", "second one"], "max_tokens": 4, "stream_options": {"include_usage": True}}
    )
    streamed = {0: "", 1: ""}
    for ev in events[:-1]:
        (choice,) = ev["choices"]
        streamed[choice["index"]] += choice["text"]
    assert list(streamed.values()) == [s["choices"][0]["text"] for s in singles]
    assert events[-1]["usage"]["completion_tokens"] == 8


async def test_echo_prepends_the_prompt(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/completions"
    _, plain = await _post(http, url, {"prompt": "echo me", "max_tokens": 3})
    _, echoed = await _post(http, url, {"prompt": "echo me", "max_tokens": 3, "echo": True})
    assert echoed["choices"][0]["text"] == "echo me" + plain["choices"][0]["text"]
    _, only = await _post(http, url, {"prompt": "echo me", "max_tokens": 0, "echo": True, "logprobs": 1})
    choice = only["choices"][0]
    assert choice["text"] == "echo me"
    n_prompt = only["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["tokens"]) == n_prompt
    assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
    assert len(choice["prompt_logprobs"]) == n_prompt and choice["prompt_logprobs"][0] is None
    events = await _sse(http, url, {"prompt": "echo me", "max_tokens": 3, "echo": True})
    assert "".join(ev["choices"][0]["text"] for ev in events) == echoed["choices"][0]["text"]


async def test_completion_logprobs_shape(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/completions"
    body = {"prompt": "with logprobs", "max_tokens": 6, "logprobs": 3, "temperature": 1.0, "seed": 5}
    _, r = await _post(http, url, body)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert list(lp) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 6
    offsets = [0]
    for tok in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp["text_offset"] == offsets
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == logprob < 0 and 3 <= len(top) <= 4
    events = await _sse(http, url, body)
    streamed = [ev["choices"][0]["logprobs"] for ev in events]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["token_logprobs"] for s in streamed), []) == lp["token_logprobs"]


async def test_chat_logprobs_shape(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    url = worker.url + "/v1/chat/completions"
    body = {"messages": MSGS, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    _, r = await _post(http, url, body)
    content = r["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] and "".join(c["token"] for c in content) == r["choices"][0]["message"][
        "content"
    ]
    for item in content:
        assert list(item) == ["token", "logprob", "bytes", "top_logprobs"]
        assert item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["token"] == item["token"]
    _, bare = await _post(http, url, {"messages": MSGS, "max_tokens": 2, "logprobs": True})
    assert all(item["top_logprobs"] == [] for item in bare["choices"][0]["logprobs"]["content"])
    events = await _sse(http, url, body)
    streamed = [item for ev in events for item in (ev["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert streamed == content
    code, err = await _post(http, url, {"messages": MSGS, "top_logprobs": 2})
    assert code == 400 and err["error"]["param"] == "top_logprobs"
    code, err = await _post(http, worker.url + "/v1/completions", {"prompt": "x", "logprobs": 21})
    assert code == 400 and "greater than max allowed: 20" in err["error"]["message"]


async def test_chat_n_streams_every_choice(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    events = await _sse(
        http,
        worker.url + "/v1/chat/completions",
        {"messages": MSGS, "max_tokens": 3, "n": 2, "temperature": 1, "seed": 1},
    )
    roles = [ev["choices"][0]["index"] for ev in events if ev["choices"][0]["delta"].get("role")]
    finished = [ev["choices"][0]["index"] for ev in events if ev["choices"][0]["finish_reason"]]
    assert roles == [0, 1] and sorted(finished) == [0, 1]


async def test_context_length_errors_are_vllms(http: aiohttp.ClientSession) -> None:
    async with SimWorker(SimSettings(time_scale=0, max_model_len=32)) as w:
        url = w.url + "/v1/completions"
        code, r = await _post(http, url, {"prompt": "hi", "max_tokens": 100})
        assert code == 400 and r["error"]["param"] == "max_tokens"
        assert r["error"]["message"] == (
            "max_tokens=100 cannot be greater than max_model_len=max_total_tokens=32. "
            "Please request fewer output tokens."
        )
        code, r = await _post(http, url, {"prompt": "word " * 20, "max_tokens": 20})
        assert code == 400 and r["error"]["param"] == "input_tokens"
        assert r["error"]["message"].startswith(
            "This model's maximum context length is 32 tokens. However, you requested 20 output tokens and your "
            "prompt contains at least 13 input tokens, for a total of at least 33 tokens."
        )
        code, r = await _post(http, url, {"prompt": list(range(1, 31)), "max_tokens": 5})
        assert code == 400 and "your prompt contains 30 input tokens, for a total of 35 tokens" in r["error"]["message"]
        code, r = await _post(http, url, {"prompt": "x" * 5000, "max_tokens": 1})
        assert code == 400 and r["error"]["param"] == "input_text"
        chat = [{"role": "user", "content": "word " * 40}]
        code, r = await _post(http, w.url + "/v1/chat/completions", {"messages": chat})
        assert code == 400 and "you requested 0 output tokens" in r["error"]["message"]
        code, r = await _post(http, url, {"prompt": "word " * 10, "max_tokens": 12})
        assert code == 200 and r["usage"]["completion_tokens"] == 12


async def test_health_answers_while_a_huge_prompt_is_tokenized(http: aiohttp.ClientSession) -> None:
    async with SimWorker(SimSettings(time_scale=0, max_model_len=400_000)) as w:
        big = asyncio.create_task(_post(http, w.url + "/v1/completions", {"prompt": "hello world " * 300_000}))
        answered_meanwhile = False
        while not big.done():
            async with http.get(w.url + "/health") as r:
                assert r.status == 200
            answered_meanwhile = answered_meanwhile or not big.done()
            await asyncio.sleep(0.05)
        code, body = await big
        assert code == 400 and body["error"]["param"] == "input_tokens"
        assert answered_meanwhile


async def test_models_card_has_vllms_fields(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    async with http.get(worker.url + "/v1/models") as r:
        card = (await r.json())["data"][0]
    assert list(card) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
    assert card["max_model_len"] == worker.max_model_len and card["permission"][0]["object"] == "model_permission"


@pytest.mark.vllm
@only_vllm("0.26", "the sim imitates vLLM 0.26's response models; 0.32 moved their modules")
async def test_new_shapes_are_fixed_points_of_vllms_models(worker: SimWorker, http: aiohttp.ClientSession) -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionStreamResponse,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionStreamResponse
    from vllm.entrypoints.openai.engine.protocol import ModelList

    comp = {"prompt": ["a b", "c d"], "max_tokens": 3, "n": 2, "logprobs": 2, "echo": True}
    _, r = await _post(http, worker.url + "/v1/completions", comp)
    assert CompletionResponse.model_validate(r).model_dump(mode="json") == r
    chat = {"messages": MSGS, "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2, "temperature": 0.7}
    _, r = await _post(http, worker.url + "/v1/chat/completions", chat)
    assert ChatCompletionResponse.model_validate(r).model_dump(mode="json") == r
    for path, model, body in (
        ("/v1/completions", CompletionStreamResponse, comp),
        ("/v1/chat/completions", ChatCompletionStreamResponse, chat),
    ):
        for ev in await _sse(http, worker.url + path, body):
            assert model.model_validate(ev).model_dump(mode="json", exclude_unset=True) == ev
    async with http.get(worker.url + "/v1/models") as resp:
        models = await resp.json()
    assert ModelList.model_validate(models).model_dump(mode="json") == models


async def test_the_sim_refuses_what_vllm_refuses() -> None:
    """The sim engine uses the frontend's vLLM-equal validator: a bad sampling parameter is a 400 there too."""
    from pdkit.sim.server import SimWorker
    from pdkit.sim.settings import SimSettings

    async with SimWorker(SimSettings(role="agg", hash_seed="0", time_scale=0)) as w, aiohttp.ClientSession() as http:
        async with http.post(w.url + "/v1/completions", json={"prompt": "hi", "temperature": "hot"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "body.temperature"
