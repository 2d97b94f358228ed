"""First-token seeding for disaggregated serving: pure functions the frontend's P/D path calls.

Why: the prefill hop already samples the first token (``max_tokens=1``) and the decode used to sample
it again after the KV pull, so a disaggregated request paid prefill + transfer + one decode step before
the client saw anything.  With seeding the frontend streams the prefill's token at once and sends the
decode the prompt *plus that token* as token ids, with the prefill's ``kv_transfer_params``: vLLM's
decode (0.26 and 0.32, pull and push) then loads the prompt's KV over NIXL and computes only the new
token's KV ("recompute the last token" of a full remote hit), so it never samples the first token again.
docs/seeding.md has the evidence (file/function references into vLLM 0.26 and 0.32) and the wiring.

Shapes follow vLLM 0.26's protocol classes (``vllm/entrypoints/openai/{completion,chat_completion}/
protocol.py``, chunks serialized with ``exclude_unset=True``).  The decode hop always goes to
``/v1/completions`` (token ids are the only exact way to hand vLLM prompt + first token; a chat request
is rendered once, by the prefill, whose ``prompt_token_ids`` come back with ``return_token_ids``), and
its answer is reshaped into the client's format with the ``id``/``created``/``model`` of the prefill's
answer, which is what the client saw first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pdkit.stack import SEED_WHOLE_BLOCK

COMPLETIONS_PATH = "/v1/completions"

# Fields of a client body the seeded decode carries over unchanged (their meaning is the same on the
# completions API and applies to tokens 2..n exactly as in an aggregated run).
_CARRIED = (
    "model",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "priority",
    "cache_salt",
    "user",
    "return_token_ids",
    "return_tokens_as_token_ids",
    "vllm_xargs",
)
# Fields that are consumed by the prefill (prompt rendering, lengths) or rewritten here.
_HANDLED = (
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "stream_options",
    "kv_transfer_params",
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "truncate_prompt_tokens",
    "logprobs",
    "top_logprobs",
    "n",
    "echo",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "request_id",
)
_KNOWN = frozenset(_CARRIED) | frozenset(_HANDLED)


class SeedingError(ValueError):
    """The prefill's answer lacks what seeding needs: the frontend sends the decode unseeded instead."""


@dataclass(frozen=True)
class FirstToken:
    """The prefill hop's token and what the client's answer needs from that hop."""

    token_id: int
    text: str
    prompt_token_ids: tuple[int, ...]  # vLLM's own tokenization / chat rendering of the prompt
    finish_reason: str | None  # "length" normally (max_tokens=1); "stop" when EOS or a stop string ended it
    stop_reason: int | str | None
    logprobs: Any  # the choice's logprobs in the client's API format, or None
    kv_transfer_params: dict[str, Any] | None
    id: str
    created: int
    model: str
    answer: dict[str, Any] = field(repr=False, compare=False)  # the prefill's whole JSON (a shape template)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def is_chat(path: str) -> bool:
    return path.endswith("/chat/completions")


def requested_max_tokens(path: str, body: dict[str, Any]) -> int | None:
    """The client's output limit (chat: ``max_completion_tokens`` wins over ``max_tokens``), or None."""
    value = body.get("max_completion_tokens") if is_chat(path) else None
    if value is None:
        value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def seed_refusal(path: str, body: dict[str, Any], *, output_parsers: bool = False) -> str | None:
    """Why this request must take the unseeded P/D path (None: it can be seeded).

    Each reason is a case where tokens 2..n of a seeded decode would differ from an aggregated run, or
    where the answer could not be rebuilt exactly.  ``output_parsers``: the decode workers run vLLM with
    a reasoning or tool-call parser (chat output is post-processed there; the completions API is not).
    """
    unknown = sorted(k for k in body if k not in _KNOWN)
    if unknown:
        return f"field {unknown[0]!r} is not handled by the seeding path"
    if body.get("n") not in (None, 1):
        return "n > 1"
    if body.get("echo"):
        return "echo"
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        return "stream is not a boolean"
    if is_chat(path):
        if output_parsers:
            return "decode workers post-process chat output (reasoning/tool parser)"
        if body.get("tools") or body.get("tool_choice") not in (None, "none"):
            return "tools"
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            return "response_format (structured output restarts its grammar at the decode)"
        if body.get("logprobs") or body.get("top_logprobs") is not None:
            return "chat logprobs (not reshaped from the completions API)"
    else:
        if body.get("response_format") is not None:
            return "response_format"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return "several prompts"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        return "presence/frequency penalties (they count output tokens; the seeded token becomes prompt)"
    if body.get("seed") is not None and body.get("temperature") != 0:
        return "seed with sampling (vLLM's per-request generator restarts on the decode)"
    stops = _stops(body)
    if stops and not body.get("stream"):
        return "stop strings without streaming (a stop across the seeded token cannot be counted in tokens)"
    min_tokens = body.get("min_tokens") or 0
    if stops and isinstance(min_tokens, int) and min_tokens > 1:
        return "stop strings with min_tokens > 1"
    max_tokens = requested_max_tokens(path, body)
    if max_tokens is not None and max_tokens < 1:
        return "max_tokens < 1"
    return None


