"""The frontend process: aiohttp HTTP API + ZMQ registry + P→D orchestration.

Request path (disagg): parse the body once, pick a prefill worker, send it the body with
``max_tokens=1, min_tokens=1, stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``
(NIXL returns params only for a request that ended by its length limit), then send the client's
original body plus the returned params to a decode worker and pass its bytes through (SSE or JSON).
Agg mode, and disagg prompts shorter than ``disagg_min_prompt_tokens``, take one hop.  With a KV-aware
policy a disagg request also takes one hop when a decode worker already caches all but fewer than
``disagg_min_prompt_tokens`` of its prompt tokens (conditional disaggregation, mode ``direct_cached``).

KV routing (docs/kv_routing.md): when ``FrontendSettings.kv_events_enabled`` the frontend owns a
:class:`~pdkit.routing.kv_aware.KvRouting` (SUB socket, index, ``pdkit_kv_*`` metrics) that follows the
registry; its policy is the frontend's policy when ``policy="kv_aware"``.

Failure rules (docs/frontend.md): prefill error/timeout → next prefill worker, then prefill on the
decode worker (no params); decode failure before the first byte → next decode worker (prefilling
locally if the failed one may have consumed the KV lease); failure after the first streamed byte → an
SSE error event and ``[DONE]``; client disconnect → the handler is cancelled (``handler_cancellation``)
and the upstream connection is closed at once, which is how vLLM notices an abort.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from pdkit.frontend.metrics import ActualHits, FrontendMetrics
from pdkit.frontend.policies import KV_AWARE, Policy, RequestContext, make_policy
from pdkit.frontend.registry import Registry, RegistryServer, WorkerState
from pdkit.frontend.requests import RequestError, TokenEstimator, error_body, error_obj, extract_prompt, parse_body
from pdkit.frontend.settings import FrontendSettings

UPSTREAM_KEEPALIVE_S = 4.0

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
_FORWARD_HEADERS = ("Authorization", "traceparent", "tracestate")
_JSON = "application/json"
_T = TypeVar("_T")


class _HopFailed(Exception):
    """A hop failed in a way another worker may fix.  ``reached`` = the engine may have started it
    (so a decode worker may have consumed the prefill's KV lease)."""

    def __init__(self, reason: str, reached: bool, status: int | None = None, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reached = reached
        self.status = status
        self.body = body


class _Passthrough(Exception):
    """An engine's client error (4xx): relayed to the client as is, never retried."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class Frontend:
    """One frontend, in process.  ``await start()`` → (http_port, zmq_port); ``await stop(grace_s)``."""

    def __init__(self, settings: FrontendSettings, policy: Policy | None = None) -> None:
        settings.validate()
        self.s = settings
        self.metrics = FrontendMetrics()
        self.kv: Any = None  # KvRouting when KV events are on (imported lazily: tokenizers, jinja2)
        if settings.kv_events_enabled:
            from pdkit.model_files import default_model_dir
            from pdkit.routing.kv_aware import KvRouting

            self.kv = KvRouting(
                settings.model_dir or default_model_dir(),
                hash_seed=settings.hash_seed,
                registry=self.metrics.registry,
                host=settings.host,
                port=(settings.kv_events_port or 0) if settings.kv_events_shared_sub else None,
                block_size=settings.block_size,
            )
        if policy is None:
            policy = self.kv.policy if settings.policy == KV_AWARE else make_policy(settings.policy)
        self.policy: Policy = policy
        # optional policy hook, called when a hop to a worker ends (KvAwarePolicy releases pending blocks)
        self._hop_done: Callable[[WorkerState, RequestContext], None] | None = getattr(policy, "hop_done", None)
        # optional async policy hook run before routing (KvAwarePolicy tokenizes the prompt off the loop)
        self._prepare: Callable[[RequestContext], Coroutine[Any, Any, None]] | None = getattr(policy, "prepare", None)
        # optional policy hook for conditional disaggregation (KvAwarePolicy knows the decode caches)
        self._local_pick: Callable[..., WorkerState | None] | None = getattr(policy, "local_prefill_worker", None)
        self._kv_closed = False
        self.actual_hits = ActualHits(self.metrics)
        if not settings.token:
            log.warning(
                "no registry token: any local process can register workers (pdkit launch makes one; "
                "pass --token/--token-file or PDKIT_TOKEN; docs/security.md)"
            )
        self.registry = Registry(
            settings.liveness_s,
            on_heartbeat=self.actual_hits.observe,
            max_workers=settings.max_workers,
            on_added=self._worker_added,
            on_removed=self._worker_removed,
            on_forgotten=self._worker_forgotten,
        )
        self._zmq = RegistryServer(
            self.registry,
            settings.host,
            settings.zmq_port,
            settings.token,
            settings.heartbeat_interval_s,
            on_message=lambda kind, ok: self.metrics.registry_messages.labels(kind, "ok" if ok else "rejected").inc(),
        )
        self.tokens = TokenEstimator(settings.tokenizer)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._gauge_ids: set[tuple[str, str]] = set()
        self._worker_roles: dict[str, str] = {}  # worker id -> role its gauges are labelled with
        self._role_counts: collections.Counter[str] = collections.Counter({"prefill": 0, "decode": 0, "agg": 0})
        for role in self._role_counts:
            self.metrics.workers.labels(role=role).set(0)
        self.http_port = 0
        self.zmq_port = 0

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.s.host}:{self.http_port}"

    @property
    def zmq_endpoint(self) -> str:
        return f"tcp://{self.s.host}:{self.zmq_port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        """Where workers' KV-event publishers connect (``tcp://host:port``), or None when off."""
        return self.kv.endpoint if self.kv is not None else None

    async def start(self) -> tuple[int, int]:
        """Bind ZMQ and HTTP (port 0 = any free port) and serve; returns the bound ports."""
        if self.kv is not None:
            self.kv.start()  # bind the KV-event SUB first: workers publish as soon as they run
        self.zmq_port = self._zmq.bind()
        self._zmq.start()
        # vLLM's uvicorn closes idle keep-alive connections after 5 s; reusing one it already closed fails
        # with ServerDisconnectedError.  Drop idle connections before the server does (and see
        # _post below for the race that remains).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.s.connect_timeout_s, sock_connect=self.s.connect_timeout_s
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/workers", self._workers)
        # handler_cancellation: a client that hangs up cancels its handler, which closes the upstream
        # connection, which is how vLLM learns to abort the request.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.s.host, self.s.port, backlog=4096)
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        log.info("frontend (%s, %s) at %s, registry at %s, KV events at %s", self.s.mode, self.policy.name, self.url,
                 self.zmq_endpoint, self.kv_events_endpoint or "off")  # fmt: skip
        return self.http_port, self.zmq_port

    async def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests (503), let in-flight ones finish within ``grace_s``, then close all."""
        self._draining = True
        if self._active:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._zmq.close()
        if self.kv is not None and not self._kv_closed:
            self._kv_closed = True
            await self.kv.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Frontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace_s=5.0)

    # ---------------------------------------------------------------------------- simple endpoints

    async def _health(self, request: web.Request) -> web.Response:
        if self._draining:
            return web.Response(status=503, body=error_body(503, "frontend is shutting down"), content_type=_JSON)
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _workers(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        workers = []
        for w in sorted(self.registry.workers.values(), key=lambda w: w.worker_id):
            entry = w.as_json(now)
            if self.kv is not None:
                entry["kv_index_blocks"] = self.kv.index.size(w.worker_id)
            workers.append(entry)
        data: dict[str, Any] = {"mode": self.s.mode, "policy": self.policy.name, "workers": workers}
        if self.kv is not None:
            data["kv_events_endpoint"] = self.kv.endpoint
        return web.json_response(data)

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "pdkit", "root": m, "parent": None}
            for m in self.registry.models()
        ]
        return web.json_response({"object": "list", "data": data})

    # Registry hooks, one worker per call: a change costs O(1), never a pass over the fleet (a flood of
    # registrations used to resync the KV subscriber over all workers on each one).

    def _worker_added(self, w: WorkerState) -> None:
        old_role = self._worker_roles.get(w.worker_id)
        if old_role != w.role:
            if old_role is not None:  # re-registered under another role
                self._role_left(w.worker_id, old_role)
            self._worker_roles[w.worker_id] = w.role
            self._role_counts[w.role] += 1
            self.metrics.workers.labels(role=w.role).set(self._role_counts[w.role])
            self.metrics.inflight.labels(w.worker_id, w.role).set(w.inflight)
            self._gauge_ids.add((w.worker_id, w.role))
        if self.kv is not None:
            self.kv.add_worker(w)

    def _worker_removed(self, w: WorkerState, reaped: bool) -> None:
        role = self._worker_roles.pop(w.worker_id, None)
        if role is not None:
            self._role_left(w.worker_id, role)
        self.actual_hits.forget(w.worker_id)
        if self.kv is not None:
            self.kv.worker_left(w, reaped)

    def _worker_forgotten(self, worker_id: str) -> None:
        if self.kv is not None and worker_id not in self.registry.workers:
            self.kv.remove_worker(worker_id)

    def _role_left(self, worker_id: str, role: str) -> None:
        self._role_counts[role] -= 1
        self._gauge_ids.discard((worker_id, role))
        self.metrics.workers.labels(role=role).set(self._role_counts[role])
        with contextlib.suppress(KeyError):
            self.metrics.inflight.remove(worker_id, role)

    # ------------------------------------------------------------------------------ request path

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        mode: str = self.s.mode
        status = "500"
        self._active += 1
        try:
            if self._draining:
                raise RequestError(503, "frontend is shutting down; retry on another frontend", retry_after=1)
            ctx = self._context(request, await request.read())
            if self._prepare is not None:
                await self._prepare(ctx)
            if self.s.mode == "agg":
                resp, status = await self._decode(request, ctx, "agg", None, mode, t0)
            elif ctx.prompt_tokens < self.s.disagg_min_prompt_tokens:
                mode = "direct"
                resp, status = await self._decode(request, ctx, "decode", None, mode, t0)
            elif (local := self._local_prefill_worker(ctx)) is not None:
                mode = "direct_cached"
                resp, status = await self._decode(request, ctx, "decode", None, mode, t0, first=local)
            else:
                self._check_role(ctx, "decode")  # refuse before spending a prefill on a request with no decoder
                params = await self._prefill(ctx)
                resp, status = await self._decode(request, ctx, "decode", params, mode, t0)
            return resp
        except RequestError as exc:
            status = str(exc.status)
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            return web.Response(status=exc.status, body=exc.body(), content_type=_JSON, headers=headers)
        except _Passthrough as exc:
            status = str(exc.status)
            return web.Response(status=exc.status, body=exc.body, headers={"Content-Type": exc.content_type})
        except asyncio.CancelledError:
            status = "client_disconnect"
            self.metrics.client_disconnects.inc()
            raise
        except Exception:  # never a traceback to the client; the log has it
            log.exception("frontend error on %s", request.path)
            status = "500"
            return web.Response(
                status=500,
                body=error_body(500, "internal error in the pdkit frontend; see its log"),
                content_type=_JSON,
            )
        finally:
            self.metrics.requests.labels(mode, status).inc()
            self.metrics.e2e.labels(mode).observe(time.perf_counter() - t0)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _context(self, request: web.Request, raw: bytes) -> RequestContext:
        body = parse_body(raw)
        text, ids = extract_prompt(request.path, body)
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        model = body.get("model")
        workers = self.registry.workers.values()
        if model is not None and workers and not any(w.info.model == model for w in workers):
            raise RequestError(404, f"The model `{model}` does not exist.", "model")
        return RequestContext(
            path=request.path,
            model=model,
            body=body,
            prompt_text=text,
            prompt_token_ids=ids,
            prompt_tokens=self.tokens.count(text, ids),
            request_id=rid,
            extra={"raw": raw, "headers": self._forward_headers(request, rid)},
        )

    @staticmethod
    def _forward_headers(request: web.Request, rid: str) -> dict[str, str]:
        headers = {"Content-Type": _JSON, "X-Request-Id": rid}
        for name in _FORWARD_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        return headers

    def _local_prefill_worker(self, ctx: RequestContext) -> WorkerState | None:
        """Conditional disaggregation: a decode worker whose cached prefix leaves fewer than
        ``disagg_min_prompt_tokens`` prompt tokens to compute prefills the request itself (one hop, no
        transfer).  Only with a policy that knows the caches (``local_prefill_worker``, KV-aware)."""
        if self._local_pick is None or self.s.disagg_min_prompt_tokens <= 0:
            return None
        usable, _ = self._candidates(ctx, "decode", set())
        if not usable:
            return None
        return self._local_pick(usable, ctx, self.s.disagg_min_prompt_tokens - 1)

    def _candidates(self, ctx: RequestContext, role: str, exclude: set[str]) -> tuple[list[WorkerState], int]:
        """(usable workers, registered workers) of ``role`` serving the requested model."""
        usable: list[WorkerState] = []
        total = 0
        for w in self.registry.workers.values():
            if w.info.role != role or (ctx.model is not None and w.info.model != ctx.model):
                continue
            total += 1
            if w.worker_id not in exclude and w.inflight < self.s.max_inflight_per_worker:
                usable.append(w)
        return usable, total

    def _check_role(self, ctx: RequestContext, role: str) -> None:
        usable, total = self._candidates(ctx, role, set())
        if not usable:
            raise self._unavailable(role, total)

    def _unavailable(self, role: str, total: int) -> RequestError:
        if total == 0:
            return RequestError(
                503,
                f"no {role} worker is registered with the frontend; start one (`pdkit worker --role {role} ...` "
                f"or `pdkit launch`) and check its log: workers drop out after {self.s.liveness_s:g} s "
                "without a heartbeat",
                retry_after=self.s.retry_after_s,
            )
        return RequestError(
            503,
            f"all {total} {role} worker(s) are at --max-inflight-per-worker={self.s.max_inflight_per_worker}; "
            "retry later, add workers or raise the limit",
            retry_after=self.s.retry_after_s,
        )

    def _acquire(self, w: WorkerState) -> None:
        w.inflight += 1
        self.metrics.inflight.labels(w.worker_id, w.role).set(w.inflight)

    def _release(self, w: WorkerState, ctx: RequestContext) -> None:
        w.inflight -= 1
        if (w.worker_id, w.role) in self._gauge_ids:
            self.metrics.inflight.labels(w.worker_id, w.role).set(w.inflight)
        if self._hop_done is not None:
            self._hop_done(w, ctx)  # KV-aware routing: the request's blocks are no longer "about to be cached"

    # ---------------------------------------------------------------------------------- prefill

    async def _prefill(self, ctx: RequestContext) -> dict[str, Any] | None:
        """kv_transfer_params from a prefill worker, or None = prefill locally on the decode worker."""
        assert self._session is not None
        body = dict(ctx.body)
        body["max_tokens"] = 1
        body["min_tokens"] = 1
        if ctx.is_chat:
            body["max_completion_tokens"] = 1
        body["stream"] = False
        body.pop("stream_options", None)
        body["kv_transfer_params"] = PREFILL_KV_PARAMS
        payload = msgspec.json.encode(body)
        tried: set[str] = set()
        reason = "no_prefill_worker"
        for attempt in range(self.s.max_prefill_attempts):
            usable, total = self._candidates(ctx, "prefill", tried)
            if not usable:
                if total and not tried:
                    raise self._unavailable("prefill", total)  # registered but all saturated: shed load
                break
            if attempt:
                self.metrics.retries.labels("prefill", reason).inc()
            w = self.policy.choose("prefill", usable, ctx)
            tried.add(w.worker_id)
            t0 = time.perf_counter()
            self._acquire(w)
            try:
                params = await _with_timeout(self._prefill_hop(w, ctx, payload), self.s.prefill_timeout_s)
            except asyncio.TimeoutError:
                reason = "timeout"
                log.warning("prefill on %s timed out after %g s", w.worker_id, self.s.prefill_timeout_s)
                continue
            except _HopFailed as exc:
                reason = exc.reason
                log.warning("prefill on %s failed: %s", w.worker_id, exc.reason)
                continue
            finally:
                self._release(w, ctx)
            self.metrics.prefill_hop.observe(time.perf_counter() - t0)
            return params
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

    async def _prefill_hop(self, w: WorkerState, ctx: RequestContext, payload: bytes) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with await self._post(w.url + ctx.path, payload, ctx.extra["headers"]) as resp:
                data = await resp.read()
                if 400 <= resp.status < 500:
                    raise _Passthrough(resp.status, data, resp.headers.get("Content-Type", _JSON))
                if resp.status != 200:
                    raise _HopFailed(f"status_{resp.status}", True, resp.status, data)
        except (aiohttp.ClientError, OSError) as exc:
            reason = "connect_error" if isinstance(exc, aiohttp.ClientConnectorError) else "io_error"
            log.warning("prefill hop to %s: %s: %s", w.worker_id, type(exc).__name__, exc)
            raise _HopFailed(reason, False) from None
        try:
            params = msgspec.json.decode(data).get("kv_transfer_params")
        except (msgspec.DecodeError, AttributeError):
            params = None
        if not isinstance(params, dict):
            raise _HopFailed("no_kv_transfer_params", True)
        return params

    # ----------------------------------------------------------------------------------- decode

    async def _decode(
        self,
        request: web.Request,
        ctx: RequestContext,
        role: str,
        params: dict[str, Any] | None,
        mode: str,
        t0: float,
        first: WorkerState | None = None,
    ) -> tuple[web.StreamResponse, str]:
        """The decode (or only) hop; ``first``: the worker already chosen for the first attempt.

        A failed attempt moves on to another worker of the role.  When the failure came after the worker
        had the request *with* the prefill's KV (a failed or expired transfer, a reset connection) and no
        other worker is left -- the common 1P1D case -- the same worker gets one more try with a local
        prefill (no KV to fetch), instead of the client getting a 502 for a transient transfer problem.
        """
        tried: set[str] = set()
        last: _HopFailed | None = None
        again: WorkerState | None = None  # the worker that may be retried with a local prefill
        for _ in range(self.s.max_decode_attempts):
            usable, total = self._candidates(ctx, role, tried)
            if not usable and again is not None:
                usable = [w for w in self._candidates(ctx, role, set())[0] if w is again]
            again = None
            if not usable:
                if last is None:
                    raise self._unavailable(role, total)
                break
            if last is not None:
                self.metrics.retries.labels(role, last.reason).inc()
            ctx.remote_kv = params is not None
            w = first if first is not None and first in usable else self.policy.choose(role, usable, ctx)
            first = None
            tried.add(w.worker_id)
            if params is None:
                payload = ctx.extra["raw"]  # one hop: the client's bytes, untouched
            else:
                payload = msgspec.json.encode({**ctx.body, "kv_transfer_params": params})
            try:
                return await self._decode_hop(request, w, ctx, payload, mode, t0)
            except _HopFailed as exc:
                log.warning("%s hop on %s failed before the first byte: %s", role, w.worker_id, exc.reason)
                last = exc
                if exc.reached and params is not None:
                    # The failed decode may have read (and released) the prefill's blocks: prefill locally.
                    params = None
                    again = w
                    self.metrics.fallbacks.labels(f"decode_{exc.reason}").inc()
        assert last is not None
        if last.status is not None and last.body:
            raise _Passthrough(last.status, last.body, _JSON)
        raise RequestError(502, f"every {role} worker tried failed ({last.reason}); see the frontend log")

    async def _decode_hop(
        self, request: web.Request, w: WorkerState, ctx: RequestContext, payload: bytes, mode: str, t0: float
    ) -> tuple[web.StreamResponse, str]:
        assert self._session is not None
        stream = bool(ctx.body.get("stream"))
        hop0 = time.perf_counter()
        self._acquire(w)
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                resp = await self._post(w.url + ctx.path, payload, ctx.extra["headers"])
                if resp.status >= 500:
                    raise _HopFailed(f"status_{resp.status}", True, resp.status, await resp.read())
                if resp.status != 200 or not stream:
                    data = await resp.read()
                    ct = resp.headers.get("Content-Type", _JSON)
                    self.metrics.decode_hop.labels(mode).observe(time.perf_counter() - hop0)
                    out = web.Response(status=resp.status, body=data, headers={"Content-Type": ct})
                    out.headers["X-Request-Id"] = ctx.request_id
                    return out, str(resp.status)
                first = await resp.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                reached = not isinstance(exc, aiohttp.ClientConnectorError)
                log.warning("decode hop to %s: %s: %s", w.worker_id, type(exc).__name__, exc)
                raise _HopFailed("connect_error" if not reached else "io_error", reached) from None
            if not first:
                raise _HopFailed("empty_stream", True)
            if first.startswith(b'data: {"error"'):
                # vLLM sends headers before the first token, so a failed KV load arrives as an error event
                # in a 200 stream; nothing has reached the client yet, so another worker can still serve it.
                raise _HopFailed("stream_error_event", True, 500, _sse_error_payload(first))
            return await self._relay_stream(request, resp, first, mode, t0, hop0, ctx)
        finally:
            self._release(w, ctx)
            if resp is not None:
                resp.close()

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
        try:
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                now = time.perf_counter()
                itl.observe(now - last)
                last = now
                await out.write(chunk)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError) and request.transport is None:
                raise asyncio.CancelledError from None  # the client left; resp.close() aborts upstream
            status = "stream_error"
            self.metrics.stream_errors.inc()
            log.warning("upstream stream broke after the first byte: %r", exc)
            msg = error_obj(502, f"the worker's stream broke after the first byte ({type(exc).__name__})")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(b"data: " + msgspec.json.encode(msg) + b"\n\ndata: [DONE]\n\n")
        self.metrics.decode_hop.labels(mode).observe(time.perf_counter() - hop0)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await out.write_eof()
        return out, status


async def _with_timeout(coro: Coroutine[Any, Any, _T], timeout_s: float) -> _T:
    """``asyncio.timeout`` where available: Python 3.11's ``wait_for`` can swallow a cancellation (the
    client's disconnect) that races with the hop finishing, and the decode hop would then still run."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout=timeout_s)  # pragma: no cover - Python 3.10


def _sse_error_payload(chunk: bytes) -> bytes:
    line = chunk.split(b"\n", 1)[0]
    return line[len(b"data: ") :].strip()
