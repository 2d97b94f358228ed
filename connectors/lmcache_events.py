"""LMCache's stored chunks as KV events the frontend can read: the ``medium`` label, normalised.

LMCache reports a stored chunk as a ``BlockStored`` whose ``medium`` is its backend's own spelling
(``"cpu"``, ``"LocalCPUBackend"``, ``"disk"``, ``"LocalDiskBackend"``, a remote URL scheme, ...), while
vLLM's own GPU prefix-cache events say ``"GPU"`` and pdkit's KV index (``pdkit/routing/kv_events.py``)
keys tiers by ``"CPU"``/``"DISK"``.  Normalising here, where the events leave the engine, keeps every
consumer free of LMCache's naming.  No vllm import: the events are rewritten through ``msgspec``.

Note what the hashes are: LMCache chunk hashes (one event per stored chunk, ``block_size`` = LMCache's
chunk size), not vLLM block hashes; the frontend must treat them as LMCache's namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

CPU = "CPU"
DISK = "DISK"
REMOTE = "REMOTE"


def normalize_medium(medium: str | None) -> str:
    """Map LMCache's backend spelling to ``CPU``, ``DISK`` or ``REMOTE`` (unknown: upper-cased).

    ``None`` means LMCache did not say; its default tier is local CPU memory.
    """
    if not medium:
        return CPU
    low = medium.lower()
    if "cpu" in low or low in ("host", "pinned", "local"):
        return CPU
    if "disk" in low or low.startswith("file") or "fs" == low or "gds" in low:
        return DISK
    if "remote" in low or "://" in low or low in ("lm", "redis", "mooncake", "s3", "p2p"):
        return REMOTE
    return medium.upper()


def relabel_events(events: Iterable[Any]) -> Iterator[Any]:
    """Yield ``events`` with the medium of every block event (stored or removed) normalised.

    Events without a ``medium`` field (``AllBlocksCleared``) pass unchanged.
    """
    for event in events:
        if isinstance(event, msgspec.Struct) and "medium" in event.__struct_fields__:
            medium = event.medium  # type: ignore[attr-defined]
            wanted = normalize_medium(medium)
            if wanted != medium:
                event = msgspec.structs.replace(event, medium=wanted)
        yield event
