"""The three workloads of issue 8, on one pooled aiohttp session.

* ``sweep``: Poisson arrivals at each rate of a list, for each fixed (input, output) shape.  Output
  length is pinned with ``max_tokens`` + ``ignore_eos`` (vLLM honours both; the simulator never emits EOS),
  so every deployment generates the same tokens.
* ``multiturn``: sessions arrive by Poisson; all share one system prefix; each turn appends the previous
  answer and a new user message, so turn k re-sends turn k-1's prompt as its prefix (prefix cache /
  LMCache / KV-aware routing territory).  Turns of a session are sequential, with a think time.
* ``repeat``: distinct long prefixes are sent once (cold), then again (warm), one at a time by default,
  so TTFT shows what LMCache saves when vLLM's own prefix cache is off.

Every point is bounded: at most ``num_requests`` requests, issued within ``max_duration_s``; each request
has a total timeout, and whatever still runs at ``max_duration_s + timeout_s`` is cancelled and counted
as failed (``cancelled``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp

from pdkit.bench.client import RequestRecord, send_streaming
from pdkit.bench.progress import Progress
from pdkit.bench.prompts import PromptFactory

T = TypeVar("T")

Api = Literal["completions", "chat"]


@dataclass
class RequestSpec:
    """One request to send: body without ``model``/``stream``, plus what the benchmark expects of it."""

    request_id: str
    payload: dict[str, Any]
    expected_prompt_tokens: int | None
    expected_output_tokens: int
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunnerSettings:
    endpoint: str
    model: str
    api: Api = "completions"
    timeout_s: float = 600.0
    max_concurrency: int | None = None
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


class Runner:
    """Sends specs against one endpoint; owns the arrival process and the time bounds."""

    def __init__(
        self, settings: RunnerSettings, session: aiohttp.ClientSession, prompts: PromptFactory, seed: int
    ) -> None:
        self.s = settings
        self.session = session
        self.prompts = prompts
        self.rng = random.Random(seed)
        self._n = 0

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.s.api == "chat" else "/v1/completions"
        return self.s.endpoint.rstrip("/") + path

    def next_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def body(self, payload: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.s.model, **payload, "max_tokens": max_tokens, "temperature": 0.0}
        if self.s.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.s.extra_body)
        return body

    # ---------------------------------------------------------------------------------- prompts

    def fixed_spec(self, input_len: int, output_len: int, tags: dict[str, Any], prefix: str = "") -> RequestSpec:
        """A request of exactly ``input_len`` prompt tokens (as the server counts them)."""
        if self.s.api == "chat":
            msg = self.prompts.chat_user_message(input_len, prefix=prefix)
            payload: dict[str, Any] = {"messages": [msg]}
            expected = self.prompts.chat_len([msg])
        else:
            payload = {"prompt": self.prompts.completion_prompt(input_len, prefix)}
            expected = input_len
        return RequestSpec(self.next_id("bench"), payload, expected, output_len, tags)

    # --------------------------------------------------------------------------------- sending

    async def _send(self, spec: RequestSpec, t0: float, out: list[RequestRecord], prog: Progress) -> RequestRecord:
        rec = RequestRecord(
            spec.request_id,
            expected_prompt_tokens=spec.expected_prompt_tokens,
            expected_output_tokens=spec.expected_output_tokens,
            tags=dict(spec.tags),
        )
        try:
            await send_streaming(
                self.session, self.url, self.body(spec.payload, spec.expected_output_tokens), rec, self.s.timeout_s, t0
            )
        except asyncio.CancelledError:
            rec.error = "cancelled"
            rec.error_detail = "still running at the point's time limit"
            out.append(rec)
            prog.advance(ok=False)
            raise
        out.append(rec)
        prog.advance(ok=rec.ok)
        return rec

    async def _paced(self, items: Iterable[T], rate: float, t0: float, max_duration_s: float) -> AsyncIterator[T]:
        """Yield ``items`` at Poisson arrival times (``rate`` req/s from ``t0``; ``inf``: all at once) until
        ``max_duration_s``.  The one arrival process of run_arrivals and run_sessions: the same seed gives
        the same schedule in both (one exponential draw after each yielded item)."""
        arrival = 0.0
        for item in items:
            if time.perf_counter() - t0 >= max_duration_s:
                return
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            yield item
            if math.isfinite(rate) and rate > 0:
                arrival += self.rng.expovariate(rate)

    async def run_arrivals(
        self,
        specs: list[RequestSpec],
        rate: float,
        max_duration_s: float,
        title: str,
    ) -> tuple[list[RequestRecord], dict[str, Any]]:
        """Send ``specs`` with Poisson inter-arrival times at ``rate`` req/s (``inf``: all at once)."""
        sem = asyncio.Semaphore(self.s.max_concurrency) if self.s.max_concurrency else None
        out: list[RequestRecord] = []
        tasks: list[asyncio.Task[Any]] = []
        with Progress(title, len(specs), self.s.progress) as prog:
            t0 = time.perf_counter()

            async def guarded(spec: RequestSpec) -> None:
                if sem is None:
                    await self._send(spec, t0, out, prog)
                    return
                async with sem:
                    await self._send(spec, t0, out, prog)

            async for spec in self._paced(specs, rate, t0, max_duration_s):
                tasks.append(asyncio.create_task(guarded(spec)))
            issue_s = time.perf_counter() - t0
            await _bounded_wait(tasks, t0 + max_duration_s + self.s.timeout_s)
        info = {"issued": len(tasks), "not_sent": len(specs) - len(tasks), "issue_window_s": issue_s}
        return out, info

    async def run_sessions(
        self,
        sessions: list[Callable[[list[RequestRecord], Progress, float], Coroutine[Any, Any, None]]],
        rate: float,
        max_duration_s: float,
        title: str,
        total: int,
    ) -> tuple[list[RequestRecord], dict[str, Any]]:
        """Start session coroutines with Poisson inter-arrival times; same bounds as run_arrivals."""
        out: list[RequestRecord] = []
        tasks: list[asyncio.Task[Any]] = []
        with Progress(title, total, self.s.progress) as prog:
            t0 = time.perf_counter()
            async for sess in self._paced(sessions, rate, t0, max_duration_s):
                tasks.append(asyncio.create_task(sess(out, prog, t0)))
            await _bounded_wait(tasks, t0 + max_duration_s + self.s.timeout_s)
        return out, {"sessions_started": len(tasks), "sessions_not_started": len(sessions) - len(tasks)}

    # ------------------------------------------------------------------------------ multi-turn

    def conversation(
        self,
        sid: int,
        system_text: str,
        turns: int,
        user_len: int,
        output_len: int,
        think_time_s: float,
        stop_at: float,
    ) -> Callable[[list[RequestRecord], Progress, float], Coroutine[Any, Any, None]]:
        """One multi-turn conversation: turn k's prompt = turn k-1's prompt + its answer + a new user turn."""

        async def run(out: list[RequestRecord], prog: Progress, t0: float) -> None:
            history: list[dict[str, Any]] = [{"role": "system", "content": system_text}]
            prompt = system_text
            for turn in range(turns):
                if turn and time.perf_counter() >= stop_at:
                    return
                if self.s.api == "chat":
                    user = self.prompts.chat_user_message(self.prompts.chat_len(history) + user_len, history)
                    messages = [*history, user]
                    payload: dict[str, Any] = {"messages": messages}
                    expected = self.prompts.chat_len(messages)
                else:
                    prompt = prompt + "\n" + self.prompts.random_text(user_len)
                    payload = {"prompt": prompt}
                    expected = self.prompts.completion_len(prompt)
                spec = RequestSpec(
                    self.next_id(f"s{sid}"), payload, expected, output_len, {"session": sid, "turn": turn}
                )
                rec = await self._send(spec, t0, out, prog)
                if not rec.ok:
                    return  # a broken conversation ends; the remaining turns are not sent
                if self.s.api == "chat":
                    history = [*messages, {"role": "assistant", "content": rec.text}]
                else:
                    prompt = prompt + rec.text
                if think_time_s > 0 and turn + 1 < turns:
                    await asyncio.sleep(think_time_s)

        return run


async def _bounded_wait(tasks: list[asyncio.Task[Any]], deadline: float) -> None:
    """Wait for ``tasks`` until ``deadline`` (perf_counter); cancel the rest (they record themselves)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
