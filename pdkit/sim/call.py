"""One generation call of the simulated engine: its sequences in the engine and its HTTP answer.

A call is ``n`` sequences per prompt (completions accept several prompts; chat has one). Choices are
numbered as vLLM 0.26 numbers them: prompt-major, ``index = prompt * n + choice``. The full answer
waits for every sequence; the stream interleaves their chunks as tokens come. Usage counts each
prompt once and every sequence's output. A sequence that fails (a failed KV load) fails the call
with vLLM's 500, and a client that hangs up aborts every sequence of the call.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdkit.sim.engine import FinishEvent, SimRequest, TokenEvent
from pdkit.sim.openai import (
    ApiError,
    SamplingOptions,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_json,
)
from pdkit.sim.sampling import LogprobEntry, SamplingSpec

if TYPE_CHECKING:
    from pdkit.sim.server import SimWorker


def internal_error() -> ApiError:
    """What vLLM answers when a request finishes with reason ``error`` (e.g. a failed KV load)."""
    return ApiError("Internal server error", 500, "InternalServerError")


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


@dataclass
class Prompt:
    """One tokenized prompt; ``text`` is what echo shows; ``entries`` its prompt logprobs when asked for."""

    ids: list[int]
    text: str
    entries: list[list[LogprobEntry] | None] | None = None


@dataclass
class Choice:
    """One sequence of the call and what it produced so far."""

    index: int
    prompt: Prompt
    req: SimRequest
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    entries: list[list[LogprobEntry] | None] = field(default_factory=list)
    finish: FinishEvent | None = None
    echoed: bool = False
    text_len: int = 0  # vLLM's previous_text_lens: output text only (not the echoed prompt)

    def add(self, ev: TokenEvent) -> None:
        self.texts.append(ev.text)
        self.token_ids.append(ev.token_id)
        self.entries.append(ev.logprobs)


class Call:
    """Submit, then answer in full or as a stream (see the module docstring)."""

    def __init__(
        self,
        worker: SimWorker,
        rid: str,
        body: dict[str, Any],
        sampling: SamplingOptions,
        requested: int | None,
        chat: bool,
    ) -> None:
        self.worker = worker
        self.rid = rid
        self.body = body
        self.sampling = sampling
        self.requested = requested  # None = what the context leaves; 0 = echo only
        self.chat = chat
        self.opts = worker._common(body)
        self.created = int(time.time())
        self.model = worker.settings.served_model_name
        self.token_str = worker.tokenizer.token_str
        self.choices: list[Choice] = []
        # vLLM 0.26's return_token_ids: output ids per choice (and per chunk), the prompt's ids once
        self.return_token_ids = bool(body.get("return_token_ids"))

    @property
    def engine(self) -> Any:
        assert self.worker.engine is not None
        return self.worker.engine

    # ------------------------------------------------------------------------------ submission
    async def run(self, request: web.Request, prompts: list[Prompt]) -> web.StreamResponse:
        k = self.sampling.num_prompt_logprobs
        if k is not None:
            for p in prompts:
                p.entries = await asyncio.to_thread(self.engine.sampler.prompt_logprobs, p.ids, k)
        base_seed = SamplingSpec.random_seed()
        for pi, p in enumerate(prompts):
            room = self.worker.max_model_len - len(p.ids)
            # echo without generation: vLLM runs one token and shows only the prompt
            max_tokens = 1 if self.requested == 0 else room if self.requested is None else min(room, self.requested)
            for j in range(self.sampling.n):
                base = self.rid if len(prompts) == 1 and self.sampling.n == 1 else f"{self.rid}-{pi}-{j}"
                req = SimRequest(
                    request_id=self.engine.new_request_id(base),
                    prompt_ids=p.ids,
                    max_tokens=max_tokens,
                    stop=self.opts["stop"],
                    kv_transfer_params=self.opts["kv_transfer_params"],
                    cache_salt=self.opts["cache_salt"],
                    sampling=self.sampling.spec(j, base_seed),
                )
                self.choices.append(Choice(len(self.choices), p, req))
        for c in self.choices:
            self.engine.add_request(c.req)
        try:
            if self.body.get("stream"):
                return await self._stream(request)
            return await self._full()
        except BaseException:
            for c in self.choices:
                self.engine.abort(c.req)
            raise

    async def _events(self, c: Choice) -> None:
        while True:
            ev = await c.req.events.get()
            if isinstance(ev, FinishEvent):
                c.finish = ev
                if ev.last_token is not None:
                    c.add(ev.last_token)
                return
            c.add(ev)

    def _usage(self) -> dict[str, Any]:
        prompts = {id(c.prompt): len(c.prompt.ids) for c in self.choices}
        n_prompt = sum(prompts.values())
        n_out = sum(len(c.req.output_ids) for c in self.choices)
        return {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out}

    # ------------------------------------------------------------------------------ full answer
    async def _full(self) -> web.Response:
        await asyncio.gather(*(self._events(c) for c in self.choices))
        if any(c.finish is None or c.finish.reason == "error" for c in self.choices):
            return internal_error().response()
        usage = {**self._usage(), "prompt_tokens_details": None}
        first = self.choices[0].finish
        assert first is not None
        # vLLM's ChatCompletionResponse and CompletionResponse share this envelope; chat adds the prompt
        # fields between usage and the transfer params (key order is vLLM's)
        envelope: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._chat_choice(c) if self.chat else self._completion_choice(c) for c in self.choices],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
        }
        if self.chat:
            prompt = self.choices[0].prompt
            envelope["prompt_logprobs"] = (
                prompt_logprobs_json(prompt.entries, self.token_str) if prompt.entries is not None else None
            )
            envelope["prompt_token_ids"] = list(prompt.ids) if self.return_token_ids else None
            envelope["prompt_text"] = None
        envelope.update(kv_transfer_params=first.kv_transfer_params, ec_transfer_params=None, metrics=None)
        return web.json_response(envelope)

    def _completion_choice(self, c: Choice) -> dict[str, Any]:
        assert c.finish is not None
        ids, entries, text = self._echoed(c, c.token_ids, c.entries, "".join(c.texts))
        logprobs = None
        if self.sampling.num_logprobs is not None:
            logprobs = completion_logprobs(ids, entries, self.token_str)
        p = c.prompt
        return {
            "index": c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish.reason,
            "stop_reason": c.finish.stop_reason,
            "token_ids": list(c.token_ids) if self.return_token_ids else None,
            "prompt_logprobs": prompt_logprobs_json(p.entries, self.token_str) if p.entries is not None else None,
            "prompt_token_ids": list(p.ids) if self.return_token_ids else None,
            "routed_experts": None,
        }

    def _echoed(
        self, c: Choice, ids: list[int], entries: list[list[LogprobEntry] | None], text: str
    ) -> tuple[list[int], list[list[LogprobEntry] | None], str]:
        """Completions' echo: the prompt (ids, logprobs, text) before the output; only it when max_tokens=0."""
        if not self.sampling.echo:
            return ids, entries, text
        p = c.prompt
        prompt_entries = p.entries if p.entries is not None else [None] * len(p.ids)
        if self.requested == 0:
            return list(p.ids), list(prompt_entries), p.text
        return [*p.ids, *ids], [*prompt_entries, *entries], p.text + text

    def _chat_choice(self, c: Choice) -> dict[str, Any]:
        assert c.finish is not None
        logprobs = None
        if self.sampling.num_logprobs is not None:
            logprobs = chat_logprobs(c.token_ids, c.entries, self.token_str, self.sampling.num_logprobs)
        return {
            "index": c.index,
            "message": {
                "role": "assistant",
                "content": "".join(c.texts),
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": logprobs,
            "finish_reason": c.finish.reason,
            "stop_reason": c.finish.stop_reason,
            "token_ids": list(c.token_ids) if self.return_token_ids else None,
            "routed_experts": None,
        }

    # ----------------------------------------------------------------------------------- stream
    async def _stream(self, request: web.Request) -> web.StreamResponse:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        merged: asyncio.Queue[tuple[Choice, TokenEvent | FinishEvent]] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            while True:
                ev = await c.req.events.get()
                merged.put_nowait((c, ev))
                if isinstance(ev, FinishEvent):
                    return

        def chunk(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": self.rid,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [choice] if choice is not None else [],
            }
            if usage is not None:
                out["usage"] = usage
            return out

        def usage_of(c: Choice) -> dict[str, int] | None:
            if not self.opts["continuous_usage"]:
                return None
            n_prompt, n_out = len(c.prompt.ids), len(c.token_ids)
            return {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out}

        pumps = [asyncio.create_task(pump(c)) for c in self.choices]
        failed = False
        try:
            remaining = len(self.choices)
            started = False
            while remaining:
                c, ev = await merged.get()
                if self.chat and not started:  # vLLM sends the role chunks with the first engine output
                    started = True
                    for r in self.choices:
                        role = {"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                        first_chunk = chunk({**role, "finish_reason": None}, usage_of(r))
                        if self.return_token_ids:  # vLLM: the prompt's ids ride on the role chunk only
                            first_chunk["prompt_token_ids"] = list(r.prompt.ids)
                        await resp.write(sse(first_chunk))
                token = ev if isinstance(ev, TokenEvent) else ev.last_token
                finish = ev if isinstance(ev, FinishEvent) else None
                if finish is not None:
                    remaining -= 1
                    c.finish = finish
                    if finish.reason == "error":
                        await resp.write(sse(internal_error().body()))
                        failed = True
                        break
                if token is not None:
                    c.add(token)
                await resp.write(sse(chunk(self._stream_choice(c, token, finish), usage_of(c))))
            if not failed and self.opts["include_usage"]:
                await resp.write(sse(chunk(None, self._usage())))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            for c in self.choices:
                self.engine.abort(c.req)
            raise
        finally:
            for t in pumps:
                t.cancel()
        if failed:
            for c in self.choices:
                self.engine.abort(c.req)
        return resp

    def _stream_choice(self, c: Choice, token: TokenEvent | None, finish: FinishEvent | None) -> dict[str, Any]:
        ids = [token.token_id] if token is not None else []
        entries: list[list[LogprobEntry] | None] = [token.logprobs] if token is not None else []
        text = token.text if token is not None else ""
        reason = finish.reason if finish is not None else None
        stop_reason = finish.stop_reason if finish is not None else None
        if self.chat:
            logprobs = None
            if self.sampling.num_logprobs is not None:
                logprobs = chat_logprobs(ids, entries, self.token_str, self.sampling.num_logprobs)
            choice: dict[str, Any] = {
                "index": c.index,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
            if finish is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = ids if self.return_token_ids else None
            return choice
        offset = c.text_len
        c.text_len += len(text)
        prompt_ids = None
        if not c.echoed:
            c.echoed = True
            ids, entries, text = self._echoed(c, ids, entries, text)
            if self.return_token_ids:  # vLLM: the prompt's ids ride on each choice's first chunk only
                prompt_ids = list(c.prompt.ids)
        logprobs = None
        if self.sampling.num_logprobs is not None:
            logprobs = completion_logprobs(ids, entries, self.token_str, offset)
        return {
            "index": c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": reason,
            "stop_reason": stop_reason,
            "prompt_token_ids": prompt_ids,
            "token_ids": ids if self.return_token_ids else None,
        }
