"""Serving a route table over aiohttp the way every pdkit HTTP process does (the frontend, the sim worker).

Both processes stand in for vLLM's OpenAI server, so they share its transport rules: request bodies up to
64 MiB (long prompts sent as token ids), no access log (one line per request would drown the process's
own log), signals left to the CLI that owns the event loop, and ``handler_cancellation`` -- a client that
hangs up cancels its handler, which is how an engine learns to abort a request (and how the frontend
closes the upstream connection that tells vLLM so).  Keeping these in one place keeps the two servers
from drifting apart on them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (method, path, handler); "GET" routes also answer HEAD, as aiohttp's add_get does
Route = tuple[str, str, Handler]

MAX_BODY_BYTES = 64 * 1024 * 1024


def make_app(routes: Iterable[Route], middlewares: Sequence[Any] = ()) -> web.Application:
    """An application serving ``routes`` with pdkit's body limit and the given middlewares."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=list(middlewares))
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
    return app


async def serve(app: web.Application, host: str, port: int, **site_options: Any) -> tuple[web.AppRunner, int]:
    """Bind ``host:port`` (port 0 = any free port) and serve ``app``; returns the runner and the bound port.

    A failed bind (``OSError``) cleans the runner up before it propagates, so the caller holds either a
    serving runner or nothing.  ``site_options`` go to :class:`aiohttp.web.TCPSite` (backlog, reuse_address).
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, **site_options)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
