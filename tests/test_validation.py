"""The frontend's request validation against vLLM 0.26's own answer.

The oracle is vLLM's real code on CPU: its request classes validated by a FastAPI route with vLLM's exception
handlers (the API server's), then the serving path's ``get_max_tokens``, ``to_sampling_params``,
``TokenizeParams`` and the engine input processor's prompt-length check.  Each body's verdict, message and
``param`` must equal ours.  The cases listed in issue 18 are also pinned as literal texts, so they run where
vLLM is not installed.  (No ``from __future__ import annotations`` here: FastAPI must see the route's real
request classes, which are imported inside the fixture.)
"""

import random
import types
from typing import Any

import pytest
from vllm_versions import only_vllm

from pdkit.frontend.requests import RequestError
from pdkit.frontend.validation import check_context_length, validate_request

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]

# The oracle is vLLM 0.26's own request classes and error handlers: pdkit matches 0.26's 400s (what the
# frontend validates against); 0.32 moved those modules, and its messages are not pdkit's reference yet.
ORACLE_026 = only_vllm("0.26", "compares with vLLM 0.26's request classes and error handlers")


def ours(path: str, body: dict[str, Any]) -> tuple[int, str, str | None]:
    try:
        validate_request(path, body)
    except RequestError as exc:
        return exc.status, exc.message, exc.param
    return 200, "", None


def cmpl(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **kw}


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSGS, **kw}


def _type_error(field: str, kind: str, msg: str, value: Any) -> str:
    return (
        f"1 validation error:\n  {{'type': '{kind}', 'loc': ('body', '{field}'), 'msg': '{msg}', 'input': {value!r}}}"
    )


INT_PARSING = "Input should be a valid integer, unable to parse string as an integer"
FLOAT_PARSING = "Input should be a valid number, unable to parse string as a number"

# Issue 18's list, with the text vLLM 0.26 sends (read from its 400 bodies).
ISSUE_CASES = [
    (cmpl(max_tokens="abc"), _type_error("max_tokens", "int_parsing", INT_PARSING, "abc"), "body.max_tokens"),
    (cmpl(temperature="hot"), _type_error("temperature", "float_parsing", FLOAT_PARSING, "hot"), "body.temperature"),
    (
        cmpl(temperature=-3),
        "temperature must be non-negative, got -3.0. (parameter=temperature, value=-3.0)",
        "temperature",
    ),
    (cmpl(top_p=5), "top_p must be in (0, 1], got 5.0. (parameter=top_p, value=5.0)", "top_p"),
    (cmpl(presence_penalty=99), "presence_penalty must be in [-2, 2], got 99.0.", None),
    (cmpl(top_k=-5), "top_k must be 0 (disable), or at least 1, got -5.", None),
    (cmpl(min_tokens=5, max_tokens=3), "min_tokens must be less than or equal to max_tokens=3, got 5.", None),
    (cmpl(seed="x"), _type_error("seed", "int_parsing", INT_PARSING, "x"), "body.seed"),
    (
        cmpl(frequency_penalty="a"),
        _type_error("frequency_penalty", "float_parsing", FLOAT_PARSING, "a"),
        "body.frequency_penalty",
    ),
    (
        cmpl(logit_bias="x"),
        _type_error("logit_bias", "dict_type", "Input should be a valid dictionary", "x"),
        "body.logit_bias",
    ),
    (cmpl(user=5), _type_error("user", "string_type", "Input should be a valid string", 5), "body.user"),
    (chat(max_tokens="abc"), _type_error("max_tokens", "int_parsing", INT_PARSING, "abc"), "body.max_tokens"),
]


@pytest.mark.parametrize(("body", "message", "param"), ISSUE_CASES, ids=[str(c[0]) for c in ISSUE_CASES])
def test_issue_18_bodies_get_vllms_400(body: dict[str, Any], message: str, param: str | None) -> None:
    path = CHAT if "messages" in body else CMPL
    assert ours(path, body) == (400, message, param)


def test_body_is_not_modified_and_unknown_fields_are_ignored() -> None:
    body = chat(tools=[{"type": "function", "function": {"name": "f"}}], some_future_field={"x": 1}, max_tokens="5")
    before = repr(body)
    assert ours(CHAT, body) == (200, "", None)
    assert repr(body) == before  # vLLM adds tool_choice in place; the frontend forwards the client's body


def test_other_paths_are_not_checked() -> None:
    validate_request("/v1/models", {"temperature": "hot"})