def prefill_body(path: str, body: dict[str, Any], prefill_kv_params: dict[str, Any]) -> dict[str, Any]:
    """The prefill hop of a seeded request: the client's body with one token, no stream, token ids back.

    Unlike the unseeded hop, ``min_tokens`` stays 0 unless the client asked for at least one token:
    the first token the client sees is this one, so EOS must be as possible here as in an aggregated
    run (NIXL 0.26 returns ``kv_transfer_params`` for a request stopped by EOS or a stop string too:
    ``NixlPullConnectorScheduler.request_finished`` accepts FINISHED_STOPPED and FINISHED_LENGTH_CAPPED;
    0.32 alike).  A client asking for one token gets a plain one-token request, without
    ``kv_transfer_params``: no decode hop follows, so there are no KV blocks to keep for one.
    """
    out = dict(body)
    out["max_tokens"] = 1
    if is_chat(path):
        out["max_completion_tokens"] = 1
    min_tokens = body.get("min_tokens") or 0
    out["min_tokens"] = 1 if isinstance(min_tokens, int) and min_tokens >= 1 else 0
    out["stream"] = False
    out.pop("stream_options", None)
    out["return_token_ids"] = True  # completions and chat, vLLM 0.26: output and prompt token ids
    if requested_max_tokens(path, body) == 1:
        # The prefill's token is the whole answer (``ends_request``): asking for a remote decode would
        # only pin its KV blocks on the prefill worker until NIXL's lease runs out.
        out.pop("kv_transfer_params", None)
    else:
        out["kv_transfer_params"] = dict(prefill_kv_params)
    return out


def first_token_from_prefill(path: str, answer: dict[str, Any]) -> FirstToken:
    """The prefill's token (id, text, logprobs) and the prompt's token ids from its JSON answer.

    Both APIs answer ``return_token_ids`` with the choice's ``token_ids``; the prompt's ids are on the
    choice for completions and at the top level for chat.  Raises :class:`SeedingError` otherwise.
    """
    try:
        choice = answer["choices"][0]
        ids = choice.get("token_ids")
        prompt_ids = answer.get("prompt_token_ids") if is_chat(path) else choice.get("prompt_token_ids")
        text = choice["message"].get("content") if is_chat(path) else choice.get("text")
        if not isinstance(ids, list) or len(ids) != 1 or not isinstance(ids[0], int):
            raise SeedingError(f"the prefill's answer has token_ids {ids!r}, not one token id")
        if not isinstance(prompt_ids, list) or not prompt_ids or not all(isinstance(t, int) for t in prompt_ids):
            raise SeedingError("the prefill's answer has no prompt_token_ids (was return_token_ids sent?)")
        params = answer.get("kv_transfer_params")
        computed = params.get("remote_num_tokens") if isinstance(params, dict) else None
        if isinstance(computed, int) and computed != len(prompt_ids):
            # NIXL's prefill backoff (Mamba/hybrid models; 0.32 also multi-token MTP and bounded
            # replay): the prefill cut the prompt short and its "first token" predicts a prompt token.
            raise SeedingError(
                f"the prefill computed {computed} of the prompt's {len(prompt_ids)} tokens (NIXL prefill "
                "backoff): its token is not the first output token"
            )
        return FirstToken(
            token_id=ids[0],
            text=text or "",
            prompt_token_ids=tuple(prompt_ids),
            finish_reason=choice.get("finish_reason"),
            stop_reason=choice.get("stop_reason"),
            logprobs=choice.get("logprobs"),
            kv_transfer_params=answer.get("kv_transfer_params"),
            id=str(answer["id"]),
            created=int(answer["created"]),
            model=str(answer["model"]),
            answer=answer,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, SeedingError):
            raise
        raise SeedingError(f"the prefill's answer is not a {path} answer: {exc!r}") from None


