"""The ZMQ registry wire format (pdkit.protocol): JSON frames, discriminated by type, version 2."""

from __future__ import annotations

import json

import pytest

from pdkit.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Deregister,
    Heartbeat,
    Load,
    ProtocolError,
    Register,
    WorkerInfo,
    encode,
    parse_message,
)

INFO = WorkerInfo(
    worker_id="prefill-0",
    role="prefill",
    url="http://127.0.0.1:8200/",
    model="synth",
    engine="sim",
    nixl_side_channel="127.0.0.1:5600",
    kv_events_endpoint="tcp://127.0.0.1:8101",
    kv_events_topic="prefill-0",
    block_size=16,
    pid=1234,
)


@pytest.mark.parametrize(
    "msg",
    [
        Register(token="t", worker=INFO),
        Heartbeat(token=None, worker_id="prefill-0", seq=7, load=Load(running=3, waiting=1, kv_usage=0.5)),
        Deregister(token="t", worker_id="prefill-0", reason="agent stopping"),
        Ack(ok=False, error="unknown worker x: register again", heartbeat_interval_s=1.0),
    ],
)
def test_round_trip(msg: object) -> None:
    raw = encode(msg)  # type: ignore[arg-type]
    assert parse_message(raw) == msg
    data = json.loads(raw)  # plain JSON, one object, with type and version
    assert data["type"] == msg.type and data["version"] == PROTOCOL_VERSION


def test_wire_shape_matches_architecture_doc() -> None:
    data = json.loads(encode(Register(token="t", worker=INFO)))
    assert set(data) == {"type", "version", "token", "worker", "session_key"}
    assert set(data["worker"]) == {
        "worker_id", "role", "url", "model", "engine", "nixl_side_channel", "kv_events_endpoint",
        "kv_events_replay_endpoint", "kv_events_topic", "block_size", "prefix_caching", "max_model_len", "pid",
        "engine_version", "nixl_mode",
    }  # fmt: skip
    assert data["worker"]["url"] == "http://127.0.0.1:8200"  # trailing slash dropped
    hb = json.loads(encode(Heartbeat(worker_id="w", seq=1)))
    assert set(hb) == {"type", "version", "token", "worker_id", "session_key", "seq", "load"}
    assert set(hb["load"]) == {
        "running", "waiting", "kv_usage", "prefix_cache_hits", "prefix_cache_queries", "lmcache_hit_tokens",
        "healthy", "unhealthy_reason",
    }  # fmt: skip
    ack = json.loads(encode(Ack()))
    assert set(ack) == {
        "type", "version", "ok", "error", "heartbeat_interval_s", "worker_id", "session_key", "reregister",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"not json", "invalid message"),
        (b"[1, 2]", "invalid message"),
        (b'{"type": "launch_missiles"}', "does not match"),
        (b'{"type": "heartbeat", "version": 2}', "worker_id"),
        (b'{"type": "heartbeat", "version": 1, "worker_id": "w"}', "protocol version 1 not supported"),
        (b'{"type": "heartbeat", "version": 3, "worker_id": "w"}', "protocol version 3 not supported"),
        (
            b'{"type": "register", "version": 2, "worker": {"worker_id": "w", "role": "boss", "url": "http://h:1",'
            b' "model": "m"}}',
            "role",
        ),  # fmt: skip
        (
            b'{"type": "register", "version": 2, "worker": {"worker_id": "w", "role": "decode", "url": "ftp://h",'
            b' "model": "m"}}',
            "url",
        ),  # fmt: skip
        (b"{" + b" " * 70000 + b"}", "exceeds"),
    ],
)
def test_invalid_frames_raise_protocol_error(raw: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        parse_message(raw)
    assert issubclass(ProtocolError, ValueError)  # the agent catches ValueError


def test_pickle_is_never_accepted() -> None:
    import pickle

    with pytest.raises(ProtocolError):
        parse_message(pickle.dumps({"type": "heartbeat", "version": 1, "worker_id": "w"}))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = b'{"type": "heartbeat", "version": 2, "worker_id": "w", "seq": 2, "new_field": 5}'
    msg = parse_message(raw)
    assert isinstance(msg, Heartbeat) and msg.seq == 2
