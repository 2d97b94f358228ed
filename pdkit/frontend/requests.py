"""Client request parsing: validation, prompt extraction, cheap token estimates, vLLM-style errors.

The frontend parses each body once (msgspec, fast) only to route it and to build the prefill hop; what
reaches the engine is the client's body unchanged except for the P/D keys.  Validation is deliberately
shallow (JSON object, a prompt or messages, a sane ``stream``): every other field is vLLM's to judge, and
vLLM's own 400 reaches the client as is.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class RequestError(Exception):
    """A client-visible error: HTTP status + vLLM's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param)


def error_obj(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param, "code": status}}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return json.dumps(error_obj(status, message, param)).encode()


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RequestError(400, "request body is empty; send a JSON object")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", "model")
    return body


def extract_prompt(path: str, body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    """(prompt text, prompt token ids) of a completions or chat body; raises 400 if neither is there."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", "messages")
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                raise RequestError(400, "each message must be an object", "messages")
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts), None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if all(isinstance(p, str) for p in prompt):
            return "".join(prompt), None
        if all(isinstance(p, list) for p in prompt):
            return None, [t for p in prompt for t in p if isinstance(t, int)]
    raise RequestError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")


class TokenEstimator:
    """Prompt length in tokens for conditional disaggregation.

    Without a tokenizer: ``ceil(chars / 4)``, the usual English average, which costs nothing on the
    request path; the threshold only has to separate short prompts from long ones.  With a
    ``tokenizer.json`` path the count is exact for completions (chat adds the template's few tokens).
    """

    def __init__(self, tokenizer_path: str | None = None) -> None:
        self._tok: Any = None
        if tokenizer_path:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(tokenizer_path)

    def count(self, text: str | None, token_ids: list[int] | None) -> int:
        if token_ids is not None:
            return len(token_ids)
        if not text:
            return 0
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return (len(text) + 3) // 4