def ends_request(path: str, body: dict[str, Any], first: FirstToken, max_model_len: int | None = None) -> bool:
    """True when the first token is the whole answer: no decode hop.

    vLLM already applied EOS, ``stop_token_ids`` and stop strings to the prefill's token (the prefill
    body carries them; ``min_tokens`` is kept), which then finished with ``stop``.  Otherwise the
    client's limit: ``max_tokens == 1``, or no room left in the context for a second token.
    """
    if first.finish_reason == "stop":
        return True
    if requested_max_tokens(path, body) == 1:
        return True
    return max_model_len is not None and first.num_prompt_tokens + 1 >= max_model_len


def seeded_kv_transfer_params(
    params: dict[str, Any], block_size: int, *, chat: bool = False, nixl_mode: str | None = None
) -> dict[str, Any]:
    """The prefill's params for a decode whose prompt is one token longer than the prefill's.

    ``chat``: the client's request (so its prefill hop) is a chat completion; ``nixl_mode``: the prefill
    worker's registered direction (``WorkerInfo.nixl_mode``), used where the params do not name one (0.26).
    Push pairs the decode's block registration with the prefill's finished request by *request id*
    (``NixlPushConnectorWorker._pop_matching_registration``: equal ids, or equal once the ``-<8 hex>``
    suffix is stripped).  The two hops share the client's ``X-Request-Id``, but vLLM prefixes it per
    API: a chat prefill is ``chatcmpl-<id>-…``, the seeded decode (token ids, so ``/v1/completions``) is
    ``cmpl-<id>-0-…``; they never pair, the prefill never writes, and the decode waits out
    ``push_registration_timeout`` (seen on one H200, vLLM 0.26, 2026-12-02: the frontend's 120 s
    first-byte timeout fired first).  So a chat request in push mode is decoded unseeded; a completions
    request pairs (``cmpl-<id>-0`` on both hops).

    Raises :class:`SeedingError` when the decode cannot load the prompt's KV correctly with the seed
    appended (the frontend then decodes unseeded: nothing has reached the client yet).  The NIXL mode
    comes from the params themselves: vLLM 0.32's prefill adds ``transfer_mode`` ("pull" | "push"); 0.26's
    has none (its push writer cuts the longer block list, so 0.26 needs the pull rule only).  The rule
    per mode is the version table's ``pdkit.stack.SEED_WHOLE_BLOCK``.

    Pull (0.26 and 0.32): the decode allocates blocks for prompt + seed and pairs its unhashed local
    blocks with ``remote_block_ids`` from the ends (``NixlBaseConnectorWorker._apply_prefix_caching``,
    asserting ``num_local_blocks <= len(remote_group)``).  When the prefill length is a multiple of the
    block size the seed opens a block the prefill never had: without a pad the worker's assertion fires
    (no local hit) or every block is read one position off (a local prefix hit, silent garbage).
    Repeating the last remote block id once per KV group restores the pairing; that read fills the seed
    token's block, whose only used slot the decode computes itself.

    Push (0.32): the decode registers its unhashed blocks and the *prefill's* writer pairs them with its
    own from the ends (the same ``_apply_prefix_caching``, in ``NixlPushConnectorWorker._xfer_blocks``);
    the decode's ``remote_block_ids`` are ignored, so no pad can help.  At a multiple of the block size
    the decode registers one block more than the prefill has: the writer thread's assertion drops the
    push (the decode then waits for ``push_registration_timeout``) or, with a local hit, writes every
    block one position off.  Other lengths pair exactly and need nothing.
    """
    out = copy.deepcopy(params)
    n = params.get("remote_num_tokens")
    groups = params.get("remote_block_ids")
    mode = params.get("transfer_mode")
    if chat and (mode if isinstance(mode, str) else nixl_mode) == "push":
        raise SeedingError(
            "push mode pairs the hops by request id, and a chat prefill (chatcmpl-) never pairs with the "
            "seeded token-id decode (cmpl-)"
        )
    rule = SEED_WHOLE_BLOCK.get(mode) if isinstance(mode, str) or mode is None else None
    if rule is None:
        raise SeedingError(f"unknown NIXL transfer_mode {mode!r}: the seeded block pairing is unproven there")
    if not isinstance(n, int) or n <= 0 or block_size <= 0 or n % block_size:
        return out
    if rule == "refuse":
        raise SeedingError(
            f"push mode and a prompt of {n} tokens ({n // block_size} whole blocks of {block_size}): the seed "
            "would open a block the prefill's writer cannot pair"
        )
    if isinstance(groups, (list, tuple)):  # a JSON list over HTTP; vLLM's own BlockIds is a tuple of lists
        out["remote_block_ids"] = [list(g) + [g[-1]] if g else list(g) for g in groups]
    return out


