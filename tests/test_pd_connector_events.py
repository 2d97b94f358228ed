"""LMCache medium names normalised to the tiers pdkit's KV index knows (CPU/DISK/REMOTE)."""

from __future__ import annotations

import msgspec
import pytest

from pdkit.connectors.lmcache_events import normalize_medium, relabel_events


@pytest.mark.parametrize(
    ("medium", "expected"),
    [
        ("cpu", "CPU"),
        ("LocalCPUBackend", "CPU"),
        (None, "CPU"),
        ("disk", "DISK"),
        ("LocalDiskBackend", "DISK"),
        ("file:///tmp/x", "DISK"),
        ("lm://host:65432", "REMOTE"),
        ("RemoteBackend", "REMOTE"),
        ("GPU", "GPU"),
    ],
)
def test_normalize_medium(medium: str | None, expected: str) -> None:
    assert normalize_medium(medium) == expected


def test_relabel_real_vllm_events() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    stored = kv_events.BlockStored(
        block_hashes=[1],
        parent_block_hash=None,
        token_ids=[1, 2],
        block_size=2,
        lora_id=None,
        medium="cpu",
        lora_name=None,
    )
    removed = kv_events.BlockRemoved(block_hashes=[1], medium="LocalDiskBackend")
    cleared = kv_events.AllBlocksCleared()
    out = list(relabel_events([stored, removed, cleared]))
    assert [getattr(e, "medium", None) for e in out] == ["CPU", "DISK", None]
    assert out[2] is cleared
    assert isinstance(out[0], msgspec.Struct) and out[0].block_hashes == [1]  # type: ignore[attr-defined]
