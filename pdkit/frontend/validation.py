"""vLLM 0.26's request validation, done by the frontend before the first hop.

Why: the prefill hop overrides ``max_tokens``/``min_tokens``/``stream`` (it only has to produce KV), so a body
that vLLM would reject — ``max_tokens: "abc"``, ``temperature: -3`` … — used to run its whole prefill and hold
prefill KV blocks before the decode worker finally answered 400.  Here the frontend answers the same 400 up
front, with the same message text vLLM would have sent, in three stages that mirror vLLM's order:

1. vLLM's ``model_validator(mode="before")`` checks of ``CompletionRequest`` / ``ChatCompletionRequest``, on the
   raw body, in the order pydantic runs them (last defined first).  Their comparisons are written exactly as
   vLLM writes them, so a wrongly typed value fails with the same ``TypeError`` text vLLM returns.
2. Field types (int vs str vs float vs bool, lists, dicts, int64 bounds, literals), through one pydantic
   ``TypeAdapter`` over a ``TypedDict`` with vLLM's own field annotations.  It is built once at import; per
   request it only walks the keys that are present (a few µs), and its error list is vLLM's: FastAPI prefixes
   each ``loc`` with ``"body"`` and vLLM's handler prints ``"N validation error(s):\\n  {error dict}"``.
3. The ranges that vLLM checks when it builds ``SamplingParams`` (``to_sampling_params`` and
   ``SamplingParams._verify_args``), on the coerced values, with their messages and ``param``.

Left to the engine on purpose (it gets them unchanged on the first hop and rejects them before any work):
the shapes of ``prompt``/``messages``/``tools``/``tool_choice``/``response_format``/``structured_outputs``, and
the server's generation-config defaults (a model whose generation config sets a default temperature can make
vLLM's greedy ``n`` check differ).  Unknown fields are ignored, as vLLM ignores them.

Known deviation: the ``type`` of the error body is pdkit's ``BadRequestError`` for every 400, while vLLM writes
``"Bad Request"`` for stage 1 and 2 errors; message, ``param`` and status are vLLM's.
"""

from __future__ import annotations

import math
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from pdkit.frontend.requests import RequestError

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_SAMPLING_EPS = 1e-5  # vLLM: temperature below this is greedy sampling
# vLLM reads these two environment variables on its API server; pdkit's frontend honours the same names.
_MAX_N_SEQUENCES = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
_MAX_COMPLETION_PROMPTS = int(os.environ.get("VLLM_MAX_COMPLETION_PROMPTS", "1024"))

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"


class VLLMValidationError(ValueError):
    """Same name, ``str`` and ``repr`` as ``vllm.exceptions.VLLMValidationError``: both end up in the client's
    message text (``"... (parameter=top_p, value=5.0)"`` and ``ctx: {'error': VLLMValidationError('...')}``)."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = []
        if self.parameter is not None:
            extras.append(f"parameter={self.parameter}")
        if self.value is not None:
            extras.append(f"value={self.value}")
        return f"{base} ({', '.join(extras)})" if extras else base


# ------------------------------------------------------------------------------------------ stage 2: field types


def _thinking_token_budget(value: Any) -> Any:
    """vLLM's ``validate_thinking_token_budget`` (a BeforeValidator on the field)."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, int) or (value < 0 and value != -1):
        raise VLLMValidationError(
            "`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
            parameter="thinking_token_budget",
            value=value,
        )
    return None if value == -1 else value


_Int64 = Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)]
_Truncate = Annotated[int, Field(ge=-1, le=_INT64_MAX)]
_ThinkingBudget = Annotated[int | None, BeforeValidator(_thinking_token_budget)]
_XArgs = dict[str, str | int | float | list[str | int | float]]


