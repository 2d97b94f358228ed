"""The disaggregated path of the frontend with first-token seeding (docs/seeding.md, "Wiring").

Why a module of its own: seeding changes what a P/D request looks like to the client -- the prefill's
token goes out at once, the decode gets prompt + that token, a non-streamed answer is the two hops joined,
a decode that fails after the first token must continue in the same stream -- while the hops themselves
(timeouts, retries, relays) are :mod:`pdkit.frontend.hops`'s.  :mod:`pdkit.frontend.seeding` holds the
pure request/response shaping; this holds the I/O around it.  :class:`SeededPath` is a base class of
:class:`~pdkit.frontend.server.Frontend` (it decides per request between this path and the unseeded one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pdkit.frontend import seeding
from pdkit.frontend.hops import (
    FIRST_BYTE_TIMEOUT,
    JSON_TYPE,
    PREFILL_KV_PARAMS,
    HeldRoute,
    HopFailed,
    Hops,
    Passthrough,
    Relay,
    StopCut,
    with_timeout,
)
from pdkit.frontend.requests import RequestError, error_obj
from pdkit.routing.types import RequestContext, WorkerState
from pdkit.stack import seeds_by_default, stack_for

log = logging.getLogger("pdkit.frontend")

SEED_HEADER = "X-Pdkit-Seed"  # "off": this request takes the unseeded P/D path (debugging, A/B benchmarks)
SSE_DONE = b"data: [DONE]\n\n"


def error_event(status: int, body: bytes) -> bytes:
    """An engine's error answer as one SSE error event (its own ``{"error": ...}`` when it sent one)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        obj = None
    if not (isinstance(obj, dict) and "error" in obj):
        obj = error_obj(status, f"the decode worker answered {status}; see the frontend log")
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


