"""Prefix-cache block hashes, computed the way vLLM 0.26.0 computes them.

Why: KV-aware routing predicts, per request, which blocks a worker already holds.  The worker
announces its blocks in KV events by hash, so the router must compute *the same* hashes from the same
token ids -- byte for byte -- or every prediction misses.  vLLM's scheme (``vllm/v1/core/
kv_cache_utils.py``) is a hash chain over full blocks::

    h_0 = H((NONE_HASH, tuple(block_0_tokens), extra_keys_0))
    h_i = H((h_{i-1},   tuple(block_i_tokens), extra_keys_i))

where ``H`` is the prefix-caching hash function (``--prefix-caching-hash-algo``, default ``sha256``:
``sha256(pickle.dumps(obj, HIGHEST_PROTOCOL))``), only *full* blocks are hashed, and ``NONE_HASH`` is
``H(PYTHONHASHSEED)`` when that variable is set and **random per process** otherwise.  Consequence for a
deployment: the frontend and every worker must share one ``PYTHONHASHSEED``, or predicted hashes never
match the announced ones.

KV events carry the hashes converted to 64-bit ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the
default): the last 8 bytes of the digest read big-endian.  :func:`to_event_hash` does that conversion.

This module never imports vLLM; the tests prove equality against vLLM's own functions.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGO: HashAlgo = "sha256"

_U64 = (1 << 64) - 1


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    import cbor2  # optional: only needed for the cbor algorithms

    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _xxhash_pickle(obj: Any) -> bytes:
    import xxhash  # optional

    return bytes(xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))


def _xxhash_cbor(obj: Any) -> bytes:
    import cbor2
    import xxhash

    return bytes(xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True)))


_HASH_FNS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
    "xxhash": _xxhash_pickle,
    "xxhash_cbor": _xxhash_cbor,
}


def get_hash_fn(algo: str) -> Callable[[Any], bytes]:
    """The hash function vLLM uses for ``--prefix-caching-hash-algo algo``."""
    try:
        return _HASH_FNS[algo]
    except KeyError:
        raise ValueError(f"unsupported prefix-caching hash algorithm {algo!r}; choose one of {HASH_ALGOS}") from None


def none_hash(algo: str = DEFAULT_HASH_ALGO, hash_seed: str | None = None) -> bytes:
    """The chain's root (vLLM's ``NONE_HASH``): ``H(hash_seed)``; random bytes when no seed is given.

    ``hash_seed`` is the *string* value of ``PYTHONHASHSEED`` (vLLM hashes the string, not an int).
    """
    if hash_seed is None:
        return os.urandom(32)
    return get_hash_fn(algo)(hash_seed)


def hash_block_tokens(
    hash_fn: Callable[[Any], bytes],
    parent_hash: bytes | None,
    root_hash: bytes,
    block_token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> bytes:
    """One link of the chain; ``parent_hash`` None (or empty) means the first block of a prompt."""
    parent = parent_hash if parent_hash else root_hash
    return hash_fn((parent, tuple(block_token_ids), extra_keys))


def to_event_hash(block_hash: bytes, use_int: bool = True) -> int | bytes:
    """A block hash as KV events carry it: the low 64 bits as an int (vLLM's default), else raw bytes."""
    if not use_int:
        return block_hash
    return int.from_bytes(block_hash, byteorder="big") & _U64


class BlockHasher:
    """Computes a token sequence's block hashes exactly as one vLLM worker does.

    ``hash_seed`` defaults to this process's ``PYTHONHASHSEED`` (like vLLM); pass the deployment's seed
    explicitly in a frontend.  ``cache_salt`` and ``lora_name`` reproduce vLLM's extra keys (LoRA name
    on every block, salt on the first block only); multimodal and prompt-embedding keys are not
    supported (pdkit serves text).
    """

    def __init__(
        self,
        block_size: int = 16,
        algo: str = DEFAULT_HASH_ALGO,
        hash_seed: str | None = None,
        *,
        use_env_seed: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if hash_seed is None and use_env_seed:
            hash_seed = os.environ.get("PYTHONHASHSEED")
        self.block_size = block_size
        self.algo = algo
        self.hash_seed = hash_seed
        self.hash_fn = get_hash_fn(algo)
        self.root = none_hash(algo, hash_seed)

    def extra_keys(self, block_index: int, cache_salt: str | None, lora_name: str | None) -> tuple[Any, ...] | None:
        """vLLM's per-block extra keys: ``lora_name`` first, then the salt on block 0 only."""
        keys: list[Any] = []
        if lora_name:
            keys.append(lora_name)
        if block_index == 0 and cache_salt:
            keys.append(cache_salt)
        return tuple(keys) if keys else None

    def block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        lora_name: str | None = None,
        start: list[bytes] | None = None,
    ) -> list[bytes]:
        """Hashes of every *full* block of ``token_ids`` (a trailing partial block is not hashed).

        ``start``: hashes already computed for a prefix of ``token_ids`` (extended incrementally, as
        vLLM does when a request's output grows); the returned list includes them.
        """
        out = list(start or [])
        bs = self.block_size
        parent = out[-1] if out else None
        for i in range(len(out), len(token_ids) // bs):
            h = hash_block_tokens(
                self.hash_fn,
                parent,
                self.root,
                token_ids[i * bs : (i + 1) * bs],
                self.extra_keys(i, cache_salt, lora_name),
            )
            out.append(h)
            parent = h
        return out

    def event_hashes(self, token_ids: Sequence[int], use_int: bool = True, **kw: Any) -> list[int | bytes]:
        """Block hashes in the form KV events carry them (see :func:`to_event_hash`)."""
        return [to_event_hash(h, use_int) for h in self.block_hashes(token_ids, **kw)]