class StreamOptions(BaseModel):
    """vLLM's ``StreamOptions`` (a model, so a non-object gets pydantic's ``model_type`` error like vLLM's)."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


# Field order is vLLM's: pydantic reports errors in declaration order.  prompt/messages/tools/... are left out
# (see the module docstring); everything else of vLLM 0.26's request classes is here with vLLM's annotation.
class _CompletionFields(TypedDict, total=False):
    model: str | None
    echo: bool | None
    frequency_penalty: float | None
    logit_bias: dict[str, float] | None
    logprobs: int | None
    max_tokens: int | None
    n: int
    presence_penalty: float | None
    seed: _Int64 | None
    stop: str | list[str] | None
    stream: bool | None
    stream_options: StreamOptions | None
    suffix: str | None
    temperature: float | None
    top_p: float | None
    user: str | None
    use_beam_search: bool
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    length_penalty: float
    stop_token_ids: list[int] | None
    include_stop_str_in_output: bool
    ignore_eos: bool
    min_tokens: int
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    truncate_prompt_tokens: _Truncate | None
    truncation_side: Literal["left", "right"] | None
    allowed_token_ids: list[int] | None
    prompt_logprobs: int | None
    logprob_token_ids: list[int] | None
    bad_words: list[str]
    add_special_tokens: bool
    priority: _Int64
    request_id: str
    return_tokens_as_token_ids: bool | None
    return_token_ids: bool | None
    return_token_offsets: bool | None
    cache_salt: str | None
    kv_transfer_params: dict[str, Any] | None
    ec_transfer_params: dict[str, Any] | None
    vllm_xargs: _XArgs | None
    thinking_token_budget: _ThinkingBudget


class _ChatFields(TypedDict, total=False):
    model: str | None
    frequency_penalty: float | None
    logit_bias: dict[str, float] | None
    logprobs: bool | None
    top_logprobs: int | None
    max_tokens: int | None
    max_completion_tokens: int | None
    n: int | None
    presence_penalty: float | None
    seed: _Int64 | None
    stop: str | list[str] | None
    stream: bool | None
    stream_options: StreamOptions | None
    temperature: float | None
    top_p: float | None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None
    thinking_token_budget: _ThinkingBudget
    include_reasoning: bool
    parallel_tool_calls: bool | None
    user: str | None
    use_beam_search: bool
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    length_penalty: float
    stop_token_ids: list[int] | None
    include_stop_str_in_output: bool
    ignore_eos: bool
    min_tokens: int
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    truncate_prompt_tokens: _Truncate | None
    truncation_side: Literal["left", "right"] | None
    prompt_logprobs: int | None
    logprob_token_ids: list[int] | None
    allowed_token_ids: list[int] | None
    bad_words: list[str]
    echo: bool
    add_generation_prompt: bool
    continue_final_message: bool
    add_special_tokens: bool
    documents: list[dict[str, str]] | None
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    media_io_kwargs: dict[str, dict[str, Any]] | None
    mm_processor_kwargs: dict[str, Any] | None
    priority: _Int64
    request_id: str
    return_tokens_as_token_ids: bool | None
    return_token_ids: bool | None
    return_token_offsets: bool | None
    return_prompt_text: bool | None
    return_assistant_tokens_mask: bool
    cache_salt: str | None
    kv_transfer_params: dict[str, Any] | None
    ec_transfer_params: dict[str, Any] | None
    vllm_xargs: _XArgs | None


_COMPLETION_FIELDS: TypeAdapter[Any] = TypeAdapter(_CompletionFields)
_CHAT_FIELDS: TypeAdapter[Any] = TypeAdapter(_ChatFields)

# vLLM's clean_loc_for_param: pydantic-internal loc segments that are not field names.
_BRACKETED_INTERNAL = re.compile(r"[\[\(]")
_INTERNAL_LOC = frozenset(
    "function-wrap function-after function-before function-plain json-or-python lax-or-strict chain default "
    "nullable tagged-union union call arguments is-instance is-subclass callable str int float bool bytes "
    "bytearray list tuple dict set frozenset complex none nonetype".split()
)


def _clean_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (_BRACKETED_INTERNAL.search(str(p)) or str(p).lower() in _INTERNAL_LOC)]
    return ".".join(parts) if parts else ".".join(str(p) for p in loc)


def _sanitize(message: str) -> str:
    """vLLM's ``sanitize_message`` (its handler strips addresses and paths from every 400 text)."""
    message = re.sub(r" at 0x[0-9a-f]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def _validation_error(errors: list[dict[str, Any]]) -> RequestError:
    """The 400 of vLLM's ``validation_exception_handler`` for FastAPI's list of body errors."""
    param = None
    for error in errors:
        ctx_error = error.get("ctx", {}).get("error")
        if isinstance(ctx_error, VLLMValidationError):
            param = ctx_error.parameter
            break
    if param is None and errors:
        param = _clean_loc(errors[0]["loc"])
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {err}\n" for err in errors)
    return RequestError(400, _sanitize(message.rstrip()), param)


def _model_validator_error(exc: ValueError, data: dict[str, Any]) -> RequestError:
    """A ValueError raised in a vLLM ``model_validator(mode="before")``: pydantic wraps it as ``value_error``."""
    error = {
        "type": "value_error",
        "loc": ("body",),
        "msg": f"Value error, {exc}",
        "input": data,
        "ctx": {"error": exc},
    }
    return _validation_error([error])


# ------------------------------------------------------------------------- stage 1: vLLM's before-validators


def _completion_before_validators(data: dict[str, Any]) -> None:
    """CompletionRequest's before-validators, last defined first (pydantic's order), on the raw body."""
    cache_salt = data.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise VLLMValidationError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", parameter="cache_salt"
        )
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > _MAX_COMPLETION_PROMPTS:
        raise VLLMValidationError(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of {_MAX_COMPLETION_PROMPTS}. "
            "To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.",
            parameter="prompt",
        )
    prompt_embeds = data.get("prompt_embeds")
    if isinstance(prompt_embeds, list) and len(prompt_embeds) > _MAX_COMPLETION_PROMPTS:
        raise VLLMValidationError(
            f"prompt_embeds list length {len(prompt_embeds)} exceeds the maximum allowed count of "
            f"{_MAX_COMPLETION_PROMPTS}. To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS "
            "environment variable.",
            parameter="prompt_embeds",
        )
    prompt_is_empty = prompt is None or (isinstance(prompt, str) and prompt == "")
    embeds_is_empty = prompt_embeds is None or (isinstance(prompt_embeds, list) and len(prompt_embeds) == 0)
    if prompt_is_empty and embeds_is_empty:
        raise VLLMValidationError("Either prompt or prompt_embeds must be provided and non-empty.", parameter="prompt")
    _stream_options_check(data)
    if data.get("logprob_token_ids") and data.get("use_beam_search"):
        raise VLLMValidationError(
            "`logprob_token_ids` is not supported with beam search.", parameter="logprob_token_ids"
        )
    if data.get("logprob_token_ids") and data.get("echo") and data.get("max_tokens") == 0:
        raise VLLMValidationError(
            "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because no output tokens "
            "are generated.",
            parameter="logprob_token_ids",
        )
    if data.get("logprob_token_ids") and data.get("logprobs") is None:
        raise VLLMValidationError(
            "when using `logprob_token_ids`, `logprobs` must be set.", parameter="logprob_token_ids"
        )
    _prompt_logprobs_check(data)
    if (logprobs := data.get("logprobs")) is not None and logprobs < 0:
        raise VLLMValidationError("`logprobs` must be a positive value.", parameter="logprobs", value=logprobs)
    _structured_outputs_count_check(data, parameter="structured_outputs")
    _response_format_check(data)


