"""KV-event wire format and publisher vs the installed vLLM (0.26, 0.32, 0.33): real msgspec structs, ZMQ."""

from __future__ import annotations

import time

import pytest
import zmq
from vllm_versions import only_vllm, same_kv_event_wire

from pdkit.routing import kv_events as ours


def _sample_events(mod):
    return [
        mod.BlockStored(
            block_hashes=[2**63 + 5, 17],
            parent_block_hash=None,
            token_ids=list(range(32)),
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[None, None],
            group_idx=0,
        ),
        mod.BlockStored(
            block_hashes=[b"\x00" * 32],
            parent_block_hash=17,
            token_ids=[1] * 16,
            block_size=16,
            lora_id=3,
            medium="CPU",
            lora_name="a",
        ),
        mod.BlockRemoved(block_hashes=[17], medium="GPU", group_idx=0),
        mod.BlockRemoved(block_hashes=[18], medium=None),
        mod.AllBlocksCleared(),
    ]


@pytest.fixture
def vk():
    pytest.importorskip("vllm")
    from vllm.distributed import kv_events

    return kv_events


@pytest.mark.vllm
@pytest.mark.parametrize("dp_rank", [None, 0, 2])
def test_encoding_is_byte_identical_to_vllm(vk, dp_rank) -> None:
    import msgspec

    theirs = vk.KVEventBatch(ts=1234.5, events=_sample_events(vk), data_parallel_rank=dp_rank)
    mine = ours.KVEventBatch(ts=1234.5, events=_sample_events(ours), data_parallel_rank=dp_rank)
    their_bytes = msgspec.msgpack.Encoder().encode(theirs)
    assert same_kv_event_wire(ours.encode_batch(mine), their_bytes)
    # and each side decodes the other's bytes to equal structures
    decoded = msgspec.msgpack.Decoder(vk.KVEventBatch).decode(ours.encode_batch(mine))
    assert decoded == theirs
    assert ours.decode_batch(their_bytes) == mine


@pytest.mark.vllm
@only_vllm("0.26", "0.32 appends defaulted BlockStored fields (ownership, ...); the byte-level test covers 0.32")
def test_struct_fields_match_vllm(vk) -> None:
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventBatch"):
        assert getattr(ours, name).__struct_fields__ == getattr(vk, name).__struct_fields__, name
    assert ours.END_SEQ == vk.ZmqEventPublisher.END_SEQ


def _sub(ctx: zmq.Context, endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    return sub


def _recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing received"
    return sock.recv_multipart()


def _publish_until_received(pub: ours.KVEventPublisher, sub: zmq.Socket) -> list[bytes]:
    """PUB/SUB drops messages sent before the subscription is live: send probes until one arrives."""
    for _ in range(100):
        pub.publish_events([ours.AllBlocksCleared()])
        if sub.poll(50):
            return sub.recv_multipart()
    raise AssertionError("subscriber never connected")


@pytest.mark.vllm
def test_publisher_frames_decode_with_vllm(vk) -> None:
    import msgspec

    ctx = zmq.Context.instance()
    pub = ours.KVEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", topic="w1", bind=True)
    sub = _sub(ctx, pub.endpoint)
    try:
        _publish_until_received(pub, sub)
        pub.publish(ours.KVEventBatch(ts=time.time(), events=_sample_events(ours)))
        topic, seq_raw, payload = _recv(sub)
        assert topic == b"w1"
        seq = ours.seq_from_bytes(seq_raw)
        batch = msgspec.msgpack.Decoder(vk.KVEventBatch).decode(payload)
        assert batch.data_parallel_rank == 0  # stamped like vLLM's publisher
        assert [type(e).__name__ for e in batch.events] == [
            "BlockStored",
            "BlockStored",
            "BlockRemoved",
            "BlockRemoved",
            "AllBlocksCleared",
        ]
        assert batch.events[0].block_hashes == [2**63 + 5, 17]
        # replay everything from the first probe on, through a DEALER
        replayed = list(ours.request_replay(ctx, pub.replay_endpoint, 0))
        assert [s for _, s, _ in replayed] == list(range(seq + 1))
        assert replayed[-1][2] == ours.decode_batch(payload)
        assert list(ours.request_replay(ctx, pub.replay_endpoint, seq + 1)) == []
    finally:
        sub.close(0)
        pub.close()


def _bound_sub(ctx: zmq.Context) -> tuple[zmq.Socket, str]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:0")
    return sub, sub.getsockopt_string(zmq.LAST_ENDPOINT)


@pytest.mark.vllm
def test_vllm_publisher_and_ours_send_identical_frames(vk) -> None:
    """vLLM's own ZmqEventPublisher and ours, same batch: identical frames on the wire.

    Both publishers connect (no wildcard in the endpoint) to SUB sockets bound on loopback.
    """
    ctx = zmq.Context.instance()
    s1, ep1 = _bound_sub(ctx)
    s2, ep2 = _bound_sub(ctx)
    theirs = vk.ZmqEventPublisher(0, endpoint=ep1, replay_endpoint=None, topic="t")
    mine = ours.KVEventPublisher(ep2, topic="t")
    try:
        for _ in range(100):  # wait until both connections are live
            theirs.publish(vk.KVEventBatch(ts=0.0, events=[]))
            if s1.poll(50):
                s1.recv_multipart()
                break
        _publish_until_received(mine, s2)
        theirs.publish(vk.KVEventBatch(ts=9.0, events=_sample_events(vk)))
        mine.publish(ours.KVEventBatch(ts=9.0, events=_sample_events(ours)))
        f1, f2 = _recv(s1), _recv(s2)
        assert f1[0] == f2[0] and same_kv_event_wire(f2[2], f1[2])
        assert len(f1[1]) == len(f2[1]) == 8
    finally:
        s1.close(0)
        s2.close(0)
        theirs.shutdown()
        mine.close()


def test_bind_heuristic_is_vllms() -> None:
    assert ours.should_bind("tcp://*:5557")
    assert ours.should_bind("tcp://[::]:5557") or ours.should_bind("tcp://:::5557")
    assert ours.should_bind("ipc:///tmp/x")
    assert not ours.should_bind("tcp://10.0.0.1:5557")


def test_connect_mode_reaches_a_bound_subscriber() -> None:
    """The frontend may bind one SUB socket and let every worker's publisher connect to it."""
    ctx = zmq.Context.instance()
    sub, ep = _bound_sub(ctx)
    pub = ours.KVEventPublisher(ep, topic="worker-7")
    try:
        topic, _, payload = _publish_until_received(pub, sub)
        assert topic == b"worker-7"
        assert isinstance(ours.decode_batch(payload).events[0], ours.AllBlocksCleared)
    finally:
        sub.close(0)
        pub.close()


def test_publish_after_close_raises() -> None:
    pub = ours.KVEventPublisher("tcp://127.0.0.1:0", bind=True)
    pub.close()
    with pytest.raises(RuntimeError):
        pub.publish_events([ours.AllBlocksCleared()])
