"""A *stub* OpenAI-style streaming server for the benchmark tests (not a simulator, not vLLM).

Why a stub next to the real simulator: the benchmark must count every way a request can fail -- an
HTTP error, an error event inside a 200 stream (what vLLM sends when a request dies after it started),
a connection dropped mid-stream, an answer that never comes -- and the simulator, being correct, does
none of these on demand.  Each request takes the next behaviour from ``modes`` (cycled).  Optionally it
plays a NIXL decode worker: after every successful request it records one transfer of ``xfer_bytes``
bytes taking ``xfer_s`` seconds in vLLM's own ``NixlPromMetrics`` and serves them on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from aiohttp import web
from tokenizers import Tokenizer

from pdkit.model_files import default_model_dir

MODES = ("ok", "http500", "stream_error", "drop", "hang")


class StubOpenAIServer:
    def __init__(self, modes: tuple[str, ...] = ("ok",), xfer_bytes: int = 0, xfer_s: float = 0.0) -> None:
        self._modes = itertools.cycle(modes)
        self.tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
        self.seen: list[dict[str, Any]] = []
        self.xfer_bytes, self.xfer_s = xfer_bytes, xfer_s
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._nixl: Any = None
        self._registry: Any = None
        if xfer_bytes:
            self._setup_nixl_metrics()

    def _setup_nixl_metrics(self) -> None:
        from types import SimpleNamespace

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlPromMetrics

        reg = CollectorRegistry()

        def bound(cls: Any) -> Any:
            class Bound(cls):
                def __init__(self, *a: Any, **kw: Any) -> None:
                    super().__init__(*a, registry=reg, **kw)

            return Bound

        types: Any = {Histogram: bound(Histogram), Counter: bound(Counter), Gauge: bound(Gauge)}
        config: Any = SimpleNamespace(kv_transfer_config=None)  # the only field the base class reads
        self._registry = reg
        self._nixl = NixlPromMetrics(config, types, ["model_name", "engine"], {0: ["stub", "0"]})

    def _record_transfer(self) -> None:
        if self._nixl is None:
            return
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats

        stats = NixlKVConnectorStats()
        stats.data["transfer_duration"].append(self.xfer_s)
        stats.data["post_duration"].append(self.xfer_s / 10)
        stats.data["bytes_transferred"].append(self.xfer_bytes)
        stats.data["num_descriptors"].append(64)
        self._nixl.observe(stats.data, 0)

    async def __aenter__(self) -> StubOpenAIServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import generate_latest

        body = generate_latest(self._registry) if self._registry is not None else b""
        return web.Response(body=body, content_type="text/plain")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        mode = next(self._modes)
        if mode == "http500":
            return web.json_response({"error": {"message": "Internal server error", "code": 500}}, status=500)
        if mode == "hang":
            await asyncio.sleep(3600)
        prompt = body.get("prompt", "")
        n_prompt = len(self.tok.encode(prompt).ids) if isinstance(prompt, str) else 0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(body["max_tokens"])
        for i in range(n):
            if mode == "stream_error" and i == 1:
                await resp.write(b'data: {"error": {"message": "KV load failed", "code": 500}}\n\n')
                await resp.write(b"data: [DONE]\n\n")
                return resp
            if mode == "drop" and i == 1:
                assert request.transport is not None
                request.transport.close()
                return resp
            choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
            await asyncio.sleep(0)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        self._record_transfer()
        return resp