def test_context_length_over_the_limit_and_the_estimate_contract() -> None:
    body = cmpl(max_tokens=100)
    assert check_context_length(10, body, 2048, exact=True) is False
    with pytest.raises(RequestError) as exc:
        check_context_length(2000, {"prompt": [1] * 2000, "max_tokens": 100}, 2048, exact=True)
    assert exc.value.status == 400 and exc.value.param == "input_tokens"
    assert exc.value.message.startswith("This model's maximum context length is 2048 tokens. However, you requested")
    assert check_context_length(2000, body, 2048, exact=False) is True  # an upper bound never rejects
    with pytest.raises(RequestError) as exc:  # but max_tokens alone over max_model_len does not need the prompt
        check_context_length(1, cmpl(max_tokens=5000), 2048, exact=False)
    assert exc.value.message == (
        "max_tokens=5000 cannot be greater than max_model_len=max_total_tokens=2048. Please request fewer output "
        "tokens. (parameter=max_tokens, value=5000)"
    )


# ------------------------------------------------------------------------------ parity with vLLM's own code


@pytest.fixture(scope="module")
def vllm_oracle() -> Any:
    """A callable (path, body) -> (status, message, param) that asks vLLM 0.26's real classes and handlers."""
    pytest.importorskip("vllm")
    pytest.importorskip("fastapi.testclient")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.utils.error_response import create_error_response
    from vllm.entrypoints.serve.utils.server_utils import exception_handler, validation_exception_handler

    app = FastAPI()
    app.state.args = types.SimpleNamespace(log_error_stack=False)
    app.exception_handler(RequestValidationError)(validation_exception_handler)
    for exc_type in (ValueError, TypeError, OverflowError, Exception):
        app.exception_handler(exc_type)(exception_handler)

    def sampling(request: Any, max_tokens: int) -> dict[str, Any]:
        if request.use_beam_search:
            request.to_beam_search_params(max_tokens, {})
        else:
            request.to_sampling_params(max_tokens, {})
        return {"ok": True}

    @app.post(CMPL)
    async def completions(request: CompletionRequest) -> Any:
        if request.stream and request.use_beam_search:  # OpenAIServingCompletion's first check
            return create_error_response("Streaming is not currently supported with beam search").model_dump()
        return sampling(request, request.max_tokens)

    @app.post(CHAT)
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        return sampling(request, 100 if limit is None else limit)  # no limit: max_model_len - prompt, large

    client = TestClient(app, raise_server_exceptions=False)

    def ask(path: str, body: dict[str, Any]) -> tuple[int, str, str | None]:
        r = client.post(path, json=body)
        err = r.json().get("error")
        if err is None:
            return r.status_code, "", None
        return err["code"], err["message"], err["param"]

    return ask