def _chat_first_validators(data: dict[str, Any]) -> None:
    """ChatCompletionRequest's before-validators that pydantic runs ahead of ``check_tool_usage``."""
    cache_salt = data.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise VLLMValidationError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", parameter="cache_salt"
        )
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise VLLMValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")


def _chat_last_validators(data: dict[str, Any]) -> None:
    """The ones after ``check_tool_usage``: they (and the error text's ``input``) see its ``tool_choice``."""
    _structured_outputs_count_check(data, parameter=None)
    if data.get("logprob_token_ids") and data.get("use_beam_search"):
        raise VLLMValidationError(
            "`logprob_token_ids` is not supported with beam search.", parameter="logprob_token_ids"
        )
    if data.get("logprob_token_ids") and not data.get("logprobs"):
        raise VLLMValidationError(
            "when using `logprob_token_ids`, `logprobs` must be set to true.", parameter="logprob_token_ids"
        )
    _prompt_logprobs_check(data)
    if (top_logprobs := data.get("top_logprobs")) is not None:
        if top_logprobs < 0 and top_logprobs != -1:
            raise VLLMValidationError(
                "`top_logprobs` must be a positive value or -1.", parameter="top_logprobs", value=top_logprobs
            )
        if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
            raise VLLMValidationError(
                "when using `top_logprobs`, `logprobs` must be set to true.", parameter="top_logprobs"
            )
    _stream_options_check(data)
    _response_format_check(data)


