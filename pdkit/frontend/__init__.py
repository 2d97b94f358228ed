"""The pdkit frontend: OpenAI-compatible HTTP API, P→D orchestration, ZMQ worker registry, routing.

``from pdkit.frontend import Frontend, FrontendSettings`` is resolved lazily so that importing the
package (e.g. for the CLI's option definitions) does not pull in aiohttp and prometheus-client.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Frontend", "FrontendSettings"]


def __getattr__(name: str) -> Any:
    if name == "Frontend":
        from pdkit.frontend.server import Frontend

        return Frontend
    if name == "FrontendSettings":
        from pdkit.frontend.settings import FrontendSettings

        return FrontendSettings
    raise AttributeError(name)