FIELD_CASES: list[dict[str, Any]] = [
    # types, lax coercions vLLM accepts, and each range edge
    {"max_tokens": "5"},
    {"max_tokens": 1.5},
    {"max_tokens": 2.0},
    {"max_tokens": True},
    {"max_tokens": None},
    {"max_tokens": 0},
    {"max_tokens": 1},
    {"max_tokens": -1},
    {"max_tokens": [1]},
    {"temperature": 0},
    {"temperature": 2},
    {"temperature": 2.0001},
    {"temperature": -0.0001},
    {"temperature": "0.5"},
    {"temperature": "inf"},
    {"temperature": "nan"},
    {"temperature": None},
    {"temperature": 0.001},
    {"temperature": 0, "n": 2},
    {"temperature": 0, "n": 1},
    {"top_p": 0},
    {"top_p": 1},
    {"top_p": 1.01},
    {"top_p": 1e-9},
    {"top_p": -1},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 1},
    {"top_k": -2},
    {"top_k": 1.5},
    {"top_k": "3"},
    {"min_p": -0.1},
    {"min_p": 1},
    {"min_p": 1.1},
    {"presence_penalty": 2},
    {"presence_penalty": -2},
    {"presence_penalty": 2.01},
    {"presence_penalty": -2.5},
    {"frequency_penalty": 2.01},
    {"frequency_penalty": -2},
    {"frequency_penalty": "a"},
    {"repetition_penalty": 0},
    {"repetition_penalty": 0.01},
    {"repetition_penalty": -1},
    {"repetition_penalty": "inf"},
    {"n": 0},
    {"n": 1},
    {"n": 3},
    {"n": -1},
    {"n": "x"},
    {"n": None},
    {"n": 20000},
    {"min_tokens": -1},
    {"min_tokens": 0},
    {"min_tokens": 16},
    {"min_tokens": 17},
    {"min_tokens": "x"},
    {"seed": "x"},
    {"seed": 1.5},
    {"seed": -1},
    {"seed": 2**63},
    {"seed": -(2**63)},
    {"seed": 1e30},
    {"logit_bias": "x"},
    {"logit_bias": {"x": 1}},
    {"logit_bias": {"5": 200, "7": -1}},
    {"logit_bias": {"5": "a"}},
    {"logit_bias": {"a": 1, "b": 2, "3": 1}},
    {"logit_bias": [1]},
    {"user": 5},
    {"user": "u"},
    {"user": None},
    {"stop": 5},
    {"stop": [""]},
    {"stop": ["a", 1]},
    {"stop": "x"},
    {"stop": ""},
    {"stop": None},
    {"stop": []},
    {"stream": "yes"},
    {"stream": 2},
    {"stream": "maybe"},
    {"stream_options": {"include_usage": True}},
    {"stream_options": {"include_usage": True}, "stream": True},
    {"stream_options": 5, "stream": True},
    {"stream_options": {"include_usage": "x"}, "stream": True},
    {"stream_options": {}},
    {"logprobs": -1},
    {"logprobs": 0},
    {"logprobs": 5},
    {"logprobs": "abc"},
    {"logprobs": 1.5},
    {"prompt_logprobs": -1},
    {"prompt_logprobs": -2},
    {"prompt_logprobs": 1, "stream": True},
    {"prompt_logprobs": "a"},
    {"echo": True, "logprobs": 2},
    {"echo": True, "max_tokens": 0},
    {"echo": "yes"},
    {"echo": 3},
    {"logprob_token_ids": [1]},
    {"logprob_token_ids": [1], "logprobs": 1},
    {"logprob_token_ids": [1], "use_beam_search": True},
    {"use_beam_search": True, "stream": True},
    {"use_beam_search": True, "temperature": -5},
    {"stop_token_ids": ["a"]},
    {"stop_token_ids": [1, 2]},
    {"allowed_token_ids": "x"},
    {"bad_words": [""]},
    {"bad_words": ["ok", ""]},
    {"bad_words": "x"},
    {"cache_salt": ""},
    {"cache_salt": 5},
    {"cache_salt": "s"},
    {"truncate_prompt_tokens": -2},
    {"truncate_prompt_tokens": -1},
    {"truncation_side": "middle"},
    {"priority": "high"},
    {"priority": 2**64},
    {"request_id": 5},
    {"suffix": 5},
    {"length_penalty": "x"},
    {"thinking_token_budget": -1},
    {"thinking_token_budget": -2},
    {"thinking_token_budget": 1.0},
    {"thinking_token_budget": True},
    {"thinking_token_budget": 10},
    {"structured_outputs": {"json": {}, "regex": "a"}},
    {"response_format": {"type": "json_schema"}},
    {"vllm_xargs": {"a": {"b": 1}}},
    {"kv_transfer_params": 5},
    {"max_tokens": 1.5, "temperature": "x", "user": 3},  # several type errors at once
    {"temperature": -1, "top_p": 5},  # several range errors: the first in vLLM's order wins
    {"future_field": {"anything": True}},
]

CHAT_ONLY_CASES: list[dict[str, Any]] = [
    {"max_completion_tokens": "abc"},
    {"max_completion_tokens": 0},
    {"max_completion_tokens": 4, "min_tokens": 5},
    {"max_tokens": 4, "max_completion_tokens": 8, "min_tokens": 6},
    {"logprobs": True, "top_logprobs": 5},
    {"top_logprobs": 3},
    {"logprobs": True, "top_logprobs": -2},
    {"logprobs": True, "top_logprobs": -1},
    {"logprobs": "x"},
    {"top_logprobs": "x"},
    {"logprob_token_ids": [1], "logprobs": True},
    {"tools": []},
    {"tool_choice": "auto"},
    {"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"continue_final_message": True},
    {"continue_final_message": True, "add_generation_prompt": False},
    {"reasoning_effort": "extreme"},
    {"reasoning_effort": "low"},
    {"include_reasoning": "x"},
    {"echo": True, "top_logprobs": 0},
    {"n": None},
    {"documents": [{"a": 1}]},
    {"chat_template_kwargs": []},
    {"min_tokens": 5},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 3},  # error text shows tool_choice
    {"tools": [{"type": "function", "function": {"name": "f"}}], "cache_salt": ""},  # ... and here it does not
]