class SeededPath(Hops):
    """P→D with or without seeding (a base class of the Frontend; see the module docstring)."""

    _kv_releases: set[asyncio.Task[None]]

    def _max_model_len(self, ctx: RequestContext) -> int | None:
        raise NotImplementedError

    # --------------------------------------------------------------------------- disagg (seeded)

    async def _disagg(
        self, request: web.Request, ctx: RequestContext, route: HeldRoute, t0: float
    ) -> tuple[web.StreamResponse, str]:
        """Prefill → decode; seeded with the prefill's first token unless seeding is off or refused."""
        if self._seeding_on(route.worker):
            refusal = self._seed_refusal(request, ctx)
            if refusal is None:
                return await self._seeded(request, ctx, route, t0)
            self.metrics.seeded_hops.labels("refused").inc()
            log.debug("request %s not seeded: %s", ctx.request_id, refusal)
        params = await self._prefill(ctx, route)
        return await self._decode(request, ctx, "decode", params, "disagg", t0, route)

    def _seeding_on(self, decode: WorkerState | None) -> bool:
        """``seed_first_token`` when set; unset, seed where it is proven for the decode worker's engine: the
        simulator always, vLLM when its registered release is one with ``Stack.seeding_proven`` (seeding
        relies on that release's NIXL decode side; an unknown or unreadable version is not proven)."""
        if self.s.seed_first_token is not None:
            return self.s.seed_first_token
        return decode is not None and seeds_by_default(decode.info.engine, decode.info.engine_version)

    @staticmethod
    def _seed_refusal(request: web.Request, ctx: RequestContext) -> str | None:
        """Why this request takes the unseeded path (None: seed it).  ``X-Pdkit-Seed: off`` is a
        debugging aid (A/B on one deployment, scripts/gpu_bench_seeding.py) that affects only its own
        request, so it needs no secret: it cannot change how any other request is routed."""
        if request.headers.get(SEED_HEADER, "").strip().lower() in ("off", "0", "false", "no"):
            return f"{SEED_HEADER}: off"
        return seeding.seed_refusal(ctx.path, ctx.body)

    async def _seeded(
        self, request: web.Request, ctx: RequestContext, route: HeldRoute, t0: float
    ) -> tuple[web.StreamResponse, str]:
        """The seeded P/D path (docs/seeding.md, "Wiring"): the client sees the prefill's token at once,
        the decode gets prompt + that token and generates the rest.  Until something reached the client
        every problem falls back to the unseeded path, which then runs exactly as without seeding."""
        body = seeding.prefill_body(ctx.path, ctx.body, PREFILL_KV_PARAMS)
        got = await self._prefill_answer(ctx, route, body, need_params=False)
        if got is None:  # no prefill worker answered: the decode worker prefills locally, unseeded
            self.metrics.seeded_hops.labels("fallback").inc()
            return await self._decode(request, ctx, "decode", None, "disagg", t0, route)
        answer, prefill_worker = got
        params = answer.get("kv_transfer_params")
        params = params if isinstance(params, dict) else None
        assert route.worker is not None
        max_len = route.worker.info.max_model_len or self._max_model_len(ctx)
        try:
            first = seeding.first_token_from_prefill(ctx.path, answer)
            if seeding.ends_request(ctx.path, ctx.body, first, max_len):
                self.metrics.seeded_hops.labels("ended_at_prefill").inc()
                self._release_prefill_kv(route.worker, ctx, first)
                return await self._single_token(request, ctx, first, t0)
            dpath, dbody = seeding.seeded_decode_body(
                ctx.path,
                ctx.body,
                first,
                block_size=prefill_worker.info.block_size,
                max_model_len=max_len,
                nixl_mode=prefill_worker.info.nixl_mode,
            )
        except seeding.SeedingError as exc:
            log.warning("request %s: not seeded after its prefill (%s); decoding unseeded", ctx.request_id, exc)
            self.metrics.seeded_hops.labels("fallback").inc()
            return await self._decode(request, ctx, "decode", params, "disagg", t0, route)
        self.metrics.seeded_hops.labels("seeded").inc()
        if ctx.body.get("stream"):
            return await self._seeded_stream(request, ctx, route, first, dpath, dbody, t0)
        return await self._seeded_json(ctx, route, first, dpath, dbody)

    def _release_prefill_kv(self, decode: WorkerState, ctx: RequestContext, first: seeding.FirstToken) -> None:
        """Free the prefill's KV lease when the first token ended the request (``seeding.release_request``).

        Fire and forget: the client's answer does not wait for it, and a failure only means the prefill
        keeps the blocks until its lease (``kv_lease_duration``) runs out, as it would without this."""
        got = seeding.release_request(first)
        if got is None or self._session is None:
            return
        path, body = got
        url, payload, headers = decode.url + path, msgspec.json.encode(body), ctx.headers

        async def send() -> None:
            try:
                async with await self._post(url, payload, headers) as resp:
                    await resp.read()  # vLLM answers 404 (unknown model) after freeing; nothing to check
            except (aiohttp.ClientError, OSError) as exc:
                log.info("request %s: KV release at %s failed (%s); the prefill's lease frees it",
                         ctx.request_id, decode.worker_id, exc)  # fmt: skip

        task = asyncio.create_task(send())
        self._kv_releases.add(task)
        task.add_done_callback(self._kv_releases.discard)

    @staticmethod
    def _earliest_stop(w: WorkerState) -> bool:
        """The decode's vLLM rule for several stop strings in one chunk (``Stack.stop_string_earliest_end``)."""
        try:
            return stack_for(w.info.engine_version).stop_string_earliest_end
        except ValueError:  # a version string pdkit cannot read: the newest release's rule
            return stack_for(None).stop_string_earliest_end

    async def _single_token(
        self, request: web.Request, ctx: RequestContext, first: seeding.FirstToken, t0: float
    ) -> tuple[web.StreamResponse, str]:
        """The whole answer when the prefill's token ends the request (EOS, stop, max_tokens=1): no decode hop."""
        if not ctx.body.get("stream"):
            data = msgspec.json.encode(seeding.single_token_answer(ctx.path, ctx.body, first))
            return web.Response(body=data, content_type=JSON_TYPE, headers={"X-Request-Id": ctx.request_id}), "200"
        out = await self._open_client_stream(request, ctx)
        await out.write(seeding.single_token_stream(ctx.path, ctx.body, first))
        self.metrics.ttft.labels("disagg").observe(time.perf_counter() - t0)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out, "200"

    @staticmethod
    def _seeded_payload(dbody: dict[str, Any], params: dict[str, Any] | None) -> bytes:
        """The seeded decode body; without params the decode prefills prompt + first token itself."""
        body = {k: v for k, v in dbody.items() if k != "kv_transfer_params"}
        if params is not None:
            body["kv_transfer_params"] = params
        return msgspec.json.encode(body)

    async def _seeded_json(
        self, ctx: RequestContext, route: HeldRoute, first: seeding.FirstToken, dpath: str, dbody: dict[str, Any]
    ) -> tuple[web.StreamResponse, str]:
        """Non-streamed: the decode's answer merged behind the prefill's token (usage counts each token once)."""
        hop0 = time.perf_counter()

        async def attempt(w: WorkerState, params: dict[str, Any] | None) -> web.Response:
            opened: list[aiohttp.ClientResponse] = []
            try:
                got = await self._open_hop(w, ctx, self._seeded_payload(dbody, params), False, opened, path=dpath)
            finally:
                for resp in opened:
                    resp.close()
            assert isinstance(got, web.Response)
            return got

        resp = await self._decode_attempts(ctx, "decode", dbody.get("kv_transfer_params"), route, attempt)
        self.metrics.decode_hop.labels("disagg").observe(time.perf_counter() - hop0)
        if resp.status != 200:
            return resp, str(resp.status)
        assert isinstance(resp.body, bytes)
        try:
            merged = seeding.merge_non_streamed(ctx.path, ctx.body, first, msgspec.json.decode(resp.body))
        except (seeding.SeedingError, msgspec.DecodeError) as exc:
            log.warning("request %s: the seeded decode's answer is unusable: %s", ctx.request_id, exc)
            raise RequestError(502, "the decode worker's answer could not be read; see the frontend log") from None
        data = msgspec.json.encode(merged)
        return web.Response(body=data, content_type=JSON_TYPE, headers={"X-Request-Id": ctx.request_id}), "200"

    async def _open_client_stream(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        out = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": ctx.request_id},
        )
        await out.prepare(request)
        return out

    async def _seeded_stream(
        self,
        request: web.Request,
        ctx: RequestContext,
        route: HeldRoute,
        first: seeding.FirstToken,
        dpath: str,
        dbody: dict[str, Any],
        t0: float,
    ) -> tuple[web.StreamResponse, str]:
        """Streamed: the first token goes out now (TTFT), then the decode's continuation in the same stream.

        A decode hop that fails before its first byte is retried by the usual rules with the same seeded
        body (or without the KV params: a local prefill of prompt + first token, so the first token is
        never repeated); once every worker failed, or after decode bytes went out, the stream ends with
        an SSE error event and ``[DONE]``.
        """
        out = await self._open_client_stream(request, ctx)
        assert route.worker is not None
        s = seeding.SeededStream(ctx.path, ctx.body, first, earliest_stop=self._earliest_stop(route.worker))
        await out.write(s.first_chunk())
        self.metrics.ttft.labels("disagg").observe(time.perf_counter() - t0)
        hop0 = time.perf_counter()

        async def attempt(w: WorkerState, params: dict[str, Any] | None) -> str:
            opened: list[aiohttp.ClientResponse] = []
            payload = self._seeded_payload(dbody, params)
            try:
                try:
                    got = await with_timeout(
                        self._open_hop(w, ctx, payload, True, opened, path=dpath), self.s.decode_first_byte_timeout_s
                    )
                except asyncio.TimeoutError:
                    log.warning("seeded decode hop to %s sent no first byte within %g s", w.worker_id,
                                self.s.decode_first_byte_timeout_s)  # fmt: skip
                    raise HopFailed(FIRST_BYTE_TIMEOUT, True) from None
                if isinstance(got, web.Response):  # an engine's 4xx: nothing to retry, the stream is open
                    assert isinstance(got.body, bytes)
                    self.metrics.stream_errors.inc()
                    await self._end_stream_with_error(out, error_event(got.status, got.body))
                    return "stream_error"
                return await self._relay_seeded(request, out, s, opened[0], got)
            finally:
                for resp in opened:
                    resp.close()

        try:
            status = await self._decode_attempts(ctx, "decode", dbody.get("kv_transfer_params"), route, attempt)
        except (Passthrough, RequestError) as exc:
            status = "stream_error"
            self.metrics.stream_errors.inc()
            if isinstance(exc, Passthrough):
                event = error_event(exc.status, exc.body)
            else:
                event = b"data: " + exc.body() + b"\n\n"
            await self._end_stream_with_error(out, event)
        self.metrics.decode_hop.labels("disagg").observe(time.perf_counter() - hop0)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out, status

    async def _end_stream_with_error(self, out: web.StreamResponse, event: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write(event + b"data: [DONE]\n\n")

    async def _relay_seeded(
        self,
        request: web.Request,
        out: web.StreamResponse,
        s: seeding.SeededStream,
        resp: aiohttp.ClientResponse,
        data: bytes,
    ) -> str:
        """Rewrite the decode's SSE bytes into the client's stream until ``s.done`` (a stop string the
        frontend found ends it early: the caller closes the upstream, which vLLM takes as an abort)."""
        itl = self.metrics.itl.labels("disagg")
        last = time.perf_counter()
        status = "200"
        tail = b""
        relay = Relay(resp)
        self._relays.add(relay)
        try:
            while True:
                piece = s.feed(data)
                if piece:
                    now = time.perf_counter()
                    itl.observe(now - last)
                    last = now
                    tail = piece[-len(SSE_DONE) :]
                    await out.write(piece)
                if s.done:
                    break
                data = await resp.content.readany()
                if not data:
                    raise aiohttp.ClientPayloadError("the decode's stream ended before [DONE]")
        except StopCut:
            status = "shutdown_cut"
            self.metrics.stream_errors.inc()
            msg = error_obj(503, "the frontend is shutting down and its stop grace ran out; the stream was cut")
            await self._end_stream_with_error(out, b"data: " + msgspec.json.encode(msg) + b"\n\n")
            return status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError) and request.transport is None:
                raise asyncio.CancelledError from None  # the client left; resp.close() aborts upstream
            self.metrics.stream_errors.inc()
            log.warning("seeded decode stream broke after the first byte: %r", exc)
            msg = error_obj(502, f"the worker's stream broke after the first byte ({type(exc).__name__})")
            await self._end_stream_with_error(out, b"data: " + msgspec.json.encode(msg) + b"\n\n")
            return "stream_error"
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            # a decode chunk of an unexpected shape: the headers went out already, so end the stream cleanly
            self.metrics.stream_errors.inc()
            log.warning("seeded decode sent a chunk the frontend cannot continue from: %r", exc)
            msg = error_obj(502, f"the worker sent an unexpected stream chunk ({type(exc).__name__})")
            await self._end_stream_with_error(out, b"data: " + msgspec.json.encode(msg) + b"\n\n")
            return "stream_error"
        finally:
            self._relays.discard(relay)
        if tail != SSE_DONE:  # an error event from the decode ends the stream; the client still gets [DONE]
            status = "stream_error"
            self.metrics.stream_errors.inc()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(SSE_DONE)
        return status