def _stream_options_check(data: dict[str, Any]) -> None:
    if data.get("stream_options") and not data.get("stream"):
        raise VLLMValidationError("Stream options can only be defined when `stream=True`.", parameter="stream_options")


def _prompt_logprobs_check(data: dict[str, Any]) -> None:
    if (prompt_logprobs := data.get("prompt_logprobs")) is not None:
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise VLLMValidationError(
                "`prompt_logprobs` are not available when `stream=True`.", parameter="prompt_logprobs"
            )
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise VLLMValidationError(
                "`prompt_logprobs` must be a positive value or -1.", parameter="prompt_logprobs", value=prompt_logprobs
            )


def _structured_outputs_count_check(data: dict[str, Any], parameter: str | None) -> None:
    """The "only one kind of constraint" part; the structural-tag schema itself is left to the engine."""
    so = data.get("structured_outputs")
    if not isinstance(so, dict):
        return
    count = sum(so.get(k) is not None for k in ("json", "regex", "choice"))
    if count > 1:
        raise VLLMValidationError(
            "You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice').",
            parameter=parameter,
        )
    if parameter is None and count > 0 and data.get("tool_choice", "none") not in ("none", "auto", "required"):
        raise VLLMValidationError("You can only either use constraints for structured outputs or tools, not both.")


def _response_format_check(data: dict[str, Any]) -> None:
    rf = data.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema" and rf.get("json_schema") is None:
        raise VLLMValidationError(
            "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
            parameter="response_format",
        )


