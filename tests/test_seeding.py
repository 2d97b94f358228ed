"""First-token seeding (pdkit/frontend/seeding.py) against simulated P/D workers over real loopback HTTP.

Why this file: the seeded path must give the client exactly what an aggregated worker gives (text,
token ids, finish and stop reason, usage; streamed or not; completions and chat) while the decode
never samples the first token again.  ``seeded_call`` below drives the real workers the way the
frontend will (docs/seeding.md, "Wiring"): prefill with ``prefill_body``, ``first_token_from_prefill``,
``ends_request``, ``seeded_decode_body`` to the decode's ``/v1/completions``, then ``first_chunk`` +
``SeededStream`` or ``merge_non_streamed``.  The simulator serves a seeded decode as vLLM 0.26 does
(loads the prefill's N tokens, computes the seed token, continues the same answer) and refuses the
block pairing vLLM's NIXL worker would assert on or misalign -- the padding test shows both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import pytest
from loopback import sse_events, sse_summary

from pdkit import prom
from pdkit.frontend import seeding
from pdkit.frontend.seeding import FirstToken, SeededStream, SeedingError
from pdkit.sim.server import SimWorker

PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False}
BLOCK = 16
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def stream_summary(path: str, raw: bytes) -> dict[str, Any]:
    """What a client reads from a stream: text, token ids, finish/stop reason, usage, ids seen."""
    summary = sse_summary(raw, chat=path == CHAT)
    del summary["dones"]
    return summary


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.read()


async def agg_call(http: aiohttp.ClientSession, a: SimWorker, path: str, body: dict[str, Any]) -> Any:
    async with http.post(a.url + path, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.read() if body.get("stream") else await r.json()


async def seeded_call(
    http: aiohttp.ClientSession,
    p: SimWorker,
    d: SimWorker,
    path: str,
    body: dict[str, Any],
    *,
    chunk_split: int | None = None,
    pad: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """The frontend's seeded P/D path, step by step; returns (client answer, what happened)."""
    assert seeding.seed_refusal(path, body) is None
    info: dict[str, Any] = {"decode_hop": False}
    async with http.post(p.url + path, json=seeding.prefill_body(path, body, PREFILL_KV)) as r:
        assert r.status == 200
        first = seeding.first_token_from_prefill(path, await r.json())
    info["first"] = first
    stream = bool(body.get("stream"))
    if seeding.ends_request(path, body, first, d.max_model_len):
        if stream:
            return seeding.single_token_stream(path, body, first), info
        return seeding.single_token_answer(path, body, first), info
    dpath, dbody = seeding.seeded_decode_body(path, body, first, BLOCK, d.max_model_len)
    if not pad:
        assert first.kv_transfer_params is not None
        dbody["kv_transfer_params"] = first.kv_transfer_params
    info["decode_hop"], info["decode_body"] = True, dbody
    async with http.post(d.url + dpath, json=dbody) as r:
        info["decode_status"] = r.status
        if r.status != 200:
            return await r.json(), info
        if not stream:
            return seeding.merge_non_streamed(path, body, first, await r.json()), info
        s = SeededStream(path, body, first)
        out = s.first_chunk()
        raw = await r.read()
        step = chunk_split or len(raw) or 1
        for i in range(0, len(raw), step):  # the decode's bytes in arbitrary pieces, as readany gives them
            out += s.feed(raw[i : i + step])
            if s.done:
                break
        return out, info


def completion_body(n_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"prompt": [1000 + (7 * i) % 5000 for i in range(n_tokens)], "max_tokens": 8, "temperature": 0, **kw}


