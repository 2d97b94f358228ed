"""HTTP face of the simulated engine: the subset of vLLM's OpenAI server that pdkit uses.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream and not, with
``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``,
``GET /version``, ``POST /reset_prefix_cache`` and the P/D side channel ``POST /sim/kv/pull`` (the
simulator's stand-in for NIXL's side channel; ``remote_host``/``remote_port`` in the prefill's
``kv_transfer_params`` point at this server).

Response bodies follow vLLM 0.26.0's pydantic models field for field (ids ``cmpl-``/``chatcmpl-`` +
``X-Request-Id`` or a random uuid, ``created``, ``model``, choices, ``usage``, ``kv_transfer_params``);
errors are vLLM's ``{"error": {"message", "type", "param", "code"}}`` with the same status codes.
Request rules and JSON shapes live in :mod:`pdkit.sim.openai`, one call's sequences and its answer
(``n``, several prompts, streaming) in :mod:`pdkit.sim.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST

from pdkit.frontend.requests import RequestError
from pdkit.frontend.validation import validate_request
from pdkit.http_app import Route, make_app, serve
from pdkit.prompt_tokens import PromptError
from pdkit.sim.call import Call as _Call
from pdkit.sim.call import Prompt as _Prompt
from pdkit.sim.engine import SimEngine
from pdkit.sim.latency import kv_bytes_per_token
from pdkit.sim.metrics import SimMetrics
from pdkit.sim.openai import (
    ApiError,
    check_max_tokens,
    check_prompt_chars,
    check_prompt_tokens,
    completion_prompts,
    requested_max_tokens,
    sampling_options,
)
from pdkit.sim.settings import SimSettings
from pdkit.sim.text import OutputModel, load_tokenizer
from pdkit.sim.transport import HttpTransport, KVTransport, NixlTransport, send_heartbeat

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.26.0"
# vLLM samples at 1.0 when a request sends no temperature; the sim stays greedy so that runs, P/D
# comparisons and KV-routing predictions are reproducible (docs/simulator.md, differences from vLLM)
DEFAULT_TEMPERATURE = 0.0


class SimWorker:
    """One simulated engine with its HTTP server; usable in-process (tests) or from the CLI.

    ``await worker.start()`` binds (port 0 picks a free port) and returns the port; ``worker.url`` is
    then ``http://host:port``.  ``await worker.stop()`` closes everything.  Also an async context
    manager.
    """

    def __init__(self, settings: SimSettings) -> None:
        settings.validate()
        self.settings = settings
        model_dir = Path(settings.model)
        self.tokenizer = load_tokenizer(str(model_dir.resolve()))
        cfg_path = model_dir / "config.json"
        self.model_config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        # like vLLM, never accept a request that could not fit the KV cache on its own
        configured = settings.max_model_len or int(self.model_config.get("max_position_embeddings", 8192))
        self.max_model_len = min(configured, settings.kv_capacity_blocks * settings.block_size)
        self.metrics = SimMetrics(settings.served_model_name)
        self.publisher: Any = None
        self.engine: SimEngine | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.port = 0
        self.created = int(time.time())

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self._advertised_host()}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher is not None else None

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        return self.publisher.replay_endpoint if self.publisher is not None else None

    def _advertised_host(self) -> str:
        host = self.settings.advertise_host or self.settings.host
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    async def start(self) -> int:
        s = self.settings
        publish = None
        if s.kv_events_endpoint:
            from pdkit.routing.kv_events import KVEventPublisher

            self.publisher = KVEventPublisher(
                s.kv_events_endpoint,
                s.kv_events_replay_endpoint or None,
                s.kv_events_topic,
                bind=s.kv_events_bind,
            )
            publish = self.publisher.publish_events
        self._session = ClientSession(timeout=ClientTimeout(total=60))
        bytes_per_token = kv_bytes_per_token(self.model_config)
        self.engine = SimEngine(
            s,
            OutputModel(self.tokenizer, s.seed),
            self.metrics,
            kv_bytes_per_token=bytes_per_token,
            publish=publish,
        )
        if s.role != "agg":
            self.engine.transport = self._make_transport(bytes_per_token * s.block_size)
            session = self._session
            self.engine.heartbeat = lambda host, port, eid, ids: send_heartbeat(session, host, port, eid, ids)
        routes: list[Route] = [
            ("GET", "/health", self._health),
            ("GET", "/ping", self._health),
            ("GET", "/version", self._version),
            ("GET", "/metrics", self._metrics),
            ("GET", "/v1/models", self._models),
            ("POST", "/v1/completions", self._completions),
            ("POST", "/v1/chat/completions", self._chat),
            ("POST", "/reset_prefix_cache", self._reset_prefix_cache),
            ("POST", "/sim/kv/pull", self._side_channel_pull),
            ("GET", "/sim/nixl/handshake", self._nixl_handshake),
            ("POST", "/sim/kv/heartbeat", self._side_channel_heartbeat),
        ]
        # serve() cancels the handler of a client that hangs up, which aborts its request, as in vLLM
        self._runner, self.port = await serve(make_app(routes), s.host, s.port, reuse_address=True)
        self.engine.side_channel = (self._advertised_host(), self.port)
        self.engine.start()
        logger.info("sim worker (%s) serving %s at %s", s.role, s.served_model_name, self.url)
        return self.port

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
            if self.engine.transport is not None:
                await self.engine.transport.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.close)
            self.publisher = None

    async def __aenter__(self) -> SimWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------ simple endpoints
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VLLM_VERSION})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        name = self.settings.served_model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": str(self.settings.model),
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        if not self.engine.reset_prefix_cache():
            return ApiError("Failed to reset prefix cache: requests are running", 500, "InternalServerError").response()
        return web.Response(status=200)

    async def _side_channel_pull(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        try:
            body = await request.json()
            return web.json_response(self.engine.serve_pull(body))
        except KeyError as exc:
            return web.json_response(
                {"error": f"no KV lease for request {exc.args[0]} (unknown or expired)"}, status=404
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _side_channel_heartbeat(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        try:
            body = await request.json()
            n = self.engine.extend_leases(str(body["remote_engine_id"]), [str(r) for r in body["request_ids"]])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"extended": n})

    async def _nixl_handshake(self, request: web.Request) -> web.Response:
        transport = self.engine.transport if self.engine is not None else None
        if not isinstance(transport, NixlTransport):
            return web.json_response({"error": "this worker does not use the nixl transport"}, status=404)
        return web.json_response(transport.handshake())

    def _make_transport(self, sim_bytes_per_block: int) -> KVTransport:
        s = self.settings
        assert self._session is not None and self.engine is not None
        if s.kv_transport == "nixl":
            return NixlTransport(
                self.engine.engine_id,
                s.kv_capacity_blocks,
                s.block_size,
                self._session,
                wire_bytes_per_block=s.kv_wire_bytes_per_block,
                sim_bytes_per_block=sim_bytes_per_block,
                on_read_done=self.engine.on_remote_read_done,
            )
        return HttpTransport(self._session)

    # -------------------------------------------------------------------------- generation API
    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"Invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError("Request body must be a JSON object")
        try:
            model = body.get("model")
            if model is not None and model != self.settings.served_model_name:
                raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
            try:  # the same vLLM-equal parameter checks as the frontend's: one home for what vLLM refuses
                validate_request(request.path, body)
            except RequestError as exc:
                raise ApiError(exc.message, exc.status, param=exc.param) from None
        except ApiError:
            self._release_rejected(body.get("kv_transfer_params"))
            raise
        return body

    def _release_rejected(self, params: object) -> None:
        """A refused request with a prefill's KV params frees that prefill's blocks, as vLLM 0.26/0.32's
        ``_with_kv_transfer_rejection_cleanup`` does (the frontend's seeding release relies on it)."""
        if isinstance(params, dict) and self.engine is not None:
            task = asyncio.create_task(self.engine.release_rejected(params))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _common(self, body: dict[str, Any]) -> dict[str, Any]:
        """Options shared by every choice of a request (stop, P/D params, cache salt, stream options)."""
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError("stop must be a string or a list of strings", param="stop")
        params = body.get("kv_transfer_params")
        if params is not None and not isinstance(params, dict):
            raise ApiError("kv_transfer_params must be an object", param="kv_transfer_params")
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ApiError("cache_salt must be a string", param="cache_salt")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError("stream_options must be an object", param="stream_options")
        if stream_options and not body.get("stream"):
            raise ApiError("Stream options can only be defined when `stream=True`.", param="stream_options")
        return {
            "stop": stop,
            "kv_transfer_params": dict(params) if params else None,
            "cache_salt": salt,
            "include_usage": bool(stream_options.get("include_usage")),
            "continuous_usage": bool(stream_options.get("continuous_usage_stats")),
        }

    async def _tokenize_text(self, text: str, requested: int | None, add_special_tokens: bool) -> list[int]:
        """vLLM's length checks around tokenization; the tokenizing itself runs in a worker thread."""
        check_prompt_chars(text, requested, self.max_model_len, self.tokenizer.max_chars_per_token)
        ids = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        check_prompt_tokens(len(ids), requested, self.max_model_len, truncated=True)
        return ids

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            raw_prompts = completion_prompts(body, self.tokenizer.vocab_size)
            sampling = sampling_options(body, chat=False, default_temperature=DEFAULT_TEMPERATURE)
            requested, key = requested_max_tokens(body, chat=False)
            if requested == 0 and not sampling.echo:
                raise ApiError("max_tokens must be at least 1, got 0.", param="max_tokens")
            check_max_tokens(requested, key, self.max_model_len)
            self._common(body)
            prompts: list[_Prompt] = []
            for raw in raw_prompts:
                if isinstance(raw, str):
                    ids = await self._tokenize_text(raw, requested, bool(body.get("add_special_tokens", True)))
                    prompts.append(_Prompt(ids, raw))
                else:
                    check_prompt_tokens(len(raw), requested, self.max_model_len, truncated=False)
                    text = self.tokenizer.decode(raw, skip_special_tokens=False) if sampling.echo else ""
                    prompts.append(_Prompt(list(raw), text))
        except ApiError as err:
            return err.response()
        call = _Call(self, f"cmpl-{self._base_id(request)}", body, sampling, requested, chat=False)
        return await call.run(request, prompts)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError("messages must be a non-empty list", param="messages")
            kwargs = body.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise ApiError("chat_template_kwargs must be an object", param="chat_template_kwargs")
            sampling = sampling_options(body, chat=True, default_temperature=DEFAULT_TEMPERATURE)
            requested, key = requested_max_tokens(body, chat=True)
            if requested == 0:
                raise ApiError("max_tokens must be at least 1, got 0.", param=key)
            check_max_tokens(requested, key, self.max_model_len)
            self._common(body)
            render = functools.partial(
                self.tokenizer.render_chat,
                messages,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                tools=body.get("tools"),
                documents=body.get("documents"),
                chat_template_kwargs=kwargs,
            )
            try:
                text = await asyncio.to_thread(render)
            except PromptError as exc:
                raise ApiError(str(exc), param="messages") from exc
            # vLLM 0.26 takes chat ids straight from the rendered template and never adds special tokens.
            ids = await self._tokenize_text(text, requested, False)
        except ApiError as err:
            return err.response()
        call = _Call(self, f"chatcmpl-{self._base_id(request)}", body, sampling, requested, chat=True)
        return await call.run(request, [_Prompt(ids, text)])

    @staticmethod
    def _base_id(request: web.Request) -> str:
        return request.headers.get("X-Request-Id") or uuid.uuid4().hex


async def serve_sim_worker(settings: SimSettings, ready: asyncio.Event | None = None) -> None:
    """Run a simulated worker until cancelled (SIGINT/SIGTERM in the CLI)."""
    worker = SimWorker(settings)
    await worker.start()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(worker.stop())
