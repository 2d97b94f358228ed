"""vLLM 0.26's OpenAI request rules and response shapes, for the simulated engine's HTTP layer.

Why a module of its own: the rules (prompt forms, sampling and logprob options, the context-length
400s) and the JSON shapes (logprobs objects, choice fields) are read off vLLM's protocol and serving
code and change when vLLM does; keeping them apart from the aiohttp plumbing keeps both small.
Messages are vLLM's own text so that clients (and pdkit's frontend) see the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdkit.sim.sampling import NUM_CANDIDATES, LogprobEntry, SamplingSpec

MAX_LOGPROBS = NUM_CANDIDATES  # vLLM's default --max-logprobs (20)
MAX_N = 128  # the sim's own bound on n (vLLM's VLLM_MAX_N_SEQUENCES is far larger; see docs/simulator.md)


class ApiError(Exception):
    """An error answered as vLLM's ErrorResponse."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.err_type, "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


# ----------------------------------------------------------------------------------- requests
Prompt = str | list[int]


def completion_prompts(body: dict[str, Any], vocab_size: int) -> list[Prompt]:
    """``prompt`` as vLLM 0.26 accepts it: a string, token ids, or a list of either (one choice each)."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "" or prompt == []:
        raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        items = list(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        items = list(prompt)
    else:
        raise ApiError(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param="prompt",
        )
    for item in items:
        if not item:
            raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        if isinstance(item, list) and any(t < 0 or t >= vocab_size for t in item):
            raise ApiError(f"Token id out of vocabulary range [0, {vocab_size})", param="prompt")
    return items


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(f"{key} must be a finite number, got {value!r}.", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(f"{key} must be an integer, got {value!r}.", param=key)
    return int(value)


@dataclass(frozen=True)
class SamplingOptions:
    """The per-request sampling options that shape the choices (n, echo, logprobs, sampler)."""

    n: int
    echo: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    num_logprobs: int | None  # completions: ``logprobs``; chat: ``top_logprobs`` when ``logprobs`` is true
    num_prompt_logprobs: int | None

    def spec(self, choice: int, default_seed: int) -> SamplingSpec | None:
        """The sampler settings of choice ``choice``; None keeps the original greedy token stream."""
        if self.temperature < 1e-5 and self.num_logprobs is None:
            return None
        seed = (self.seed if self.seed is not None else default_seed) + choice
        return SamplingSpec(self.temperature, self.top_p, max(0, self.top_k), seed, self.num_logprobs)


def sampling_options(body: dict[str, Any], chat: bool, default_temperature: float) -> SamplingOptions:
    """Read n / echo / temperature / top_p / top_k / seed / logprobs with vLLM's rules and messages."""
    n = _integer(body, "n", 1)
    assert n is not None
    if n < 1:
        raise ApiError(f"n must be at least 1, got {n}.", param="n")
    if n > MAX_N:
        raise ApiError(f"n must be at most {MAX_N} in the simulated engine, got {n}.", param="n")
    temperature = _number(body, "temperature", default_temperature)
    if temperature < 0 or temperature > 2:
        raise ApiError(f"temperature must be in [0, 2], got {temperature}.", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    top_k = _integer(body, "top_k", 0) or 0
    if top_k < -1:
        raise ApiError(f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k")
    seed = _integer(body, "seed", None)
    echo = bool(body.get("echo")) and not chat  # chat's echo (last message) is not modelled
    if chat:
        if body.get("logprobs") not in (None, True, False):
            raise ApiError("logprobs must be a boolean", param="logprobs")
        top = _integer(body, "top_logprobs", 0)
        if top is not None and top < 0 and top != -1:
            raise ApiError("`top_logprobs` must be a positive value or -1.", param="top_logprobs")
        if top is not None and top != 0 and not body.get("logprobs"):
            raise ApiError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        num = (top if top is not None else 0) if body.get("logprobs") else None
    else:
        num = _integer(body, "logprobs", None)
        if num is not None and num < 0:
            raise ApiError("`logprobs` must be a positive value.", param="logprobs")
    prompt_num = _integer(body, "prompt_logprobs", None)
    if prompt_num is None and echo:
        prompt_num = num
    explicit = body.get("prompt_logprobs")  # vLLM checks the field as sent (echo's implied one streams)
    if explicit is not None and body.get("stream") and explicit != 0:
        raise ApiError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
    for value, key in ((num, "logprobs"), (prompt_num, "prompt_logprobs")):
        if value is not None and (value == -1 or value > MAX_LOGPROBS):
            asked = value if value != -1 else "the whole vocabulary"
            raise ApiError(
                f"Requested {'sample' if key == 'logprobs' else 'prompt'} logprobs of {asked}, "
                f"which is greater than max allowed: {MAX_LOGPROBS}",
                param=key,
            )
    return SamplingOptions(n, echo, temperature, top_p, top_k, seed, num, prompt_num)


# -------------------------------------------------------------------------- context-length rules
def requested_max_tokens(body: dict[str, Any], chat: bool) -> tuple[int | None, str]:
    """(max output tokens asked for, the parameter's name); completions default to 16 like vLLM."""
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    else:
        key = "max_tokens"
    value = body.get(key, None if chat else 16)
    if value is not None and (not _is_int(value) or value < 0):
        raise ApiError(f"max_tokens must be at least 1, got {value}.", param=key)
    return value, key


def check_max_tokens(requested: int | None, key: str, max_model_len: int) -> None:
    """vLLM's TokenizeParams check, before tokenization."""
    if requested is not None and requested > max_model_len:
        raise ApiError(
            f"{key}={requested} cannot be greater than max_model_len=max_total_tokens={max_model_len}. "
            "Please request fewer output tokens.",
            param=key,
        )


def check_prompt_chars(text: str, requested: int | None, max_model_len: int, max_chars_per_token: int) -> None:
    """vLLM's pre-tokenization bound: a text longer than max_input_tokens * the longest token is refused."""
    max_output = requested or 0
    max_input = max_model_len - max_output
    max_chars = max_input * max_chars_per_token
    if len(text) > max_chars:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{max_output} output tokens and your prompt contains {len(text)} characters (more than "
            f"{max_chars} characters, which is the upper bound for {max_input} input tokens). "
            "Please reduce the length of the input prompt or the number of requested output tokens.",
            param="input_text",
        )


def check_prompt_tokens(num_tokens: int, requested: int | None, max_model_len: int, truncated: bool) -> None:
    """vLLM's post-tokenization check: prompt + requested output must fit the context.

    ``truncated``: the prompt was text, which vLLM tokenizes only up to max_input_tokens + 1 tokens,
    hence its "at least" wording.
    """
    max_output = requested or 0
    max_input = max_model_len - max_output
    if num_tokens <= max_input:
        return
    if truncated:
        num_tokens = max_input + 1
    qualifier = "at least " if num_tokens == max_input + 1 else ""
    raise ApiError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{max_output} output tokens and your prompt contains {qualifier}{num_tokens} input tokens, "
        f"for a total of {qualifier}{num_tokens + max_output} tokens. "
        "Please reduce the length of the input prompt or the number of requested output tokens.",
        param="input_tokens",
    )


# ---------------------------------------------------------------------------------- logprobs
TokenStr = Callable[[int], str]


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[list[LogprobEntry] | None],
    token_str: TokenStr,
    initial_text_offset: int = 0,
) -> dict[str, Any]:
    """vLLM's CompletionLogProbs: ``{text_offset, token_logprobs, tokens, top_logprobs}``."""
    offsets: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    tops: list[dict[str, float] | None] = []
    last_len = 0
    for tid, step in zip(token_ids, entries, strict=True):
        token = token_str(tid)
        if step is None:
            token_logprobs.append(None)
            tops.append(None)
        else:
            token_logprobs.append(max(step[0][1], -9999.0))
            tops.append({token_str(t): max(lp, -9999.0) for t, lp, _ in step})
        tokens.append(token)
        offsets.append(initial_text_offset if not offsets else offsets[-1] + last_len)
        last_len = len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(
    token_ids: Sequence[int], entries: Sequence[list[LogprobEntry] | None], token_str: TokenStr, top: int
) -> dict[str, Any]:
    """vLLM's ChatCompletionLogProbs: ``{content: [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for tid, step in zip(token_ids, entries, strict=True):
        token = token_str(tid)
        item: dict[str, Any] = {"token": token, "logprob": -9999.0, "bytes": list(token.encode("utf-8", "replace"))}
        if step is not None:
            item["logprob"] = max(step[0][1], -9999.0)
            item["top_logprobs"] = [
                {"token": (s := token_str(t)), "logprob": max(lp, -9999.0), "bytes": list(s.encode("utf-8", "replace"))}
                for i, (t, lp, _) in enumerate(step)
                if top == -1 or i < top
            ]
        else:
            item["top_logprobs"] = []
        content.append(item)
    return {"content": content}


def prompt_logprobs_json(entries: Sequence[list[LogprobEntry] | None], token_str: TokenStr) -> list[Any]:
    """A choice's ``prompt_logprobs``: per position ``{token_id: {logprob, rank, decoded_token}}`` or null."""
    out: list[Any] = []
    for step in entries:
        if step is None:
            out.append(None)
            continue
        out.append(
            {str(t): {"logprob": max(lp, -9999.0), "rank": r, "decoded_token": token_str(t)} for t, lp, r in step}
        )
    return out
