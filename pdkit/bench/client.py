"""One streamed OpenAI request, timed chunk by chunk, turned into a :class:`RequestRecord`.

Why chunk timing rather than the server's own histograms: the client's view includes the frontend's
P->D hop and queueing, which is what a user sees and what disaggregation changes.  A chunk counts as a
token event when it carries a choice with output (vLLM sends one chunk per engine step per request even
when the detokenized text is empty, so the chunk -- not the text -- is the token clock); chat's initial
role-only delta does not count.  The authoritative token counts come from the final ``usage`` chunk
(``stream_options.include_usage``).

Nothing here raises for a failed request: HTTP errors, error events inside a stream, timeouts and
dropped connections all end as ``ok=False`` with a short ``error`` code, so a benchmark run always
finishes and reports its failures.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestRecord:
    """What one request did; times in seconds, ``start_s`` relative to the start of its point."""

    request_id: str
    start_s: float = 0.0
    ok: bool = False
    error: str | None = None
    error_detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    elapsed_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    expected_prompt_tokens: int | None = None
    expected_output_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    def as_json(self, slo_itl: Any = None) -> dict[str, Any]:
        """Per-request row for the result file (no ITL list, no text: they would dominate the file)."""
        from pdkit.bench.stats import percentile, tpot

        return {
            "id": self.request_id,
            "start_s": round(self.start_s, 6),
            "ok": self.ok,
            "error": self.error,
            "error_detail": self.error_detail,
            "status": self.status,
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "tpot_s": tpot(self),
            "itl_p50_s": percentile(self.itl_s, 50),
            "itl_p99_s": percentile(self.itl_s, 99),
            "itl_max_s": max(self.itl_s) if self.itl_s else None,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "expected_prompt_tokens": self.expected_prompt_tokens,
            "finish_reason": self.finish_reason,
            **({"tags": self.tags} if self.tags else {}),
        }


def _chunk_output(choice: dict[str, Any], chat: bool) -> tuple[bool, str, list[int] | None]:
    """(is a token event, text, the token ids it carries when the request asked for them) for one choice."""
    ids = choice.get("token_ids")
    ids = ids if isinstance(ids, list) else None
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""
        if text or ids or delta.get("tool_calls"):
            return True, text, ids
        return False, text, ids  # a role-only first delta, or an empty finish-only chunk
    text = choice.get("text") or ""
    return True, text, ids


def _short(data: bytes | str, limit: int = 300) -> str:
    s = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return s if len(s) <= limit else s[:limit] + "..."


async def send_streaming(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    timeout_s: float,
    t0_point: float,
    headers: dict[str, str] | None = None,
) -> RequestRecord:
    """POST ``body`` (``stream`` forced on) to ``url`` and fill ``record``; never raises (except cancel).

    ``record.token_ids`` collects the ids vLLM streams when the body asks ``return_token_ids`` (the
    equality checks compare those, not text); ``record.usage`` is the final usage chunk as sent."""
    chat = url.rstrip("/").endswith("/chat/completions")
    body = {**body, "stream": True}
    body.setdefault("stream_options", {"include_usage": True})
    start = time.perf_counter()
    record.start_s = start - t0_point
    last: float | None = None
    tokens = 0
    parts: list[str] = []
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url, json=body, timeout=timeout, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error = f"http_{resp.status}"
                record.error_detail = _short(await resp.read())
                return record
            buf = b""
            async for raw in resp.content.iter_any():
                buf += raw
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    now = time.perf_counter()
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            continue
                        msg = json.loads(data)
                        if "error" in msg and not msg.get("choices"):
                            err = msg["error"]
                            record.error = "stream_error"
                            record.error_detail = _short(json.dumps(err))
                            return record
                        usage = msg.get("usage")
                        if usage:
                            record.usage = usage
                            record.prompt_tokens = usage.get("prompt_tokens")
                            if usage.get("completion_tokens") is not None:
                                record.output_tokens = int(usage["completion_tokens"])
                        for choice in msg.get("choices") or []:
                            if choice.get("finish_reason"):
                                record.finish_reason = choice["finish_reason"]
                            is_token, text, ids = _chunk_output(choice, chat)
                            if ids:
                                record.token_ids += ids
                            if not is_token:
                                continue
                            parts.append(text)
                            tokens += len(ids) if ids is not None else 1
                            if last is None:
                                record.ttft_s = now - start
                            else:
                                record.itl_s.append(now - last)
                            last = now
        end = time.perf_counter()
        record.e2e_s = end - start
        record.text = "".join(parts)
        if record.output_tokens == 0:
            record.output_tokens = tokens
        if last is None:
            record.error = "no_tokens"
        elif record.finish_reason == "error" or record.finish_reason == "abort":
            record.error = f"finish_{record.finish_reason}"
        else:
            record.ok = True
    except asyncio.TimeoutError:
        record.error = "timeout"
        record.error_detail = f"no complete answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        record.error = "connection"
        record.error_detail = _short(f"{type(exc).__name__}: {exc}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        record.error = "bad_response"
        record.error_detail = _short(f"{type(exc).__name__}: {exc}")
    finally:
        record.elapsed_s = time.perf_counter() - start
    return record


def stream_once(
    url: str, body: dict[str, Any], *, headers: dict[str, str] | None = None, timeout_s: float = 300
) -> RequestRecord:
    """One streamed request from synchronous code (the GPU checks send one request at a time): the same
    client, token clock and failure codes as ``pdkit bench``, in a short-lived session of its own."""

    async def one() -> RequestRecord:
        async with aiohttp.ClientSession() as session:
            record = RequestRecord("once")
            return await send_streaming(session, url, body, record, timeout_s, time.perf_counter(), headers)

    return asyncio.run(one())
