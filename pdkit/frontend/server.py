"""The frontend process: aiohttp HTTP API + ZMQ registry + P→D orchestration.

Request path (disagg): parse the body once, pick a prefill worker, send it the body with
``max_tokens=1, min_tokens=1, stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``
(NIXL returns params only for a request that ended by its length limit), then send the client's
original body plus the returned params to a decode worker and pass its bytes through (SSE or JSON).
With first-token seeding (``FrontendSettings.seed_first_token``; by default where the decode worker's vLLM
release has it proven on a GPU, ``Stack.seeding_proven``; docs/seeding.md) the
prefill's token goes to the client at once and the decode gets prompt ids + that token instead
(:mod:`pdkit.frontend.seeding` shapes both hops and the client's answer); requests seeding cannot
reproduce exactly, and those sent with ``X-Pdkit-Seed: off``, take the unseeded path just described.
Agg mode, and disagg prompts shorter than ``disagg_min_prompt_tokens``, take one hop.  With a KV-aware
policy a disagg request also takes one hop when a decode worker already caches all but fewer than
``disagg_min_prompt_tokens`` of its prompt tokens (conditional disaggregation, mode ``direct_cached``).

KV routing (docs/kv-routing.md): when ``FrontendSettings.kv_events_enabled`` the frontend owns a
:class:`~pdkit.routing.kv_aware.KvRouting` (SUB socket, index, ``pdkit_kv_*`` metrics) that follows the
registry; its policy is the frontend's policy when ``policy="kv_aware"``.

Admission (docs/frontend.md, :mod:`pdkit.frontend.admission`): before any hop a request takes every
worker slot it needs at once -- in disagg a prefill *and* a decode slot, so a finished prefill is never
refused by a full decode worker -- or waits for them in a bounded FIFO queue.

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
import hashlib
import hmac
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from pdkit.frontend import seeding
from pdkit.frontend.admission import AdmissionQueue
from pdkit.frontend.metrics import ActualHits, FrontendMetrics
from pdkit.frontend.registry import Registry, RegistryServer
from pdkit.frontend.requests import RequestError, TokenEstimator, error_body, error_obj, extract_prompt, parse_body
from pdkit.frontend.settings import FrontendSettings, is_loopback
from pdkit.frontend.validation import check_context_length, validate_request
from pdkit.http_app import Route, make_app, serve
from pdkit.protocol import Load
from pdkit.routing.policies import KV_AWARE, make_policy
from pdkit.routing.types import Policy, RequestContext, WorkerState
from pdkit.stack import stack_for

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


class BindError(Exception):
    """A port the frontend must bind is taken; the text names the port, its flag and its YAML key."""

    def __init__(self, what: str, host: str, port: int, flag: str, key: str, cause: BaseException) -> None:
        super().__init__(
            f"cannot bind the {what} port {host}:{port} ({cause}); stop what holds it or choose another "
            f"with {flag} (YAML {key})"
        )


class _StopCut(Exception):
    """Set on an upstream stream's reader when the stop grace ran out: the relay ends it with an error event."""


@dataclass(eq=False)
class _Route:
    """What admission granted one request: the held slots (each released once, when its hop is over).

    ``worker``: the decode (or agg) worker, held from admission to the last byte; ``prefill``: the prefill
    worker of a disaggregated request, held until its prefill hop ends (None: prefill on the decode worker).
    """

    mode: str
    ctx: RequestContext
    worker: WorkerState | None
    prefill: WorkerState | None = None


