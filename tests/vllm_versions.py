"""Which vLLM Python layer the tests run against (scripts/test.sh runs them on 0.26.0 and 0.32.0).

Tests that hold for one release only are marked with :func:`only_vllm` and skipped, with the reason, on
the other; the version comes from package metadata, like pdkit's own plan (pdkit/stack.py).
"""

from __future__ import annotations

import pytest

from pdkit.stack import installed_version, parse_version

VLLM = installed_version("vllm")
VLLM_MINOR = parse_version(VLLM)[:2] if VLLM else None


def only_vllm(minor: str, reason: str) -> pytest.MarkDecorator:
    """Skip unless the installed vLLM is release ``minor`` (e.g. "0.26"); ``reason`` says what differs."""
    wanted = parse_version(minor)[:2]
    return pytest.mark.skipif(VLLM_MINOR != wanted, reason=f"vLLM {minor} only (installed: {VLLM}): {reason}")


def since_vllm(minor: str, reason: str) -> pytest.MarkDecorator:
    """Skip on vLLM releases before ``minor`` (a hook or field that release added)."""
    wanted = parse_version(minor)[:2]
    return pytest.mark.skipif(VLLM_MINOR is None or VLLM_MINOR < wanted, reason=f"needs vLLM >= {minor}: {reason}")


def gap_since_vllm(minor: str, reason: str) -> pytest.MarkDecorator:
    """Expected to fail from vLLM ``minor`` on: pdkit does not follow that release there yet (``reason``).

    Strict, so the test reports XPASS (and fails) the day pdkit catches up and the mark must go.
    """
    wanted = parse_version(minor)[:2]
    return pytest.mark.xfail(
        VLLM_MINOR is not None and VLLM_MINOR >= wanted, reason=f"pdkit gap on vLLM >= {minor}: {reason}", strict=True
    )


def same_kv_event_wire(mine: bytes, theirs: bytes) -> bool:
    """pdkit's KV-event bytes say what the installed vLLM's say: byte for byte up to 0.32; from 0.33 on,
    the same msgpack document.  Why the difference: vLLM 0.33's ``BlockStored`` has 15 fields (+ the tag),
    so msgspec (``omit_defaults``, it cannot count ahead) writes a map16 header where pdkit's 12-field
    struct gets a fixmap; every msgpack reader (vLLM's decoder included) reads both alike, and pdkit's
    decoder ignores the three new keys (ownership, session_id, lookahead_token_ids)."""
    import msgspec

    if VLLM_MINOR is not None and VLLM_MINOR >= (0, 33):
        return msgspec.msgpack.decode(mine) == msgspec.msgpack.decode(theirs)
    return mine == theirs
