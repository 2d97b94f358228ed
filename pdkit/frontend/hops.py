"""The hop/retry machine of the frontend: one request's prefill and decode hops to the workers, and what
happens when one fails (docs/frontend.md, "Failure rules").

Why a module of its own: :mod:`pdkit.frontend.server` owns the process (HTTP routes, the registry,
admission, shutdown); this owns what a request does once admission granted it its worker slots -- the
prefill hop with its retries and timeout, the decode hop with its first-byte deadline, the retry to
another worker (or to a local prefill when the KV may be gone), and the relay of an upstream stream.
:class:`Hops` is a base class of :class:`~pdkit.frontend.server.Frontend`: the hops take and give back
slots through the frontend's own slot bookkeeping (``_candidates``, ``_hold``, ``_release``), which stays
with admission in server.py so a slot is counted in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from pdkit.frontend.metrics import FrontendMetrics
from pdkit.frontend.requests import RequestError, error_obj
from pdkit.frontend.settings import FrontendSettings
from pdkit.routing.types import Policy, RequestContext, WorkerState

log = logging.getLogger("pdkit.frontend")

# What the prefill hop adds: vLLM's NixlConnector reads these keys on the producer side.
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
JSON_TYPE = "application/json"
FIRST_BYTE_TIMEOUT = "first_byte_timeout"  # HopFailed reason of a decode hop past decode_first_byte_timeout_s
_T = TypeVar("_T")


class HopFailed(Exception):
    """A hop failed in a way another worker may fix.  ``reached`` = the engine may have started it
    (so a decode worker may have consumed the prefill's KV lease)."""

    def __init__(self, reason: str, reached: bool, status: int | None = None, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reached = reached
        self.status = status
        self.body = body


class StopCut(Exception):
    """Set on an upstream stream's reader when the stop grace ran out: the relay ends it with an error event."""


class Passthrough(Exception):
    """An engine's client error (4xx): relayed to the client as is, never retried."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


@dataclass(eq=False)
class HeldRoute:
    """What admission granted one request: the held slots (each released once, when its hop is over).

    ``worker``: the decode (or agg) worker, held from admission to the last byte; ``prefill``: the prefill
    worker of a disaggregated request, held until its prefill hop ends (None: prefill on the decode worker).
    """

    mode: str
    ctx: RequestContext
    worker: WorkerState | None
    prefill: WorkerState | None = None


@dataclass(eq=False)
class Relay:
    """One stream being relayed, so that :meth:`Frontend.stop` can cut it with an error event."""

    resp: aiohttp.ClientResponse
    cut: bool = False


async def with_timeout(coro: Coroutine[Any, Any, _T], timeout_s: float) -> _T:
    """``asyncio.timeout`` where available: Python 3.11's ``wait_for`` can swallow a cancellation (the
    client's disconnect) that races with the hop finishing, and the decode hop would then still run."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout=timeout_s)  # pragma: no cover - Python 3.10


def sse_error_payload(chunk: bytes) -> bytes:
    line = chunk.split(b"\n", 1)[0]
    return line[len(b"data: ") :].strip()


class Hops:
    """Prefill and decode hops with their retries (a base class of the Frontend; see the module docstring)."""

    s: FrontendSettings
    metrics: FrontendMetrics
    policy: Policy
    _session: aiohttp.ClientSession | None
    _relays: set[Relay]

    # Slot bookkeeping, defined by the Frontend next to admission (one place counts a worker's slots).
    def _candidates(
        self, ctx: RequestContext, role: str, exclude: set[str] | tuple[()]
    ) -> tuple[list[WorkerState], int]:
        raise NotImplementedError

    def _hold(self, w: WorkerState) -> WorkerState:
        raise NotImplementedError

    def _release(self, w: WorkerState, ctx: RequestContext) -> None:
        raise NotImplementedError

    def _still_usable(self, w: WorkerState) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- prefill

    async def _prefill(self, ctx: RequestContext, route: HeldRoute) -> dict[str, Any] | None:
        """kv_transfer_params from a prefill worker, or None = prefill locally on the decode worker."""
        body = dict(ctx.body)
        body["max_tokens"] = 1
        body["min_tokens"] = 1
        if ctx.is_chat:
            body["max_completion_tokens"] = 1
        body["stream"] = False
        body.pop("stream_options", None)
        body["kv_transfer_params"] = PREFILL_KV_PARAMS
        got = await self._prefill_answer(ctx, route, body, need_params=True)
        return None if got is None else got[0]["kv_transfer_params"]

    async def _prefill_answer(
        self, ctx: RequestContext, route: HeldRoute, body: dict[str, Any], *, need_params: bool
    ) -> tuple[dict[str, Any], WorkerState] | None:
        """(the prefill's whole JSON answer, the worker that gave it), or None = prefill locally.

        The first attempt runs on the prefill worker admission held; a retry takes a free slot on another
        one or, with none free, falls back to the local prefill (the decode slot is held already).
        ``need_params``: an answer without ``kv_transfer_params`` is a failed hop (the unseeded path
        needs them; a seeded answer whose first token ends the request does not)."""
        assert self._session is not None
        reason = "no_prefill_worker"
        if route.prefill is None:
            self.metrics.fallbacks.labels(reason).inc()
            return None
        payload = msgspec.json.encode(body)
        tried: set[str] = set()
        for attempt in range(self.s.max_prefill_attempts):
            if attempt == 0:
                w = route.prefill
            else:
                usable, _ = self._candidates(ctx, "prefill", tried)
                if not usable:
                    break
                self.metrics.retries.labels("prefill", reason).inc()
                w = route.prefill = self._hold(self.policy.choose("prefill", usable, ctx))
            tried.add(w.worker_id)
            t0 = time.perf_counter()
            try:
                answer = await with_timeout(self._prefill_hop(w, ctx, payload, need_params), self.s.prefill_timeout_s)
            except asyncio.TimeoutError:
                reason = "timeout"
                log.warning("prefill on %s timed out after %g s", w.worker_id, self.s.prefill_timeout_s)
                continue
            except HopFailed as exc:
                reason = exc.reason
                log.warning("prefill on %s failed: %s", w.worker_id, exc.reason)
                continue
            finally:
                route.prefill = None
                self._release(w, ctx)
            self.metrics.prefill_hop.observe(time.perf_counter() - t0)
            return answer, w
        self.metrics.fallbacks.labels(reason).inc()
        return None

    async def _post(self, url: str, payload: bytes, headers: Any) -> aiohttp.ClientResponse:
        """POST upstream; once more on a fresh connection if a pooled one turns out closed.

        A keep-alive connection the server closed while idle fails with ServerDisconnectedError before
        the server has read the request, so repeating it is safe; without this, the first request
        after an idle pause could fail (seen on 2xH200 as a 502).
        """
        assert self._session is not None
        try:
            return await self._session.post(url, data=payload, headers=headers)
        except aiohttp.ServerDisconnectedError:
            self.metrics.retries.labels("upstream", "stale_connection").inc()
            return await self._session.post(url, data=payload, headers=headers)

    async def _prefill_hop(
        self, w: WorkerState, ctx: RequestContext, payload: bytes, need_params: bool = True
    ) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with await self._post(w.url + ctx.path, payload, ctx.headers) as resp:
                data = await resp.read()
                if 400 <= resp.status < 500:
                    raise Passthrough(resp.status, data, resp.headers.get("Content-Type", JSON_TYPE))
                if resp.status != 200:
                    raise HopFailed(f"status_{resp.status}", True, resp.status, data)
        except (aiohttp.ClientError, OSError) as exc:
            reason = "connect_error" if isinstance(exc, aiohttp.ClientConnectorError) else "io_error"
            log.warning("prefill hop to %s: %s: %s", w.worker_id, type(exc).__name__, exc)
            raise HopFailed(reason, False) from None
        try:
            answer = msgspec.json.decode(data)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise HopFailed("bad_answer", True)
        if need_params and not isinstance(answer.get("kv_transfer_params"), dict):
            raise HopFailed("no_kv_transfer_params", True)
        return answer

    # ----------------------------------------------------------------------------------- decode

    async def _decode(
        self,
        request: web.Request,
        ctx: RequestContext,
        role: str,
        params: dict[str, Any] | None,
        mode: str,
        t0: float,
        route: HeldRoute,
    ) -> tuple[web.StreamResponse, str]:
        """The decode (or only) hop, with the client's body (+ the prefill's params), and its retries."""

        def attempt(w: WorkerState, p: dict[str, Any] | None) -> Awaitable[tuple[web.StreamResponse, str]]:
            if p is None:
                payload = ctx.raw  # one hop: the client's bytes, untouched
            else:
                payload = msgspec.json.encode({**ctx.body, "kv_transfer_params": p})
            return self._decode_hop(request, w, ctx, payload, mode, t0)

        return await self._decode_attempts(ctx, role, params, route, attempt)

    async def _decode_attempts(
        self,
        ctx: RequestContext,
        role: str,
        params: dict[str, Any] | None,
        route: HeldRoute,
        attempt: Callable[[WorkerState, dict[str, Any] | None], Awaitable[_T]],
    ) -> _T:
        """Run ``attempt(worker, params)``, first on the worker admission held (``route.worker``).

        ``attempt`` raises :class:`HopFailed` when the hop failed before anything reached the client.
        A failed attempt moves on to another worker of the role with a free slot (taken before the held
        one is given back, so the cap holds and no waiter can take it in between).  When the failure
        came after the worker had the request *with* the prefill's KV (a failed or expired transfer, a
        reset connection) the next attempt prefills locally (``params`` None), and when no other worker
        is left -- the common 1P1D case -- the same worker gets one more try that way, instead of the
        client getting a 502 for a transient transfer problem.  A worker that did not send its first byte
        in time is not tried again.
        """
        tried: set[str] = set()
        last: HopFailed | None = None
        again = False  # the held worker may be retried with a local prefill
        for n in range(self.s.max_decode_attempts):
            held = route.worker
            assert held is not None
            if n:
                usable, _ = self._candidates(ctx, role, tried)
                if usable:
                    ctx.remote_kv = params is not None
                    w = self._hold(self.policy.choose(role, usable, ctx))
                    route.worker = w
                    self._release(held, ctx)
                    held = w
                elif not (again and self._still_usable(held)):
                    break
                assert last is not None
                self.metrics.retries.labels(role, last.reason).inc()
            again = False
            tried.add(held.worker_id)
            try:
                return await attempt(held, params)
            except HopFailed as exc:
                log.warning("%s hop on %s failed before the first byte: %s", role, held.worker_id, exc.reason)
                last = exc
                if exc.reached and params is not None:
                    # The failed decode may have read (and released) the prefill's blocks: prefill locally.
                    params = None
                    again = exc.reason != FIRST_BYTE_TIMEOUT
                    self.metrics.fallbacks.labels(f"decode_{exc.reason}").inc()
        assert last is not None
        if last.status is not None and last.body:
            raise Passthrough(last.status, last.body, JSON_TYPE)
        raise RequestError(502, f"every {role} worker tried failed ({last.reason}); see the frontend log")

    async def _decode_hop(
        self, request: web.Request, w: WorkerState, ctx: RequestContext, payload: bytes, mode: str, t0: float
    ) -> tuple[web.StreamResponse, str]:
        """One hop to ``w`` (whose slot the caller holds).  A streamed hop must deliver its first byte
        within ``decode_first_byte_timeout_s`` (a hung engine is a failed hop, retried elsewhere); a
        non-streamed answer only comes whole at the end, so it has no such deadline."""
        stream = bool(ctx.body.get("stream"))
        hop0 = time.perf_counter()
        opened: list[aiohttp.ClientResponse] = []
        try:
            if stream:
                try:
                    first = await with_timeout(
                        self._open_hop(w, ctx, payload, stream, opened), self.s.decode_first_byte_timeout_s
                    )
                except asyncio.TimeoutError:
                    log.warning(
                        "decode hop to %s sent no first byte within %g s (decode_first_byte_timeout_s)",
                        w.worker_id, self.s.decode_first_byte_timeout_s,
                    )  # fmt: skip
                    raise HopFailed(FIRST_BYTE_TIMEOUT, True) from None
            else:
                first = await self._open_hop(w, ctx, payload, stream, opened)
            if isinstance(first, web.Response):
                self.metrics.decode_hop.labels(mode).observe(time.perf_counter() - hop0)
                return first, str(first.status)
            return await self._relay_stream(request, opened[0], first, mode, t0, hop0, ctx)
        finally:
            for resp in opened:
                resp.close()

    async def _open_hop(
        self,
        w: WorkerState,
        ctx: RequestContext,
        payload: bytes,
        stream: bool,
        opened: list[aiohttp.ClientResponse],
        path: str | None = None,
    ) -> bytes | web.Response:
        """Send the hop (to ``path``, default the client's); the whole answer (not streamed, or an
        error) or the stream's first bytes."""
        try:
            resp = await self._post(w.url + (path or ctx.path), payload, ctx.headers)
            opened.append(resp)
            if resp.status >= 500:
                raise HopFailed(f"status_{resp.status}", True, resp.status, await resp.read())
            if resp.status != 200 or not stream:
                data = await resp.read()
                out = web.Response(status=resp.status, body=data, headers={"Content-Type": resp.headers.get(
                    "Content-Type", JSON_TYPE)})  # fmt: skip
                out.headers["X-Request-Id"] = ctx.request_id
                return out
            first = await resp.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            reached = not isinstance(exc, aiohttp.ClientConnectorError)
            log.warning("decode hop to %s: %s: %s", w.worker_id, type(exc).__name__, exc)
            raise HopFailed("connect_error" if not reached else "io_error", reached) from None
        if not first:
            raise HopFailed("empty_stream", True)
        if first.startswith(b'data: {"error"'):
            # vLLM sends headers before the first token, so a failed KV load arrives as an error event
            # in a 200 stream; nothing has reached the client yet, so another worker can still serve it.
            raise HopFailed("stream_error_event", True, 500, sse_error_payload(first))
        return first

    async def _relay_stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        first: bytes,
        mode: str,
        t0: float,
        hop0: float,
        ctx: RequestContext,
    ) -> tuple[web.StreamResponse, str]:
        out = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": ctx.request_id},
        )
        await out.prepare(request)
        await out.write(first)
        now = time.perf_counter()
        self.metrics.ttft.labels(mode).observe(now - t0)
        itl = self.metrics.itl.labels(mode)
        status = "200"
        last = now
        relay = Relay(resp)
        self._relays.add(relay)
        try:
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                now = time.perf_counter()
                itl.observe(now - last)
                last = now
                await out.write(chunk)
        except StopCut:
            status = "shutdown_cut"
            self.metrics.stream_errors.inc()
            msg = error_obj(503, "the frontend is shutting down and its stop grace ran out; the stream was cut")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(b"data: " + msgspec.json.encode(msg) + b"\n\ndata: [DONE]\n\n")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError) and request.transport is None:
                raise asyncio.CancelledError from None  # the client left; resp.close() aborts upstream
            status = "stream_error"
            self.metrics.stream_errors.inc()
            log.warning("upstream stream broke after the first byte: %r", exc)
            msg = error_obj(502, f"the worker's stream broke after the first byte ({type(exc).__name__})")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(b"data: " + msgspec.json.encode(msg) + b"\n\ndata: [DONE]\n\n")
        finally:
            self._relays.discard(relay)
        self.metrics.decode_hop.labels(mode).observe(time.perf_counter() - hop0)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out, status