# The model name of a release request: no served model (or LoRA resolver) can have a space in its name.
RELEASE_MODEL = "pdkit release prefill kv"


def release_request(first: FirstToken) -> tuple[str, dict[str, Any]] | None:
    """(path, body) that frees the prefill's leased KV blocks when no decode hop will run, else None.

    Why: a request that the first token ends by EOS or a stop string (``ends_request``) asked the prefill
    for a remote decode, so NIXL keeps its blocks until ``kv_lease_duration`` (30 s) runs out.  vLLM
    0.26 and 0.32 free them early for a decode-side request *rejected* by the serving layer
    (``_with_kv_transfer_rejection_cleanup``: an ErrorResponse from ``create_completion`` submits a
    pre-aborted engine request with the same ``kv_transfer_params``; the pull scheduler's
    ``request_finished`` queues an empty read, and the pull worker's notify-only path tells the prefill
    to free).  An unknown ``model`` is rejected first thing (404), before any prompt work.  POST this to
    any decode worker and ignore the answer.  None in push mode: there the decode worker only waits
    for the prefill's writes and notifies nobody (vLLM 0.32 ``NixlPushConnectorWorker.start_load_kv``),
    so the lease is the only way out.
    """
    params = first.kv_transfer_params
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return None
    if params.get("transfer_mode", "pull") != "pull":
        return None
    body = {"model": RELEASE_MODEL, "prompt": [first.token_id], "max_tokens": 1, "kv_transfer_params": params}
    return COMPLETIONS_PATH, body


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM 0.26 CompletionRequest.max_tokens (null is normalized to it)


