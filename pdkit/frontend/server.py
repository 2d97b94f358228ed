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
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pdkit.frontend.admission import AdmissionQueue
from pdkit.frontend.hops import (
    JSON_TYPE,
    PREFILL_KV_PARAMS,
    HeldRoute,
    Passthrough,
    Relay,
    StopCut,
)
from pdkit.frontend.metrics import ActualHits, FrontendMetrics
from pdkit.frontend.registry import Registry, RegistryServer
from pdkit.frontend.requests import RequestError, TokenEstimator, error_body, extract_prompt, parse_body
from pdkit.frontend.seeded_path import SEED_HEADER, SeededPath
from pdkit.frontend.settings import FrontendSettings, is_loopback
from pdkit.frontend.validation import check_context_length, validate_request
from pdkit.http_app import Route, make_app, serve
from pdkit.protocol import Load
from pdkit.routing.policies import KV_AWARE, make_policy
from pdkit.routing.types import Policy, RequestContext, WorkerState

UPSTREAM_KEEPALIVE_S = 4.0
# PREFILL_KV_PARAMS and SEED_HEADER live with the hops that use them; importable from here as before.
__all__ = ["PREFILL_KV_PARAMS", "SEED_HEADER", "BindError", "Frontend"]

log = logging.getLogger("pdkit.frontend")

_FORWARD_HEADERS = ("Authorization", "traceparent", "tracestate")


class BindError(Exception):
    """A port the frontend must bind is taken; the text names the port, its flag and its YAML key."""

    def __init__(self, what: str, host: str, port: int, flag: str, key: str, cause: BaseException) -> None:
        super().__init__(
            f"cannot bind the {what} port {host}:{port} ({cause}); stop what holds it or choose another "
            f"with {flag} (YAML {key})"
        )


class Frontend(SeededPath):
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
        self.admission: AdmissionQueue[HeldRoute] = AdmissionQueue(
            max_queued=settings.max_queued,
            timeout_s=settings.queue_timeout_s,
            retry_after_s=settings.retry_after_s,
            release=self._release_route,
            metrics=self.metrics,
            all_roles=_roles_of(settings.mode),
        )
        self._relays: set[Relay] = set()
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
                relay.resp.content.set_exception(StopCut())  # wakes the relay's pending read
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
            return web.Response(status=503, body=error_body(503, "frontend is shutting down"), content_type=JSON_TYPE)
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
        route: HeldRoute | None = None
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
            return web.Response(status=exc.status, body=exc.body(), content_type=JSON_TYPE, headers=headers)
        except Passthrough as exc:
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
                content_type=JSON_TYPE,
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
        headers = {"Content-Type": JSON_TYPE, "X-Request-Id": rid}
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

    async def _admit(self, ctx: RequestContext) -> HeldRoute:
        """Take the request's worker slots now, or wait for them in the admission queue."""
        roles: tuple[str, ...]
        if self.s.mode == "agg":
            label, roles = "agg", ("agg",)
        elif ctx.prompt_tokens < self.s.disagg_min_prompt_tokens:
            label, roles = "decode", ("decode",)
        else:
            label, roles = "prefill", ("prefill", "decode")
        return await self.admission.admit(label, roles, lambda: self._try_route(ctx))

    def _try_route(self, ctx: RequestContext) -> HeldRoute | None:
        """Choose and hold every slot the request needs, all at once, or None when one is full.

        Runs on the event loop without awaiting, so nothing can take a slot between the check and the
        hold.  Raises 503 when a needed role has no live, healthy worker at all (waiting cannot help).
        """
        if self.s.mode == "agg":
            usable, live = self._candidates(ctx, "agg", ())
            if not live:
                raise self._unavailable("agg", ctx)
            return HeldRoute("agg", ctx, self._hold(self.policy.choose("agg", usable, ctx))) if usable else None
        decode, live = self._candidates(ctx, "decode", ())
        if not live:
            raise self._unavailable("decode", ctx)
        if not decode:
            return None
        if ctx.prompt_tokens < self.s.disagg_min_prompt_tokens:
            return HeldRoute("direct", ctx, self._hold(self.policy.choose("decode", decode, ctx)))
        if self._local_pick is not None and self.s.disagg_min_prompt_tokens > 0:
            # Conditional disaggregation: a decode worker whose cached prefix leaves fewer than
            # disagg_min_prompt_tokens to compute prefills the request itself (one hop, no transfer).
            local = self._local_pick(decode, ctx, self.s.disagg_min_prompt_tokens - 1)
            if local is not None:
                return HeldRoute("direct_cached", ctx, self._hold(local))
        prefill, prefill_live = self._candidates(ctx, "prefill", ())
        if prefill_live and not prefill:
            return None  # wait for a prefill slot rather than prefill on the (scarcer) decode worker
        p = self._hold(self.policy.choose("prefill", prefill, ctx)) if prefill else None
        ctx.remote_kv = p is not None
        d = self._hold(self.policy.choose("decode", decode, ctx))
        return HeldRoute("disagg", ctx, d, p)

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

    def _release_route(self, route: HeldRoute) -> None:
        """Give back every slot the route still holds (each exactly once)."""
        for w in (route.prefill, route.worker):
            if w is not None:
                self._release(w, route.ctx)
        route.prefill = route.worker = None


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
