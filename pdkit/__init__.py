"""pdkit: one-command disaggregated prefill/decode serving on vLLM.

``from pdkit import kv_transfer_config`` gives the right vLLM KV-connector configuration per role
(prefill, decode, agg) without the CLI and without vllm installed.  Nothing here imports vllm at
module import time: the CLI, frontend and supervisor run on machines without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["kv_transfer_config", "RoleKVConfig", "__version__"]

if TYPE_CHECKING:
    from pdkit.kv_config import RoleKVConfig, kv_transfer_config


def __getattr__(name: str) -> Any:
    # Lazy: vLLM imports pdkit.connectors inside its processes; that must not pull in pydantic models,
    # YAML and the CLI.
    if name in ("kv_transfer_config", "RoleKVConfig"):
        from pdkit import kv_config

        return getattr(kv_config, name)
    raise AttributeError(f"module 'pdkit' has no attribute {name!r}")