COMPLETION_ONLY_CASES: list[dict[str, Any]] = [
    {"prompt": ""},
    {"prompt": None},
    {"prompt": ["a"] * 1025},
    {"prompt_embeds": []},
    {"n": None},
    {"max_tokens": None, "min_tokens": 17},
]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [repr(c)[:80] for c in cases]


@pytest.mark.vllm
@ORACLE_026
@pytest.mark.parametrize("fields", FIELD_CASES + COMPLETION_ONLY_CASES, ids=_ids(FIELD_CASES + COMPLETION_ONLY_CASES))
def test_completions_match_vllm(vllm_oracle: Any, fields: dict[str, Any]) -> None:
    body = cmpl(**fields)
    assert ours(CMPL, body) == vllm_oracle(CMPL, body)


@pytest.mark.vllm
@ORACLE_026
@pytest.mark.parametrize("fields", FIELD_CASES + CHAT_ONLY_CASES, ids=_ids(FIELD_CASES + CHAT_ONLY_CASES))
def test_chat_matches_vllm(vllm_oracle: Any, fields: dict[str, Any]) -> None:
    if "logprobs" in fields and "echo" not in fields and not isinstance(fields.get("logprobs"), bool):
        fields = {**fields, "top_logprobs": fields["logprobs"], "logprobs": True}  # chat's logprobs is a bool
    body = chat(**fields)
    assert ours(CHAT, body) == vllm_oracle(CHAT, body)


# Values and fields for a seeded random walk over combinations (prompt/messages/tools/... excluded: their shapes
# are the engine's to judge, see pdkit.frontend.validation).
FUZZ_VALUES: list[Any] = [None, 0, 1, -1, 2, 5, -3, 1.5, 0.5, 100, "abc", "5", "", True, False, [], [""], ["a"], {}]
FUZZ_VALUES += [{"1": 2}, {"a": "b"}, 2**63, 1e-6, "inf"]
FUZZ_EXCLUDED = {
    "prompt",
    "prompt_embeds",
    "tools",
    "tool_choice",
    "response_format",
    "structured_outputs",
    "documents",
}
FUZZ_FIELDS = sorted({k for c in FIELD_CASES + CHAT_ONLY_CASES + COMPLETION_ONLY_CASES for k in c} - FUZZ_EXCLUDED)


@pytest.mark.vllm
@ORACLE_026
def test_random_combinations_match_vllm(vllm_oracle: Any) -> None:
    rnd = random.Random(18)
    mismatches = []
    for _ in range(300):
        fields = {k: rnd.choice(FUZZ_VALUES) for k in rnd.sample(FUZZ_FIELDS, rnd.randint(1, 4))}
        for path, body in ((CMPL, cmpl(**fields)), (CHAT, chat(**fields))):
            if path == CHAT and "min_tokens" in fields and "max_tokens" not in fields:
                continue  # without a limit vLLM compares min_tokens with max_model_len - prompt: check_context_length
            got = ours(path, body)  # anything but a RequestError would fail the test here
            expected = vllm_oracle(path, body)
            if got != expected:
                mismatches.append((path, body, got, expected))
    assert mismatches == []