def _tool_usage_check(data: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``check_tool_usage`` up to the point where it needs the tools' own shapes."""
    if data.get("tools") == []:
        raise ValueError(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely."
        )
    if "tool_choice" not in data and data.get("tools"):
        data = {**data, "tool_choice": "auto"}  # vLLM sets it in place; the client's dict stays untouched here
    tool_choice = data.get("tool_choice", "none")
    if tool_choice == "none" or tool_choice is None:
        return data
    if data.get("tools") is None:
        raise VLLMValidationError("When using `tool_choice`, `tools` must be set.", parameter="tool_choice")
    if tool_choice not in ["auto", "required"] and not isinstance(tool_choice, dict):
        raise VLLMValidationError(
            f'Invalid value for `tool_choice`: {tool_choice}! Only named tools, "none", "auto" or "required" '
            "are supported.",
            parameter="tool_choice",
        )
    return data


# ----------------------------------------------------------------------------- stage 3: SamplingParams ranges


def _logit_bias_check(logit_bias: dict[str, float] | None) -> None:
    if not logit_bias:
        return
    invalid = []
    for token in logit_bias:
        try:
            int(token)
        except (ValueError, TypeError):
            invalid.append(token)
    if invalid:
        raise VLLMValidationError(
            f"logit_bias contains key(s) that cannot be converted to integer token IDs: {invalid!r}",
            parameter="logit_bias",
            value=invalid,
        )


def _verify_sampling(
    v: dict[str, Any], *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
) -> None:
    """``SamplingParams.from_optional`` + ``_verify_args`` + the greedy check, in vLLM's order and wording.

    ``max_tokens=None`` means "not known before the prompt is counted" (chat without a limit): vLLM then uses
    ``max_model_len - prompt``, which ``check_context_length`` covers.
    """
    _logit_bias_check(v.get("logit_bias"))
    n = 1 if v.get("n") is None else v["n"]
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if n > _MAX_N_SEQUENCES:
        raise ValueError(
            f"n must be at most {_MAX_N_SEQUENCES}, got {n}. "
            "To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
        )
    presence_penalty = _or(v.get("presence_penalty"), 0.0)
    if not -2.0 <= presence_penalty <= 2.0:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
    frequency_penalty = _or(v.get("frequency_penalty"), 0.0)
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.")
    repetition_penalty = _or(v.get("repetition_penalty"), 1.0)
    if not math.isfinite(repetition_penalty):
        raise ValueError(f"repetition_penalty must be a finite number, got {repetition_penalty}.")
    if repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty must be greater than zero, got {repetition_penalty}.")
    temperature = _or(v.get("temperature"), 1.0)
    if not math.isfinite(temperature):
        raise VLLMValidationError(
            f"temperature must be a finite number, got {temperature}.", parameter="temperature", value=temperature
        )
    if temperature < 0.0:
        raise VLLMValidationError(
            f"temperature must be non-negative, got {temperature}.", parameter="temperature", value=temperature
        )
    if temperature > 2.0:
        raise VLLMValidationError(
            f"temperature must be in [0, 2], got {temperature}.", parameter="temperature", value=temperature
        )
    top_p = _or(v.get("top_p"), 1.0)
    if not 0.0 < top_p <= 1.0:
        raise VLLMValidationError(f"top_p must be in (0, 1], got {top_p}.", parameter="top_p", value=top_p)
    top_k = _or(v.get("top_k"), 0)
    if top_k < -1:
        raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    min_p = _or(v.get("min_p"), 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
    if max_tokens is not None and max_tokens < 1:
        raise VLLMValidationError(
            f"max_tokens must be at least 1, got {max_tokens}.", parameter="max_tokens", value=max_tokens
        )
    min_tokens = v.get("min_tokens", 0)
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    if logprobs is not None and logprobs != -1 and logprobs < 0:
        raise VLLMValidationError(
            f"logprobs must be non-negative or -1, got {logprobs}.", parameter="logprobs", value=logprobs
        )
    if prompt_logprobs is not None and prompt_logprobs != -1 and prompt_logprobs < 0:
        raise VLLMValidationError(
            f"prompt_logprobs must be non-negative or -1, got {prompt_logprobs}.",
            parameter="prompt_logprobs",
            value=prompt_logprobs,
        )
    stop = v.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if any(not s for s in stops):
        raise ValueError("stop cannot contain an empty string.")
    bad_words = v.get("bad_words") or []
    if any(not w for w in bad_words):
        raise ValueError(f"bad_words cannot contain an empty string. Got bad_words={bad_words}")
    if temperature < _SAMPLING_EPS and n > 1:
        raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _requested_max_tokens(v: dict[str, Any], is_chat: bool) -> tuple[int | None, str]:
    """The client's output limit as vLLM reads it, and the parameter name its messages use."""
    if is_chat:
        if v.get("max_completion_tokens") is not None:
            return v["max_completion_tokens"], "max_completion_tokens"
        return v.get("max_tokens"), "max_tokens"
    max_tokens = v.get("max_tokens")
    return (16 if max_tokens is None else max_tokens), "max_tokens"  # vLLM's normalize_null_max_tokens


# ------------------------------------------------------------------------------------------------ public API


def validate_request(path: str, body: dict[str, Any]) -> None:
    """Raise ``RequestError(400, message, param)`` where vLLM 0.26 would answer 400 to this body.

    ``path`` ends with ``/v1/completions`` or ``/v1/chat/completions`` (other paths are not checked);
    ``body`` is the decoded JSON object and is not modified.  The context-length checks need the prompt's
    token count and the model's length: call ``check_context_length`` after this.  (vLLM checks the context
    between stages 2 and 3, so a body wrong in both ways gets vLLM's context message there and the range
    message here; each alone gets vLLM's text.)
    """
    is_chat = path.endswith(CHAT_PATH)
    if not is_chat and not path.endswith(COMPLETIONS_PATH):
        return
    seen = body  # the body as vLLM's validators see it at each step
    try:
        if is_chat:  # ChatCompletionRequest's before-validators, last defined first (pydantic's order)
            _chat_first_validators(body)
            seen = _tool_usage_check(body)
            _chat_last_validators(seen)
        else:
            _completion_before_validators(body)
    except ValueError as exc:
        raise _model_validator_error(exc, seen) from None
    except TypeError as exc:  # vLLM's comparison on a wrongly typed value: its handler sends str(exc)
        raise RequestError(400, _sanitize(str(exc))) from None
    try:
        # from_attributes: FastAPI validates bodies so, and it changes the text of a non-object error
        v = (_CHAT_FIELDS if is_chat else _COMPLETION_FIELDS).validate_python(seen, from_attributes=True)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise _validation_error(errors) from None
    if v.get("use_beam_search"):
        if not is_chat and v.get("stream"):
            raise RequestError(400, "Streaming is not currently supported with beam search")
        return  # vLLM builds BeamSearchParams, which has none of SamplingParams' range checks
    max_tokens, _ = _requested_max_tokens(v, is_chat)
    if is_chat:
        logprobs = _or(v.get("top_logprobs"), 0) if v.get("logprobs") and not v.get("logprob_token_ids") else None
        prompt_logprobs = v.get("prompt_logprobs")
        if prompt_logprobs is None and v.get("echo"):
            prompt_logprobs = _or(v.get("top_logprobs"), 0)
    else:
        if v.get("echo") and max_tokens == 0:
            max_tokens = 1  # echo without generation: vLLM asks the engine for one token
        logprobs = None if v.get("logprob_token_ids") else v.get("logprobs")
        prompt_logprobs = v.get("prompt_logprobs")
        if prompt_logprobs is None and v.get("echo"):
            prompt_logprobs = v.get("logprobs")
    try:
        _verify_sampling(v, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except VLLMValidationError as exc:
        raise RequestError(400, _sanitize(str(exc)), exc.parameter) from None
    except ValueError as exc:
        raise RequestError(400, _sanitize(str(exc))) from None


def check_context_length(prompt_tokens: int, body: dict[str, Any], max_model_len: int, *, exact: bool) -> bool:
    """vLLM 0.26's context-length 400s for a body that passed ``validate_request``.

    ``prompt_tokens`` is the prompt's length in tokens (for a batch of completion prompts: the longest one; for
    chat: after the chat template).  Contract:

    - ``exact=True``: it is the real count.  Raises ``RequestError(400, message, param)`` with vLLM's text where
      vLLM rejects the request, else returns ``False``.
    - ``exact=False``: it is only an upper bound (e.g. the prompt's UTF-8 byte count, which no byte-level BPE
      token count exceeds before the template's special tokens; note that ``ceil(chars / 4)`` is an estimate,
      not a bound).  It never raises on a ground that depends on the prompt's length: it returns ``True``
      ("needs an exact count") when the bound would be rejected, and ``False`` when even the bound fits.  The
      caller then counts exactly and calls again with ``exact=True``, or forwards and lets the engine decide.
    - Either way it raises for what does not depend on the prompt: ``max_tokens`` (``max_completion_tokens``)
      above ``max_model_len``, ``truncate_prompt_tokens`` above ``max_model_len - max_tokens``.

    vLLM's order and texts: the output limit against ``max_model_len`` (``TokenizeParams``), the prompt against
    ``max_model_len - max_tokens`` after ``truncate_prompt_tokens`` (a text or chat prompt is reported as "at
    least max_input + 1" tokens because vLLM stops tokenizing there), then, for a chat request without a limit,
    ``max_model_len - prompt`` as ``max_tokens`` (>= 1, >= ``min_tokens``), and the engine's own "prompt fills
    the whole context" check.  Not reproduced: vLLM's pre-tokenization character check, which for a text far
    beyond the limit reports characters instead of tokens (it needs the tokenizer's longest token).
    """
    is_chat = "messages" in body and "prompt" not in body
    # validate_request accepted lax values ("5", 5.0, true): read them as vLLM's int fields did
    ints = {k: _as_int(body.get(k)) for k in ("max_tokens", "max_completion_tokens", "truncate_prompt_tokens")}
    requested, param = _requested_max_tokens(ints, is_chat)
    max_output = requested or 0
    if max_output > max_model_len:
        _raise_vllm(
            VLLMValidationError(
                f"{param}={max_output} cannot be greater than max_model_len=max_total_tokens={max_model_len}. "
                "Please request fewer output tokens.",
                parameter=param,
                value=max_output,
            )
        )
    max_input = max_model_len - max_output
    truncate = ints["truncate_prompt_tokens"]
    if truncate is not None and truncate > max_input:
        _raise_vllm(
            VLLMValidationError(
                f"truncate_prompt_tokens={truncate} cannot be greater than max_model_len - {param} = {max_input}. "
                "Please request a smaller truncation size.",
                parameter="truncate_prompt_tokens",
                value=truncate,
            )
        )
    count = prompt_tokens
    if truncate is not None:
        count = min(count, max_input if truncate < 0 else truncate)
    if count > max_input:
        if not exact:
            return True
        if not _is_token_ids(body.get("prompt")):
            count = min(count, max_input + 1)  # vLLM tokenizes text (and chat) with max_length = max_input + 1
        qualifier = "at least " if count == max_input + 1 else ""
        _raise_vllm(
            VLLMValidationError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{max_output} output tokens and your prompt contains {qualifier}{count} input tokens, for a total "
                f"of {qualifier}{count + max_output} tokens. Please reduce the length of the input prompt or the "
                "number of requested output tokens.",
                parameter="input_tokens",
                value=count,
            )
        )
    if requested is None:  # chat without a limit: vLLM's get_max_tokens gives max_model_len - prompt
        if count >= max_model_len and not exact:
            return True
        implied = max_model_len - count
        if implied < 1:
            _raise_vllm(
                VLLMValidationError(
                    f"max_tokens must be at least 1, got {implied}.", parameter="max_tokens", value=implied
                )
            )
        min_tokens = _as_int(body.get("min_tokens")) or 0
        if min_tokens > implied:
            if not exact:
                return True
            _raise_vllm(ValueError(f"min_tokens must be less than or equal to max_tokens={implied}, got {min_tokens}."))
    elif count == max_model_len:  # only reachable with echo and max_tokens=0 (vLLM then generates one token)
        if not exact:
            return True
        _raise_vllm(
            ValueError(
                f"The decoder prompt (length {count}) plus the number of requested output tokens (at least 1) is "
                f"longer than the maximum model length of {max_model_len}. Make sure that `max_model_len` is no "
                "smaller than the number of text tokens (prompt + requested output tokens)."
            )
        )
    return False


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)


def _as_int(value: Any) -> int | None:
    return None if value is None else int(float(value)) if isinstance(value, str) else int(value)


def _raise_vllm(exc: ValueError) -> None:
    param = exc.parameter if isinstance(exc, VLLMValidationError) else None
    raise RequestError(400, _sanitize(str(exc)), param)