def seeded_decode_body(
    path: str,
    body: dict[str, Any],
    first: FirstToken,
    block_size: int,
    max_model_len: int | None = None,
    nixl_mode: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(path, body) of the decode hop: prompt ids + first token, one token less to generate.

    ``block_size`` is the prefill worker's (``WorkerInfo.block_size``), ``max_model_len`` the decode
    worker's: a chat request without a limit may run to the end of the context, and the completions API
    would otherwise stop at its default of 16; ``nixl_mode`` the prefill worker's
    (``seeded_kv_transfer_params``).  Raises :class:`SeedingError` when that limit is needed but unknown,
    or the KV cannot be paired (the frontend then sends the unseeded decode; nothing reached the client).
    The decode always returns token ids (exact token counts for usage); the client sees them only if
    it asked (``SeededStream`` / ``merge_non_streamed`` hide them).
    """
    out: dict[str, Any] = {k: body[k] for k in _CARRIED if k in body}
    out["prompt"] = [*first.prompt_token_ids, first.token_id]
    out["return_token_ids"] = True
    max_tokens = requested_max_tokens(path, body)
    if max_tokens is None and not is_chat(path):
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is None:
        if max_model_len is None:
            raise SeedingError("a chat request without max_tokens needs the decode worker's max_model_len")
        max_tokens = max_model_len - first.num_prompt_tokens
    out["max_tokens"] = max_tokens - 1
    if out["max_tokens"] < 1:
        raise SeedingError("no token left for the decode (ends_request should have ended it)")
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > 0:
        out["min_tokens"] = min_tokens - 1
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    if not is_chat(path) and body.get("logprobs") is not None:
        out["logprobs"] = body["logprobs"]
    if body.get("stream"):
        so = body.get("stream_options")
        if isinstance(so, dict) and so:
            out["stream_options"] = dict(so)
    if _stops(body):
        # vLLM would check them over the decode's output only; SeededStream checks the whole output
        out.pop("stop", None)
        out.pop("include_stop_str_in_output", None)
    if first.kv_transfer_params is not None:
        out["kv_transfer_params"] = seeded_kv_transfer_params(
            first.kv_transfer_params, block_size, chat=is_chat(path), nixl_mode=nixl_mode
        )
    return COMPLETIONS_PATH, out


# ------------------------------------------------------------------------------------------- shapes


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def _continuous_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return bool(body.get("stream") and isinstance(so, dict) and so.get("continuous_usage_stats"))


def _include_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return bool(body.get("stream") and isinstance(so, dict) and so.get("include_usage"))


def _usage(n_prompt: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out}


def _chunk(obj: str, first: FirstToken, choice: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """One streamed chunk of vLLM's shape; chat and completions differ only in ``object``."""
    out: dict[str, Any] = {
        "id": first.id,
        "object": obj,
        "created": first.created,
        "model": first.model,
        "choices": [choice],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def _chat_chunk(first: FirstToken, choice: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return _chunk("chat.completion.chunk", first, choice, usage)


def _completion_chunk(first: FirstToken, choice: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return _chunk("text_completion", first, choice, usage)


def first_chunk(
    path: str, body: dict[str, Any], first: FirstToken, *, final: bool = False, text: str | None = None
) -> bytes:
    """The SSE bytes that show the client the first token (``final``: it is also the last one).

    Chat: vLLM's role chunk (``delta={"role": "assistant", "content": ""}``, the prompt's ids when
    ``return_token_ids``), then the token's content chunk.  Completions: one chunk with the token's
    text, logprobs and (``return_token_ids``) ids.  ``text`` overrides the token's text (the frontend
    holds back the tail that a stop string could still claim, as vLLM's detokenizer does).
    """
    shown = first.text if text is None else text
    want_ids = bool(body.get("return_token_ids"))
    cont = _continuous_usage(body)
    finish = first.finish_reason if final else None
    n = first.num_prompt_tokens
    if is_chat(path):
        role = _chat_chunk(
            first,
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
            _usage(n, 0) if cont else None,
        )
        role["prompt_token_ids"] = list(first.prompt_token_ids) if want_ids else None
        role["prompt_text"] = None
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": shown} if shown or not final else {},
            "logprobs": None,
            "finish_reason": finish,
        }
        if final:
            choice["stop_reason"] = first.stop_reason
        choice["token_ids"] = [first.token_id] if want_ids else None
        return _sse(role) + _sse(_chat_chunk(first, choice, _usage(n, 1) if cont else None))
    choice = {
        "index": 0,
        "text": shown,
        "logprobs": first.logprobs,
        "finish_reason": finish,
        "stop_reason": first.stop_reason if final else None,
        "prompt_token_ids": list(first.prompt_token_ids) if want_ids else None,
        "token_ids": [first.token_id] if want_ids else None,
    }
    return _sse(_completion_chunk(first, choice, _usage(n, 1) if cont else None))


def single_token_stream(path: str, body: dict[str, Any], first: FirstToken) -> bytes:
    """The whole stream of a request that the first token ends (``ends_request``)."""
    out = first_chunk(path, body, first, final=True)
    if _include_usage(body):
        obj = "chat.completion.chunk" if is_chat(path) else "text_completion"
        usage = {"id": first.id, "object": obj, "created": first.created, "model": first.model, "choices": []}
        usage["usage"] = _usage(first.num_prompt_tokens, 1)
        out += _sse(usage)
    return out + b"data: [DONE]\n\n"


def single_token_answer(path: str, body: dict[str, Any], first: FirstToken) -> dict[str, Any]:
    """The non-streamed answer of a request that the first token ends: the prefill's, cleaned."""
    out = copy.deepcopy(first.answer)
    out["kv_transfer_params"] = None
    _hide_ids(path, body, out)
    return out


def _hide_ids(path: str, body: dict[str, Any], answer: dict[str, Any]) -> None:
    """Token ids the prefill returned only because the frontend asked: gone unless the client asked."""
    if body.get("return_token_ids"):
        return
    for choice in answer.get("choices") or []:
        choice["token_ids"] = None
        if not is_chat(path):
            choice["prompt_token_ids"] = None
    if is_chat(path):
        answer["prompt_token_ids"] = None


def _shift_offsets(logprobs: Any, by: int) -> Any:
    if isinstance(logprobs, dict) and isinstance(logprobs.get("text_offset"), list) and by:
        return {**logprobs, "text_offset": [o + by for o in logprobs["text_offset"]]}
    return logprobs


def _concat_logprobs(a: Any, b: Any) -> Any:
    """Completions logprobs of the first token followed by the decode's (offsets already shifted)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a if b is None else b if a is None else None
    return {
        k: list(a.get(k) or []) + list(b.get(k) or [])
        for k in ("text_offset", "token_logprobs", "tokens", "top_logprobs")
    }


def merge_non_streamed(path: str, body: dict[str, Any], first: FirstToken, decode: dict[str, Any]) -> dict[str, Any]:
    """The client's answer from the prefill's answer (shape, id, first token) and the decode's (rest).

    Text and token ids are concatenated, logprobs (completions) too with the decode's offsets moved
    past the first token's text, finish and stop reason come from the decode, and usage counts every
    token once: the prompt as the prefill saw it, the first token plus the decode's output.
    """
    try:
        d = decode["choices"][0]
        d_text = d.get("text") or ""
        d_usage = decode["usage"]
        d_out = int(d_usage["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SeedingError(f"the decode's answer is not a completions answer: {exc!r}") from None
    out = copy.deepcopy(first.answer)
    choice = out["choices"][0]
    if is_chat(path):
        choice["message"]["content"] = first.text + d_text
    else:
        choice["text"] = first.text + d_text
        if body.get("logprobs") is not None:
            choice["logprobs"] = _concat_logprobs(first.logprobs, _shift_offsets(d.get("logprobs"), len(first.text)))
    choice["finish_reason"] = d.get("finish_reason")
    choice["stop_reason"] = d.get("stop_reason")
    ids = d.get("token_ids")
    choice["token_ids"] = [first.token_id, *ids] if isinstance(ids, list) else None
    usage = dict(out.get("usage") or {})
    usage.update(_usage(first.num_prompt_tokens, 1 + d_out))
    out["usage"] = usage
    out["kv_transfer_params"] = None
    _hide_ids(path, body, out)
    return out


# ------------------------------------------------------------------------------------------ stream


def check_stop(
    text: str, new_chars: int, stops: list[str], include: bool, *, earliest_end: bool = True
) -> tuple[str, int] | None:
    """vLLM's stop-string check (``vllm/v1/engine/detokenizer.py: check_stop_strings``) over the whole
    output: (the stop string, the length the text is cut to), searched in the last ``new_chars``
    characters (plus its own length); None when none appears.  Several hits in one chunk: vLLM 0.32
    takes the one that completes earliest (list order breaks ties), 0.26 the first listed
    (``earliest_end=False``; the version table's ``Stack.stop_string_earliest_end``)."""
    if not new_chars:
        return None
    best: tuple[str, int, int] | None = None  # (stop, start, end)
    for s in stops:
        pos = text.find(s, max(0, len(text) + 1 - new_chars - len(s)))
        if pos < 0:
            continue
        if not earliest_end:
            best = (s, pos, pos + len(s))
            break
        if best is None or pos + len(s) < best[2]:
            best = (s, pos, pos + len(s))
    if best is None:
        return None
    s, pos, stop_end = best
    return s, min(len(text), stop_end) if include else pos


class SeededStream:
    """Rewrites the decode hop's SSE bytes into the rest of the client's stream.

    Per event: ``id``/``created``/``model`` of the first chunk; completions chunks become chat chunks
    for a chat client; usage counts the prompt as the prefill saw it and the first token as output;
    completions logprobs offsets move past the first token's text.

    Stop strings: the decode's vLLM would check them over *its* output only and miss one that starts
    in the seeded token's text, so the seeded decode is sent without them (``seeded_decode_body``) and
    this class runs vLLM's check over the whole output (``check_stop``), with vLLM's hold-back of the
    last ``max(len(stop)) - 1`` characters until no stop string can claim them.  On a hit the stream
    ends (``done``; the caller closes the decode hop, which vLLM takes as an abort); tokens are counted
    per chunk (vLLM's default ``stream_interval`` of 1 sends one token per chunk).  Bytes may arrive
    in any split; an error event or ``[DONE]`` passes through as is.
    """

    def __init__(self, path: str, body: dict[str, Any], first: FirstToken, *, earliest_stop: bool = True) -> None:
        self.earliest_stop = earliest_stop  # the decode's vLLM rule for several stops in one chunk (check_stop)
        self.path = path
        self.body = body
        self.first = first
        self.chat = is_chat(path)
        self.stops = _stops(body)
        self.include = bool(body.get("include_stop_str_in_output"))
        longest = max((len(s) for s in self.stops), default=1)
        self._hold = 0 if self.include or not self.stops else longest - 1
        self.text = first.text  # the whole output text so far
        self.sent = max(0, len(first.text) - self._hold)  # characters shown to the client
        self._buf = b""
        self.done = False  # the client's stream is complete: stop reading the decode
        self.decode_tokens = 0

    def first_chunk(self) -> bytes:
        """The client's first chunk(s), without the tail a stop string could still claim."""
        return first_chunk(self.path, self.body, self.first, text=self.text[: self.sent])

    def feed(self, data: bytes) -> bytes:
        """Bytes for the client from the next piece of the decode's stream (possibly none)."""
        if self.done:
            return b""
        self._buf += data
        out = b""
        while b"\n\n" in self._buf and not self.done:
            event, self._buf = self._buf.split(b"\n\n", 1)
            out += self._event(event)
        return out

    def _event(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data:"):
            return b""
        payload = line[len(b"data:") :].strip()
        if payload == b"[DONE]":
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            chunk = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return event + b"\n\n"
        if not isinstance(chunk, dict) or "error" in chunk:
            self.done = True
            return event + b"\n\n"
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        if not choices:  # the final usage chunk
            return _sse(self._usage_chunk(usage))
        c = choices[0]
        delta = c.get("text") or ""
        ids = c.get("token_ids")
        self.decode_tokens += len(ids) if isinstance(ids, list) else 1
        finish, stop_reason = c.get("finish_reason"), c.get("stop_reason")
        if not self.stops:
            return self._reshaped(c, delta, finish, stop_reason, usage)
        self.text += delta
        hit = check_stop(self.text, len(delta), self.stops, self.include, earliest_end=self.earliest_stop)
        if hit is not None:
            stop_reason, cut = hit
            self.text = self.text[:cut]
            finish = "stop"
        visible = len(self.text) if finish is not None else max(self.sent, len(self.text) - self._hold)
        text = self.text[self.sent : visible]
        self.sent = visible
        if hit is None:
            return self._reshaped(c, text, finish, stop_reason, usage)
        self.done = True
        out = self._reshaped(c, text, finish, stop_reason, usage)
        if _include_usage(self.body):
            out += _sse(self._usage_chunk(None))
        return out + b"data: [DONE]\n\n"

    def _fix_usage(self, usage: Any) -> dict[str, Any]:
        n_out = 1 + self.decode_tokens
        if not self.stops and isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            n_out = 1 + int(usage["completion_tokens"])
        fixed = dict(usage) if isinstance(usage, dict) else {}
        fixed.update(_usage(self.first.num_prompt_tokens, n_out))
        return fixed

    def _usage_chunk(self, usage: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        f = self.first
        chunk = {"id": f.id, "object": obj, "created": f.created, "model": f.model, "choices": []}
        chunk["usage"] = self._fix_usage(usage)
        return chunk

    def _reshaped(self, c: dict[str, Any], text: str, finish: Any, stop_reason: Any, usage: Any) -> bytes:
        want_ids = bool(self.body.get("return_token_ids"))
        ids = c.get("token_ids") if want_ids else None
        u = self._fix_usage(usage) if usage is not None else None
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": None,
                "finish_reason": finish,
            }
            if finish is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = ids
            return _sse(_chat_chunk(self.first, choice, u))
        logprobs = c.get("logprobs")
        if logprobs is not None:
            logprobs = _shift_offsets(logprobs, len(self.first.text))
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop_reason,
            "prompt_token_ids": None,
            "token_ids": ids,
        }
        return _sse(_completion_chunk(self.first, choice, u))


__all__ = [
    "COMPLETIONS_PATH",
    "FirstToken",
    "SeededStream",
    "SeedingError",
    "check_stop",
    "ends_request",
    "first_chunk",
    "first_token_from_prefill",
    "merge_non_streamed",
    "prefill_body",
    "release_request",
    "seed_refusal",
    "seeded_decode_body",
    "seeded_kv_transfer_params",
    "single_token_answer",
    "single_token_stream",
]