README_AND_TEST_BODIES = [
    (CMPL, {"model": "synth", "prompt": "hi", "max_tokens": 3}),
    (CMPL, {"model": "synth", "prompt": "x", "max_tokens": 5, "stream": True}),
    (CMPL, {"prompt": list(range(100)), "max_tokens": 2}),
    (CMPL, {"prompt": "stop test", "max_tokens": 12, "stop": ["\n"], "temperature": 1.3, "top_p": 0.5}),
    (CMPL, {"prompt": "hi", "max_tokens": 1, "min_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}),
    (CMPL, {"prompt": "hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}),
    (CHAT, {"model": "synth", "messages": MSGS, "max_tokens": 6}),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}),
    (CHAT, {"messages": MSGS, "max_tokens": 1, "min_tokens": 1, "max_completion_tokens": 1, "stream": False}),
]


@pytest.mark.parametrize(
    ("path", "body"), README_AND_TEST_BODIES, ids=[repr(b)[:60] for _, b in README_AND_TEST_BODIES]
)
def test_valid_bodies_pass(path: str, body: dict[str, Any]) -> None:
    assert ours(path, body) == (200, "", None)


# ------------------------------------------------------------------------------ context length vs vLLM


@pytest.fixture(scope="module")
def vllm_context_oracle() -> Any:
    """(path, body, prompt_tokens, max_model_len) -> (status, message, param) through vLLM's serving steps."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.entrypoints.serve.utils.error_response import create_error_response
    from vllm.v1.engine.input_processor import InputProcessor

    def ask(path: str, body: dict[str, Any], prompt_tokens: int, max_model_len: int) -> tuple[int, str, str | None]:
        model_config = types.SimpleNamespace(max_model_len=max_model_len, runner_type="generate")
        request = (ChatCompletionRequest if path == CHAT else CompletionRequest).model_validate(body)
        try:
            params = request.build_tok_params(model_config)  # type: ignore[arg-type]
            tokens = list(range(prompt_tokens))
            if not isinstance(body.get("prompt"), list):  # text is tokenized with vLLM's max_length
                max_length = params.get_encode_kwargs().get("max_length")
                tokens = tokens[:max_length] if max_length is not None else tokens
            tokens = params._validate_tokens(None, tokens)
            limit = (
                request.max_completion_tokens
                if path == CHAT and request.max_completion_tokens is not None
                else request.max_tokens
            )
            max_tokens = get_max_tokens(max_model_len, limit, len(tokens), {}, None, request.truncate_prompt_tokens)
            sp = request.to_sampling_params(max_tokens, {})
            fake_processor = types.SimpleNamespace(
                skip_prompt_length_check=False, model_config=model_config, supports_mm_inputs=False
            )
            InputProcessor._validate_prompt_len(fake_processor, len(tokens), "decoder")  # type: ignore[arg-type]
            assert sp.max_tokens is not None
        except ValueError as exc:
            err = create_error_response(exc).error
            return err.code, err.message, err.param
        return 200, "", None

    return ask


CONTEXT_CASES = [
    # (path, body fields, prompt tokens, max_model_len)
    (CMPL, {"prompt": "t", "max_tokens": 5000}, 10, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 2048}, 1, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 2047}, 1, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 48}, 2000, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 48}, 2001, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 48}, 5000, 2048),
    (CMPL, {"prompt": [1], "max_tokens": 48}, 2001, 2048),
    (CMPL, {"prompt": [1], "max_tokens": 48}, 2002, 2048),
    (CMPL, {"prompt": "t"}, 2033, 2048),
    (CMPL, {"prompt": "t"}, 2032, 2048),
    (CMPL, {"prompt": "t", "max_tokens": "48"}, 2001, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 0, "echo": True}, 2048, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 0, "echo": True}, 2047, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 16, "truncate_prompt_tokens": 100}, 5000, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 16, "truncate_prompt_tokens": 2040}, 5000, 2048),
    (CMPL, {"prompt": "t", "max_tokens": 16, "truncate_prompt_tokens": -1}, 5000, 2048),
    (CHAT, {"max_tokens": 100}, 1949, 2048),
    (CHAT, {"max_tokens": 100}, 1948, 2048),
    (CHAT, {"max_completion_tokens": 3000}, 10, 2048),
    (CHAT, {"max_completion_tokens": 100, "max_tokens": 5}, 1960, 2048),
    (CHAT, {}, 2048, 2048),
    (CHAT, {}, 2047, 2048),
    (CHAT, {}, 2049, 2048),
    (CHAT, {"min_tokens": 10}, 2040, 2048),
    (CHAT, {"min_tokens": 8}, 2040, 2048),
]


@pytest.mark.vllm
@ORACLE_026
@pytest.mark.parametrize(
    ("path", "fields", "prompt_tokens", "max_model_len"), CONTEXT_CASES, ids=[repr(c) for c in CONTEXT_CASES]
)
def test_context_length_matches_vllm(
    vllm_context_oracle: Any, path: str, fields: dict[str, Any], prompt_tokens: int, max_model_len: int
) -> None:
    body = {"model": "m", **({"messages": MSGS} if path == CHAT else {}), **fields}
    expected = vllm_context_oracle(path, body, prompt_tokens, max_model_len)
    assert ours(path, body)[0] == 200  # only the context differs
    try:
        assert check_context_length(prompt_tokens, body, max_model_len, exact=True) is False
        got: tuple[int, str, str | None] = (200, "", None)
    except RequestError as exc:
        got = (exc.status, exc.message, exc.param)
    assert got == expected
    # the estimate mode never rejects what only an exact count could reject, and flags it instead
    if got[0] == 400 and got[2] != fields.get("max_completion_tokens") and "cannot be greater" not in got[1]:
        assert check_context_length(prompt_tokens, body, max_model_len, exact=False) is True
    if got[0] == 200:
        assert check_context_length(prompt_tokens, body, max_model_len, exact=False) is False