@dataclass(eq=False)
class _Relay:
    """One stream being relayed, so that :meth:`Frontend.stop` can cut it with an error event."""

    resp: aiohttp.ClientResponse
    cut: bool = False


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
        self.admission: AdmissionQueue[_Route] = AdmissionQueue(
            max_queued=settings.max_queued,
            timeout_s=settings.queue_timeout_s,
            retry_after_s=settings.retry_after_s,
            release=self._release_route,
            metrics=self.metrics,
            all_roles=_roles_of(settings.mode),
        )
        self._relays: set[_Relay] = set()
        self._api_key_hash = hashlib.sha256(settings.api_key.encode()).digest() if settings.api_key else None
        if not settings.token:
            log.warning(
                "no registry token: any local process can register workers (pdkit launch makes one; "
                "pass --token/--token-file or PDKIT_TOKEN; docs/security.md)"
            )
        self.registry = Registry(
            settings.liveness_s,
            on_heartbeat=self._heartbeat,
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
        self._kv_releases: set[asyncio.Task[None]] = set()  # fire-and-forget seeding releases in flight
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
        import zmq

        host = self.s.host
        if self.kv is not None:
            try:
                self.kv.start()  # bind the KV-event SUB first: workers publish as soon as they run
            except (OSError, zmq.ZMQError) as exc:
                port = self.s.kv_events_port or 0
                raise BindError("KV-events", host, port, "--kv-events-port", "frontend.kv_events_port", exc) from None
        try:
            self.zmq_port = self._zmq.bind()
        except (OSError, zmq.ZMQError) as exc:
            raise BindError("registry (ZMQ)", host, self.s.zmq_port, "--zmq-port", "frontend.zmq_port", exc) from None
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
        routes: list[Route] = [
            ("POST", "/v1/completions", self._generate),
            ("POST", "/v1/chat/completions", self._generate),
            ("GET", "/v1/models", self._models),
            ("GET", "/health", self._health),
            ("GET", "/readiness", self._readiness),
            ("GET", "/metrics", self._metrics),
            ("GET", "/workers", self._workers),
        ]
        app = make_app(routes, [self._require_api_key] if self._api_key_hash is not None else [])
        # serve() cancels the handler of a client that hangs up, which closes the upstream connection,
        # which is how vLLM learns to abort the request.
        try:
            self._runner, self.http_port = await serve(app, self.s.host, self.s.port, backlog=4096)
        except OSError as exc:
            raise BindError("HTTP", host, self.s.port, "--port", "frontend.port", exc) from None
        log.info("frontend (%s, %s) at %s, registry at %s, KV events at %s", self.s.mode, self.policy.name, self.url,
                 self.zmq_endpoint, self.kv_events_endpoint or "off")  # fmt: skip
        if not is_loopback(self.s.host) and self._api_key_hash is None:
            log.warning(
                "!!! the frontend's HTTP API at %s is open to anyone who can reach %s: no API key is set. "
                "Pass --api-key (YAML frontend.api_key, env PDKIT_API_KEY) to require one.", self.url, self.s.host
            )  # fmt: skip
        return self.http_port, self.zmq_port

    async def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests (503), answer queued ones 503 at once, let in-flight ones finish within
        ``grace_s``; streams still running then end with an SSE error event and ``[DONE]``; close all."""
        self._draining = True
        self.admission.drain()
        if self._active:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        if self._relays:
            for relay in list(self._relays):
                relay.cut = True
                relay.resp.content.set_exception(_StopCut())  # wakes the relay's pending read
            with contextlib.suppress(asyncio.TimeoutError):  # let each relay write its error event
                await asyncio.wait_for(self._idle.wait(), timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._zmq.close()
        if self.kv is not None and not self._kv_closed:
            self._kv_closed = True
            await self.kv.close()
        if self._kv_releases:  # a release is a few ms on a live worker; a dead one must not hold up the stop
            await asyncio.wait(set(self._kv_releases), timeout=2.0)
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

    async def _readiness(self, request: web.Request) -> web.Response:
        """200 when every role the mode needs has a live, healthy worker; 503 naming the missing roles.

        Disagg needs prefill *and* decode to be ready, although a decode worker alone can serve (it
        prefills locally): "ready" means the deployment serves as configured, not merely that it answers.
        """
        roles = _roles_of(self.s.mode)
        live = {role: 0 for role in roles}
        for w in self.registry.workers.values():
            if w.info.role in live and w.load.healthy:
                live[w.info.role] += 1
        missing = [role for role in roles if not live[role]]
        ready = not missing and not self._draining
        data: dict[str, Any] = {"ready": ready, "mode": self.s.mode, "live": live, "missing": missing}
        if self._draining:
            data["reason"] = "shutting down"
        return web.json_response(data, status=200 if ready else 503)

    @web.middleware
    async def _require_api_key(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """vLLM's ``--api-key`` rule: ``/v1/*`` needs ``Authorization: Bearer KEY``; the rest stays open.

        Both sides are hashed first so the constant-time compare does not leak the key's length either.
        """
        if request.path.startswith("/v1") and request.method != "OPTIONS":
            scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
            digest = hashlib.sha256(given.encode()).digest()
            assert self._api_key_hash is not None
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._api_key_hash):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _workers(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        workers = []
        for w in sorted(self.registry.workers.values(), key=lambda w: w.worker_id):
            entry = w.as_json(now)
            entry["healthy"] = w.load.healthy
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

    def _heartbeat(self, worker: WorkerState, load: Load) -> None:
        self.actual_hits.observe(worker, load)
        if len(self.admission):
            self.admission.pump()  # a worker may have turned healthy again

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
        self.admission.pump()  # a new worker has free slots

    def _worker_removed(self, w: WorkerState, reaped: bool) -> None:
        role = self._worker_roles.pop(w.worker_id, None)
        if role is not None:
            self._role_left(w.worker_id, role)
        self.actual_hits.forget(w.worker_id)
        if self.kv is not None:
            self.kv.worker_left(w, reaped)
        self.admission.pump()  # waiters for a vanished role get 503

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
        route: _Route | None = None
        try:
            if self._draining:
                raise RequestError(503, "frontend is shutting down; retry on another frontend", retry_after=1)
            ctx = self._context(request, await request.read())
            if self._prepare is not None:
                await self._prepare(ctx)
            await self._check_context_length(ctx)
            route = await self._admit(ctx)
            mode = route.mode
            if mode == "disagg":
                resp, status = await self._disagg(request, ctx, route, t0)
            else:
                resp, status = await self._decode(request, ctx, _role_of(mode), None, mode, t0, route)
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
            if route is not None:
                self._release_route(route)  # whatever slot an early end (error, disconnect) left held
            self.metrics.requests.labels(mode, status).inc()
            self.metrics.e2e.labels(mode).observe(time.perf_counter() - t0)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _context(self, request: web.Request, raw: bytes) -> RequestContext:
        body = parse_body(raw)
        validate_request(request.path, body)  # vLLM's own 400s for bad sampling parameters, before any hop
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
            raw=raw,
            headers=self._forward_headers(request, rid),
        )

    @staticmethod
    def _forward_headers(request: web.Request, rid: str) -> dict[str, str]:
        headers = {"Content-Type": _JSON, "X-Request-Id": rid}
        for name in _FORWARD_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        return headers

    # -------------------------------------------------------------------------- context length

    def _max_model_len(self, ctx: RequestContext) -> int | None:
        """The deployment's context length, else the smallest one the model's workers report."""
        if self.s.max_model_len is not None:
            return self.s.max_model_len
        lens = [
            w.info.max_model_len
            for w in self.registry.workers.values()
            if w.info.max_model_len is not None and (ctx.model is None or w.info.model == ctx.model)
        ]
        return min(lens) if lens else None

    async def _check_context_length(self, ctx: RequestContext) -> None:
        """Refuse (400) a prompt + max_tokens that cannot fit, before a prefill is spent on it.

        Cheap on the hot path: a prompt's UTF-8 byte length plus a generous allowance for the chat
        template bounds its token count from above (a byte-level BPE token is at least one byte), so
        only a request whose bound does not fit is tokenized exactly -- in a thread, like KV-aware
        routing does -- and judged by ``check_context_length(exact=True)``.
        """
        max_len = self._max_model_len(ctx)
        if max_len is None:
            return
        body = ctx.body
        if ctx.prompt_token_ids is not None:
            prompt = body.get("prompt")
            # a batch of token-id prompts is judged by its longest one, as vLLM judges each prompt
            longest = max(map(len, prompt)) if prompt and isinstance(prompt[0], list) else len(ctx.prompt_token_ids)
            check_context_length(longest, body, max_len, exact=True)
            return
        if not check_context_length(_prompt_token_bound(ctx), body, max_len, exact=False):
            return  # even the upper bound fits (the usual case: no tokenization)
        from pdkit.model_files import default_model_dir
        from pdkit.prompt_tokens import PromptError, load_prompt_tokenizer

        model_dir = str(self.s.model_dir or default_model_dir())

        def count() -> int:
            return len(load_prompt_tokenizer(model_dir).request_ids(body, ctx.is_chat))

        try:
            exact = await asyncio.to_thread(count)
        except (PromptError, OSError, ValueError, TypeError, KeyError) as exc:
            log.debug("exact prompt length unknown (%s); the engine judges the context length", exc)
            return
        check_context_length(exact, body, max_len, exact=True)

    # ------------------------------------------------------------------------------- admission

    async def _admit(self, ctx: RequestContext) -> _Route:
        """Take the request's worker slots now, or wait for them in the admission queue."""
        if self.s.mode == "agg":
            label, roles = "agg", ("agg",)
        elif ctx.prompt_tokens < self.s.disagg_min_prompt_tokens:
            label, roles = "decode", ("decode",)
        else:
            label, roles = "prefill", ("prefill", "decode")
        return await self.admission.admit(label, roles, lambda: self._try_route(ctx))

    def _try_route(self, ctx: RequestContext) -> _Route | None:
        """Choose and hold every slot the request needs, all at once, or None when one is full.

        Runs on the event loop without awaiting, so nothing can take a slot between the check and the
        hold.  Raises 503 when a needed role has no live, healthy worker at all (waiting cannot help).
        """
        if self.s.mode == "agg":
            usable, live = self._candidates(ctx, "agg", ())
            if not live:
                raise self._unavailable("agg", ctx)
            return _Route("agg", ctx, self._hold(self.policy.choose("agg", usable, ctx))) if usable else None
        decode, live = self._candidates(ctx, "decode", ())
        if not live:
            raise self._unavailable("decode", ctx)
        if not decode:
            return None
        if ctx.prompt_tokens < self.s.disagg_min_prompt_tokens:
            return _Route("direct", ctx, self._hold(self.policy.choose("decode", decode, ctx)))
        if self._local_pick is not None and self.s.disagg_min_prompt_tokens > 0:
            # Conditional disaggregation: a decode worker whose cached prefix leaves fewer than
            # disagg_min_prompt_tokens to compute prefills the request itself (one hop, no transfer).
            local = self._local_pick(decode, ctx, self.s.disagg_min_prompt_tokens - 1)
            if local is not None:
                return _Route("direct_cached", ctx, self._hold(local))
        prefill, prefill_live = self._candidates(ctx, "prefill", ())
        if prefill_live and not prefill:
            return None  # wait for a prefill slot rather than prefill on the (scarcer) decode worker
        p = self._hold(self.policy.choose("prefill", prefill, ctx)) if prefill else None
        ctx.remote_kv = p is not None
        d = self._hold(self.policy.choose("decode", decode, ctx))
        return _Route("disagg", ctx, d, p)

    def _candidates(
        self, ctx: RequestContext, role: str, exclude: set[str] | tuple[()]
    ) -> tuple[list[WorkerState], int]:
        """(usable workers, live workers) of ``role`` serving the requested model.  Live = registered and
        healthy by its last heartbeat; usable = live, under the in-flight cap and not in ``exclude``."""
        usable: list[WorkerState] = []
        live = 0
        cap = self.s.max_inflight_per_worker
        for w in self.registry.workers.values():
            if w.info.role != role or (ctx.model is not None and w.info.model != ctx.model) or not w.load.healthy:
                continue
            live += 1
            if w.inflight < cap and w.worker_id not in exclude:
                usable.append(w)
        return usable, live

    def _still_usable(self, w: WorkerState) -> bool:
        return self.registry.workers.get(w.worker_id) is w and w.load.healthy

    def _unavailable(self, role: str, ctx: RequestContext) -> RequestError:
        sick = [
            w
            for w in self.registry.workers.values()
            if w.info.role == role and (ctx.model is None or w.info.model == ctx.model)
        ]
        if sick:
            reasons = sorted({w.load.unhealthy_reason or "unhealthy" for w in sick})
            return RequestError(
                503,
                f"all {len(sick)} {role} worker(s) report an unhealthy engine ({'; '.join(reasons)}); "
                "they get requests again once their agent's health probe passes -- see the worker logs",
                retry_after=self.s.retry_after_s,
            )
        return RequestError(
            503,
            f"no {role} worker is registered with the frontend; start one (`pdkit worker --role {role} ...` "
            f"or `pdkit launch`) and check its log: workers drop out after {self.s.liveness_s:g} s "
            "without a heartbeat",
            retry_after=self.s.retry_after_s,
        )

    def _hold(self, w: WorkerState) -> WorkerState:
        w.inflight += 1
        self.metrics.inflight.labels(w.worker_id, w.role).set(w.inflight)
        return w

    def _release(self, w: WorkerState, ctx: RequestContext) -> None:
        w.inflight -= 1
        if (w.worker_id, w.role) in self._gauge_ids:
            self.metrics.inflight.labels(w.worker_id, w.role).set(w.inflight)
        if self._hop_done is not None:
            self._hop_done(w, ctx)  # KV-aware routing: the request's blocks are no longer "about to be cached"
        self.admission.pump()  # a slot freed: the oldest waiter that fits takes it

    def _release_route(self, route: _Route) -> None:
        """Give back every slot the route still holds (each exactly once)."""
        for w in (route.prefill, route.worker):
            if w is not None:
                self._release(w, route.ctx)
        route.prefill = route.worker = None

    # --------------------------------------------------------------------------- disagg (seeded)

    async def _disagg(
        self, request: web.Request, ctx: RequestContext, route: _Route, t0: float
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
        if decode is None:
            return False
        if decode.info.engine != "vllm":
            return True
        if decode.info.engine_version is None:
            return False
        try:
            stack = stack_for(decode.info.engine_version)
        except ValueError:
            return False
        return stack.known and stack.seeding_proven

    @staticmethod
    def _seed_refusal(request: web.Request, ctx: RequestContext) -> str | None:
        """Why this request takes the unseeded path (None: seed it).  ``X-Pdkit-Seed: off`` is a
        debugging aid (A/B on one deployment, scripts/gpu_bench_seeding.py) that affects only its own
        request, so it needs no secret: it cannot change how any other request is routed."""
        if request.headers.get(SEED_HEADER, "").strip().lower() in ("off", "0", "false", "no"):
            return f"{SEED_HEADER}: off"
        return seeding.seed_refusal(ctx.path, ctx.body)

    async def _seeded(
        self, request: web.Request, ctx: RequestContext, route: _Route, t0: float
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
            return web.Response(body=data, content_type=_JSON, headers={"X-Request-Id": ctx.request_id}), "200"
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
        self, ctx: RequestContext, route: _Route, first: seeding.FirstToken, dpath: str, dbody: dict[str, Any]
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
        return web.Response(body=data, content_type=_JSON, headers={"X-Request-Id": ctx.request_id}), "200"

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
        route: _Route,
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
                    got = await _with_timeout(
                        self._open_hop(w, ctx, payload, True, opened, path=dpath), self.s.decode_first_byte_timeout_s
                    )
                except asyncio.TimeoutError:
                    log.warning("seeded decode hop to %s sent no first byte within %g s", w.worker_id,
                                self.s.decode_first_byte_timeout_s)  # fmt: skip
                    raise _HopFailed(FIRST_BYTE_TIMEOUT, True) from None
                if isinstance(got, web.Response):  # an engine's 4xx: nothing to retry, the stream is open
                    assert isinstance(got.body, bytes)
                    self.metrics.stream_errors.inc()
                    await self._end_stream_with_error(out, _error_event(got.status, got.body))
                    return "stream_error"
                return await self._relay_seeded(request, out, s, opened[0], got)
            finally:
                for resp in opened:
                    resp.close()

        try:
            status = await self._decode_attempts(ctx, "decode", dbody.get("kv_transfer_params"), route, attempt)
        except (_Passthrough, RequestError) as exc:
            status = "stream_error"
            self.metrics.stream_errors.inc()
            if isinstance(exc, _Passthrough):
                event = _error_event(exc.status, exc.body)
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
        relay = _Relay(resp)
        self._relays.add(relay)
        try:
            while True:
                piece = s.feed(data)
                if piece:
                    now = time.perf_counter()
                    itl.observe(now - last)
                    last = now
                    tail = piece[-len(_DONE) :]
                    await out.write(piece)
                if s.done:
                    break
                data = await resp.content.readany()
                if not data:
                    raise aiohttp.ClientPayloadError("the decode's stream ended before [DONE]")
        except _StopCut:
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
        if tail != _DONE:  # an error event from the decode ends the stream; the client still gets [DONE]
            status = "stream_error"
            self.metrics.stream_errors.inc()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write(_DONE)
        return status

    # ---------------------------------------------------------------------------------- prefill

    async def _prefill(self, ctx: RequestContext, route: _Route) -> dict[str, Any] | None:
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
        self, ctx: RequestContext, route: _Route, body: dict[str, Any], *, need_params: bool
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
                answer = await _with_timeout(self._prefill_hop(w, ctx, payload, need_params), self.s.prefill_timeout_s)
            except asyncio.TimeoutError:
                reason = "timeout"
                log.warning("prefill on %s timed out after %g s", w.worker_id, self.s.prefill_timeout_s)
                continue
            except _HopFailed as exc:
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
                    raise _Passthrough(resp.status, data, resp.headers.get("Content-Type", _JSON))
                if resp.status != 200:
                    raise _HopFailed(f"status_{resp.status}", True, resp.status, data)
        except (aiohttp.ClientError, OSError) as exc:
            reason = "connect_error" if isinstance(exc, aiohttp.ClientConnectorError) else "io_error"
            log.warning("prefill hop to %s: %s: %s", w.worker_id, type(exc).__name__, exc)
            raise _HopFailed(reason, False) from None
        try:
            answer = msgspec.json.decode(data)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise _HopFailed("bad_answer", True)
        if need_params and not isinstance(answer.get("kv_transfer_params"), dict):
            raise _HopFailed("no_kv_transfer_params", True)
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
        route: _Route,
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
        route: _Route,
        attempt: Callable[[WorkerState, dict[str, Any] | None], Awaitable[_T]],
    ) -> _T:
        """Run ``attempt(worker, params)``, first on the worker admission held (``route.worker``).

        ``attempt`` raises :class:`_HopFailed` when the hop failed before anything reached the client.
        A failed attempt moves on to another worker of the role with a free slot (taken before the held
        one is given back, so the cap holds and no waiter can take it in between).  When the failure
        came after the worker had the request *with* the prefill's KV (a failed or expired transfer, a
        reset connection) the next attempt prefills locally (``params`` None), and when no other worker
        is left -- the common 1P1D case -- the same worker gets one more try that way, instead of the
        client getting a 502 for a transient transfer problem.  A worker that did not send its first byte
        in time is not tried again.
        """
        tried: set[str] = set()
        last: _HopFailed | None = None
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
            except _HopFailed as exc:
                log.warning("%s hop on %s failed before the first byte: %s", role, held.worker_id, exc.reason)
                last = exc
                if exc.reached and params is not None:
                    # The failed decode may have read (and released) the prefill's blocks: prefill locally.
                    params = None
                    again = exc.reason != FIRST_BYTE_TIMEOUT
                    self.metrics.fallbacks.labels(f"decode_{exc.reason}").inc()
        assert last is not None
        if last.status is not None and last.body:
            raise _Passthrough(last.status, last.body, _JSON)
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
                    first = await _with_timeout(
                        self._open_hop(w, ctx, payload, stream, opened), self.s.decode_first_byte_timeout_s
                    )
                except asyncio.TimeoutError:
                    log.warning(
                        "decode hop to %s sent no first byte within %g s (decode_first_byte_timeout_s)",
                        w.worker_id, self.s.decode_first_byte_timeout_s,
                    )  # fmt: skip
                    raise _HopFailed(FIRST_BYTE_TIMEOUT, True) from None
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
                raise _HopFailed(f"status_{resp.status}", True, resp.status, await resp.read())
            if resp.status != 200 or not stream:
                data = await resp.read()
                out = web.Response(status=resp.status, body=data, headers={"Content-Type": resp.headers.get(
                    "Content-Type", _JSON)})  # fmt: skip
                out.headers["X-Request-Id"] = ctx.request_id
                return out
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
        relay = _Relay(resp)
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
        except _StopCut:
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


SEED_HEADER = "X-Pdkit-Seed"  # "off": this request takes the unseeded P/D path (debugging, A/B benchmarks)
_DONE = b"data: [DONE]\n\n"
FIRST_BYTE_TIMEOUT = "first_byte_timeout"  # _HopFailed reason of a decode hop past decode_first_byte_timeout_s

# What a chat template adds around the messages, in tokens, at most: per message (role header, end
# marker) and once (BOS, generation prompt).  Generous on purpose: it only decides when to count exactly.
_CHAT_TOKENS_PER_MESSAGE = 16
_TEMPLATE_TOKENS = 64


def _roles_of(mode: str) -> tuple[str, ...]:
    """The worker roles a frontend of ``mode`` routes to (and /readiness waits for)."""
    return ("agg",) if mode == "agg" else ("prefill", "decode")


def _role_of(mode: str) -> str:
    """The role of the single hop of a one-hop routing mode (agg, direct, direct_cached)."""
    return "agg" if mode == "agg" else "decode"


def _prompt_token_bound(ctx: RequestContext) -> int:
    """An upper bound of the prompt's token count without tokenizing (see _check_context_length)."""
    body = ctx.body
    n = len((ctx.prompt_text or "").encode()) + _TEMPLATE_TOKENS
    if ctx.is_chat:
        messages = body.get("messages")
        n += _CHAT_TOKENS_PER_MESSAGE * (len(messages) if isinstance(messages, list) else 1)
        for key in ("tools", "documents", "chat_template_kwargs"):
            if body.get(key):
                n += len(msgspec.json.encode(body[key]))
    return n


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


def _error_event(status: int, body: bytes) -> bytes:
    """An engine's error answer as one SSE error event (its own ``{"error": ...}`` when it sent one)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        obj = None
    if not (isinstance(obj, dict) and "error" in obj):
        obj = error_obj(status, f"the decode worker answered {status}; see the frontend log")
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"