def chat_body(words: int, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": " ".join(["tell"] * words)}], "max_tokens": 8, **kw}


# ------------------------------------------------------------------------------ pure functions


def test_pad_only_when_the_seed_token_opens_a_block() -> None:
    params = {"remote_block_ids": [[4, 9]], "remote_num_tokens": 32, "remote_engine_id": "p"}
    padded = seeding.seeded_kv_transfer_params(params, 16)
    assert padded["remote_block_ids"] == [[4, 9, 9]]
    assert params["remote_block_ids"] == [[4, 9]]  # the prefill's params are not changed in place
    for n in (15, 17, 31, 33):
        blocks = [list(range(-(-n // 16)))]
        p = {"remote_block_ids": blocks, "remote_num_tokens": n}
        assert seeding.seeded_kv_transfer_params(p, 16)["remote_block_ids"] == blocks


def test_push_mode_refuses_a_whole_block_and_needs_no_pad_otherwise() -> None:
    """vLLM 0.32's prefill says ``transfer_mode``; in push its writer pairs the decode's blocks itself."""
    with pytest.raises(SeedingError, match="push mode"):
        seeding.seeded_kv_transfer_params(
            {"remote_block_ids": [[4, 9]], "remote_num_tokens": 32, "transfer_mode": "push"}, 16
        )
    p = {"remote_block_ids": ([4, 9],), "remote_num_tokens": 31, "transfer_mode": "push"}
    assert seeding.seeded_kv_transfer_params(p, 16)["remote_block_ids"] == ([4, 9],)
    pull = {"remote_block_ids": ([4, 9],), "remote_num_tokens": 32, "transfer_mode": "pull"}  # vLLM's tuple BlockIds
    assert seeding.seeded_kv_transfer_params(pull, 16)["remote_block_ids"] == [[4, 9, 9]]
    with pytest.raises(SeedingError, match="transfer_mode"):
        seeding.seeded_kv_transfer_params({"remote_num_tokens": 31, "transfer_mode": "broadcast"}, 16)


def test_a_prefill_that_cut_the_prompt_short_is_not_seeded() -> None:
    choice = {"text": "a", "token_ids": [5], "prompt_token_ids": [1, 2, 3], "finish_reason": "length"}
    answer = {
        "id": "c",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "kv_transfer_params": {"remote_num_tokens": 2},
    }
    with pytest.raises(SeedingError, match="backoff"):
        seeding.first_token_from_prefill(COMPLETIONS, answer)
    answer["kv_transfer_params"] = {"remote_num_tokens": 3}
    assert seeding.first_token_from_prefill(COMPLETIONS, answer).token_id == 5


def test_one_token_prefills_without_a_remote_decode() -> None:
    """No decode hop follows, so NIXL would only pin the prefill's blocks until its lease runs out."""
    assert "kv_transfer_params" not in seeding.prefill_body(COMPLETIONS, {"prompt": "x", "max_tokens": 1}, PREFILL_KV)
    chat = seeding.prefill_body(CHAT, {"messages": [], "max_completion_tokens": 1, "max_tokens": 9}, PREFILL_KV)
    assert "kv_transfer_params" not in chat and chat["max_tokens"] == 1
    assert seeding.prefill_body(COMPLETIONS, {"prompt": "x", "max_tokens": 2}, PREFILL_KV)["kv_transfer_params"]


def test_release_request_only_for_pull_params() -> None:
    params = {"do_remote_prefill": True, "remote_request_id": "p-1", "remote_num_tokens": 3}
    first = FirstToken(7, " a", (1, 2, 3), "stop", None, None, params, "i", 1, "m", answer={})
    path, body = seeding.release_request(first) or ("", {})
    assert path == "/v1/completions" and body["kv_transfer_params"] == params and body["max_tokens"] == 1
    assert body["model"] == seeding.RELEASE_MODEL and " " in body["model"]  # never a served model's name
    for other in (None, {**params, "transfer_mode": "push"}, {**params, "do_remote_prefill": False}):
        assert seeding.release_request(dataclasses.replace(first, kv_transfer_params=other)) is None


def test_prefill_body_keeps_eos_possible_and_asks_for_token_ids() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True}}
    out = seeding.prefill_body(CHAT, body, PREFILL_KV)
    assert out["max_tokens"] == out["max_completion_tokens"] == 1
    assert out["min_tokens"] == 0 and out["return_token_ids"] is True and out["stream"] is False
    assert "stream_options" not in out and out["kv_transfer_params"] == PREFILL_KV
    assert seeding.prefill_body(COMPLETIONS, {"prompt": "x", "min_tokens": 5}, PREFILL_KV)["min_tokens"] == 1


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (COMPLETIONS, {"prompt": "x", "n": 2}, "n > 1"),
        (COMPLETIONS, {"prompt": "x", "echo": True}, "echo"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "several prompts"),
        (CHAT, {"messages": [], "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"messages": [], "response_format": {"type": "json_object"}}, "response_format"),
        (CHAT, {"messages": [], "logprobs": True}, "chat logprobs"),
        (COMPLETIONS, {"prompt": "x", "frequency_penalty": 0.5}, "penalties"),
        (COMPLETIONS, {"prompt": "x", "seed": 3, "temperature": 0.7}, "seed with sampling"),
        (COMPLETIONS, {"prompt": "x", "stop": ["a"]}, "without streaming"),
        (COMPLETIONS, {"prompt": "x", "stream": True, "stop": "a", "min_tokens": 3}, "min_tokens"),
        (COMPLETIONS, {"prompt": "x", "guided_json": {}}, "guided_json"),
    ],
)
def test_requests_that_would_differ_are_not_seeded(path: str, body: dict[str, Any], reason: str) -> None:
    got = seeding.seed_refusal(path, body)
    assert got is not None and reason in got
    assert seeding.seed_refusal(CHAT, {"messages": [], "max_tokens": 4}, output_parsers=True) is not None
    assert seeding.seed_refusal(COMPLETIONS, {"prompt": [1, 2], "stream": True, "stop": ["x"]}) is None


def test_a_prefill_answer_without_token_ids_is_refused() -> None:
    answer = {"id": "c", "created": 1, "model": "m", "choices": [{"text": "a", "token_ids": None}]}
    with pytest.raises(SeedingError, match="token_ids"):
        seeding.first_token_from_prefill(COMPLETIONS, answer)
    with pytest.raises(SeedingError, match="not a /v1/chat/completions answer"):
        seeding.first_token_from_prefill(CHAT, {"choices": []})


def test_decode_body_limits() -> None:
    first = FirstToken(7, " a", (1, 2, 3), "length", None, None, {"remote_num_tokens": 3}, "i", 1, "m", answer={})
    _, body = seeding.seeded_decode_body(COMPLETIONS, {"prompt": "x"}, first, 16)
    assert body["prompt"] == [1, 2, 3, 7] and body["max_tokens"] == 15  # vLLM's completions default is 16
    _, body = seeding.seeded_decode_body(CHAT, {"messages": [], "min_tokens": 4}, first, 16, max_model_len=10)
    assert body["max_tokens"] == 6 and body["min_tokens"] == 3 and "messages" not in body
    with pytest.raises(SeedingError, match="max_model_len"):
        seeding.seeded_decode_body(CHAT, {"messages": []}, first, 16)
    assert seeding.ends_request(CHAT, {"max_completion_tokens": 1}, first)
    assert seeding.ends_request(COMPLETIONS, {}, first, max_model_len=4)
    assert not seeding.ends_request(COMPLETIONS, {}, first, max_model_len=5)


def test_check_stop_is_vllms_rule_over_the_whole_output() -> None:
    # " abc" came from the prefill, " def" is the decode's first delta: the stop spans the seed
    assert seeding.check_stop(" abc def", 4, ["c d"], include=False) == ("c d", 3)
    assert seeding.check_stop(" abc def", 4, ["c d"], include=True) == ("c d", 6)
    assert seeding.check_stop(" abc def", 4, ["zz", "bc d", "c d"], include=False) == ("bc d", 2)  # list order
    assert seeding.check_stop(" abc def", 2, ["bc"], include=False) is None  # already searched text
    assert seeding.check_stop(" abc", 0, ["a"], include=False) is None
    # two stops in one chunk: vLLM 0.32 takes the one that completes first, 0.26 the first listed
    assert seeding.check_stop(" abcdef", 7, ["ef", "bc"], include=False) == ("bc", 2)
    assert seeding.check_stop(" abcdef", 7, ["ef", "bc"], include=False, earliest_end=False) == ("ef", 5)


# ------------------------------------------------------------------------------ against the sim


@pytest.mark.parametrize("n", [15, 16, 17, 31, 32, 33])
async def test_seeded_completion_equals_agg(trio, http: aiohttp.ClientSession, n: int) -> None:
    p, d, a = trio
    body = completion_body(n)
    want = await agg_call(http, a, COMPLETIONS, body)
    got, info = await seeded_call(http, p, d, COMPLETIONS, body)
    assert info["decode_hop"] and info["decode_status"] == 200
    assert len(info["decode_body"]["prompt"]) == n + 1 and info["decode_body"]["max_tokens"] == 7
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["prompt_tokens"] == n and got["usage"]["completion_tokens"] == 8
    assert got["usage"]["total_tokens"] == n + 8
    assert got["choices"][0]["token_ids"] is None and got["choices"][0]["prompt_token_ids"] is None
    assert got["kv_transfer_params"] is None and got["id"] == info["first"].id
    async with http.get(d.url + "/metrics") as r:
        metrics = await r.text()
    # the decode sampled tokens 2..8 only: the first one is the prefill's
    assert prom.total(metrics, "vllm:generation_tokens_total") == 7
    assert prom.total(metrics, "pdkit_sim:kv_transfer_bytes_total") > 0  # and it loaded the prompt's KV


@pytest.mark.parametrize("n", [16, 32])
async def test_unpadded_params_are_refused_like_vllms_nixl_worker(trio, http: aiohttp.ClientSession, n: int) -> None:
    p, d, _ = trio
    got, info = await seeded_call(http, p, d, COMPLETIONS, completion_body(n), pad=False)
    assert info["decode_status"] == 500 and got["error"]["message"] == "Internal server error"


async def test_seeded_decode_with_a_local_prefix_hit(trio, http: aiohttp.ClientSession) -> None:
    """The decode already caches the prompt's first block (a second turn): padding keeps blocks aligned."""
    p, d, a = trio
    body = completion_body(32, max_tokens=5)
    async with http.post(d.url + COMPLETIONS, json={**body, "prompt": body["prompt"][:20]}) as r:
        assert r.status == 200  # caches block 0 on the decode worker
    want = await agg_call(http, a, COMPLETIONS, body)
    got, info = await seeded_call(http, p, d, COMPLETIONS, body)
    assert info["decode_status"] == 200 and got["choices"][0]["text"] == want["choices"][0]["text"]
    got, info = await seeded_call(http, p, d, COMPLETIONS, body, pad=False)
    assert info["decode_status"] == 500  # unpadded: every block would be read one position off


@pytest.mark.parametrize("split", [None, 7])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_seeded_stream_equals_agg_stream(trio, http: aiohttp.ClientSession, path: str, split: int | None) -> None:
    p, d, a = trio
    extra = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body = (completion_body(40) if path == COMPLETIONS else chat_body(30)) | extra | {"return_token_ids": True}
    want = stream_summary(path, await agg_call(http, a, path, body))
    raw, info = await seeded_call(http, p, d, path, body, chunk_split=split)
    got = stream_summary(path, raw)
    for key in ("text", "ids", "finish", "usage"):
        assert got[key] == want[key], key
    assert got["ids"][0] == info["first"].token_id and len(got["ids"]) == 8
    first = info["first"]
    obj = "chat.completion.chunk" if path == CHAT else "text_completion"
    assert got["rids"] == {(first.id, obj, first.model)}  # one id for the whole stream: the prefill's
    events = sse_events(raw)
    if path == CHAT:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[0]["prompt_token_ids"] == list(first.prompt_token_ids)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_seeded_chat_and_completion_full_answers(trio, http: aiohttp.ClientSession, path: str) -> None:
    p, d, a = trio
    body = completion_body(24) if path == COMPLETIONS else chat_body(12)
    want = await agg_call(http, a, path, body)
    got, _ = await seeded_call(http, p, d, path, body)
    key = "text" if path == COMPLETIONS else "message"
    assert got["choices"][0][key] == want["choices"][0][key]
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    assert got["object"] == want["object"]


async def test_completion_logprobs_come_from_the_prefill_then_the_decode(trio, http: aiohttp.ClientSession) -> None:
    p, d, a = trio
    body = completion_body(20, logprobs=2)
    want = await agg_call(http, a, COMPLETIONS, body)
    got, _ = await seeded_call(http, p, d, COMPLETIONS, body)
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_one_takes_no_decode_hop(trio, http: aiohttp.ClientSession, path: str, stream: bool) -> None:
    p, d, a = trio
    body = (completion_body(20) if path == COMPLETIONS else chat_body(9)) | {"max_tokens": 1, "stream": stream}
    want = await agg_call(http, a, path, body)
    got, info = await seeded_call(http, p, d, path, body)
    assert not info["decode_hop"]
    if stream:
        g, w = stream_summary(path, got), stream_summary(path, want)
        assert (g["text"], g["finish"]) == (w["text"], w["finish"])
    else:
        assert got["choices"][0]["finish_reason"] == "length" and got["kv_transfer_params"] is None
        assert got["usage"] == want["usage"]
        assert got["choices"][0]["token_ids"] is None


async def test_stop_string_across_the_seed_ends_the_stream_like_agg(trio, http: aiohttp.ClientSession) -> None:
    """The decode cannot see a stop string that starts in the seeded token's text; the frontend does."""
    p, d, a = trio
    plain = await agg_call(http, a, COMPLETIONS, completion_body(30, max_tokens=3, logprobs=0))
    t1, t2 = plain["choices"][0]["logprobs"]["tokens"][:2]
    stop = t1[-1:] + t2[:2]
    body = completion_body(30, max_tokens=6, stream=True, stop=["qqqq", stop])
    want = stream_summary(COMPLETIONS, await agg_call(http, a, COMPLETIONS, body))
    assert (want["finish"], want["stop"]) == ("stop", stop) and want["text"] == t1[:-1]
    for split in (None, 3):
        raw, info = await seeded_call(http, p, d, COMPLETIONS, body, chunk_split=split)
        got = stream_summary(COMPLETIONS, raw)
        assert info["decode_hop"] and info["first"].finish_reason == "length"
        assert (got["text"], got["finish"], got["stop"]) == (want["text"], "stop", stop)


async def test_stop_string_inside_the_first_token_ends_at_the_prefill(trio, http: aiohttp.ClientSession) -> None:
    p, d, a = trio
    plain = await agg_call(http, a, COMPLETIONS, completion_body(30, max_tokens=2, logprobs=0))
    t1 = plain["choices"][0]["logprobs"]["tokens"][0]
    body = completion_body(30, stream=True, stop=[t1[1:3]])
    want = stream_summary(COMPLETIONS, await agg_call(http, a, COMPLETIONS, body))
    raw, info = await seeded_call(http, p, d, COMPLETIONS, body)
    assert not info["decode_hop"]
    got = stream_summary(COMPLETIONS, raw)
    assert (got["text"], got["finish"], got["stop"]) == (want["text"], want["finish"], want["stop"])


def test_seeded_stream_passes_an_error_event_through_and_stops() -> None:
    first = FirstToken(7, " a", (1, 2), "length", None, None, None, "cmpl-1", 5, "m", answer={})
    s = SeededStream(COMPLETIONS, {"stream": True}, first)
    err = b'data: {"error": {"message": "Internal server error", "code": 500}}\n\n'
    assert s.feed(err[:10]) == b""
    assert s.feed(err[10:]) == err and s.done
    assert s.feed(b"data: [DONE]\n\n") == b""


async def test_local_reprefill_of_prompt_and_streamed_tokens_continues_the_answer(
    trio, http: aiohttp.ClientSession
) -> None:
    """The fault fallback: the decode lost the KV, so prompt + first token is prefilled locally (no params)."""
    p, d, a = trio
    body = completion_body(40, return_token_ids=True)
    want = await agg_call(http, a, COMPLETIONS, body)
    answer_ids = want["choices"][0]["token_ids"]
    got, info = await seeded_call(http, p, d, COMPLETIONS, body)
    dbody = {k: v for k, v in info["decode_body"].items() if k != "kv_transfer_params"}
    async with http.post(d.url + COMPLETIONS, json=dbody) as r:
        local = await r.json()
    assert local["choices"][0]["token_ids"] == answer_ids[1:]
    # the sim model continues any tail of its own answer, as a real model continues a sequence
    assert d.engine is not None
    model = d.engine.model
    prompt_ids = body["prompt"]
    assert model.tokens([*prompt_ids, *answer_ids[:3]], 5) == answer_ids[3:8]
    assert model.tokens(prompt_ids, 8) == answer_ids
