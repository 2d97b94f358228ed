"""pdkit.routing.block_hash against vLLM 0.26.0's own prefix-cache hashing (real vLLM functions)."""

from __future__ import annotations

import random

import pytest
from vllm_versions import gap_since_vllm

from pdkit.routing.block_hash import BlockHasher, get_hash_fn, none_hash, to_event_hash

pytestmark = pytest.mark.vllm


def _tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


@pytest.fixture
def kcu(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("vllm")
    from vllm.v1.core import kv_cache_utils

    return kv_cache_utils


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_none_hash_matches_vllm(kcu, monkeypatch: pytest.MonkeyPatch, algo: str) -> None:
    from vllm.utils.hashing import get_hash_fn_by_name

    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    kcu.init_none_hash(get_hash_fn_by_name(algo))
    assert kcu.NONE_HASH == none_hash(algo, "1234")


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_request_block_hashes_match_vllm(kcu, monkeypatch: pytest.MonkeyPatch, algo: str, block_size: int) -> None:
    """Same chain as vLLM's request block hasher on a real vllm Request, incl. a partial tail block."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.request import Request

    monkeypatch.setenv("PYTHONHASHSEED", "42")
    fn = get_hash_fn_by_name(algo)
    kcu.init_none_hash(fn)
    tokens = _tokens(5 * block_size + 7)
    req = Request(
        "r",
        tokens,
        SamplingParams(max_tokens=4),
        None,
        block_hasher=kcu.get_request_block_hasher(block_size, fn),
    )
    ours = BlockHasher(block_size, algo, "42").block_hashes(tokens)
    assert len(ours) == 5
    assert list(req.block_hashes) == ours


@gap_since_vllm("0.32", "0.32 hashes extra keys as ('lora', name, path) / ('cache_salt', salt); BlockHasher: 0.26's")
def test_cache_salt_and_lora_extra_keys_match_vllm(kcu, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.utils.hashing import sha256
    from vllm.v1.request import Request

    monkeypatch.setenv("PYTHONHASHSEED", "7")
    kcu.init_none_hash(sha256)
    tokens = _tokens(48, seed=3)
    req = Request(
        "r",
        tokens,
        SamplingParams(max_tokens=4),
        None,
        lora_request=LoRARequest("adapter-a", 1, "/nonexistent"),
        cache_salt="tenant-1",
        block_hasher=kcu.get_request_block_hasher(16, sha256),
    )
    ours = BlockHasher(16, "sha256", "7").block_hashes(tokens, cache_salt="tenant-1", lora_name="adapter-a")
    assert list(req.block_hashes) == ours
    plain = BlockHasher(16, "sha256", "7").block_hashes(tokens)
    assert plain[0] != ours[0]


def test_incremental_extension_equals_full(kcu) -> None:
    h = BlockHasher(16, "sha256", "0")
    tokens = _tokens(100)
    first = h.block_hashes(tokens[:40])
    assert h.block_hashes(tokens, start=first) == h.block_hashes(tokens)


def test_event_hash_conversion_matches_vllm(kcu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    h = BlockHasher(16, "sha256", "0").block_hashes(_tokens(64))
    assert [kcu.maybe_convert_block_hash(x) for x in h] == [to_event_hash(x) for x in h]
    assert all(0 <= to_event_hash(x) < 2**64 for x in h)
    assert to_event_hash(h[0], use_int=False) == h[0]


def test_hash_fn_equals_vllm_for_chain_tuple(kcu) -> None:
    from vllm.utils.hashing import sha256, sha256_cbor

    obj = (b"\x01" * 32, (1, 2, 3, 70000, 2**31 - 1), None)
    assert get_hash_fn("sha256")(obj) == sha256(obj)
    assert get_hash_fn("sha256_cbor")(obj) == sha256_cbor(obj)


def test_no_seed_gives_random_root_like_vllm() -> None:
    a = BlockHasher(16, "sha256", None, use_env_seed=False)
    b = BlockHasher(16, "sha256", None, use_env_seed=False)
    assert a.root != b.root  # why every deployment must pin PYTHONHASHSEED
    with pytest.raises(ValueError):
        get_hash_fn("md5")
