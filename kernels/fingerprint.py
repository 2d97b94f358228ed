"""64-bit per-block fingerprints of vLLM's paged KV cache, to check what a P/D transfer delivered.

Why: a wrong layout, a stale block or a bad transfer gives silently wrong tokens in P/D serving. The
prefill side fingerprints the blocks it sends, the decode side recomputes them once the transfer is
done and reports any block whose fingerprint differs, so vLLM recomputes it instead of decoding from
garbage.

What is hashed (the definition both backends implement bit for bit, see docs/kernels.md):

* Each layer tensor is taken in vLLM 0.26.0's *logical* view ``(num_blocks, num_kv_heads,
  block_size, C)`` (``C = 2 * head_size``: K then V packed in the last dim), whatever its physical
  order (HND or NHD) and block stride. 3-D tensors ``(num_blocks, block_size, C)`` (MLA) count as one
  head. The raw bytes of each row of ``C`` values are read as little-endian 64-bit words, so bf16,
  fp16, fp8 (any 1/2/4-byte dtype) are hashed by their bits, never by their values (NaN, -0.0 count).
* Every word gets a *position*: layers are numbered in a fixed order, and within a fingerprinted
  block the word at logical ``(sub_block k, head h, token n, word j)`` of layer ``l`` has position
  ``base(l) + k*S + (h*N + n)*W + j`` (``S`` words per block per layer, ``W`` words per row,
  ``base(l)`` = sum of ``blocks_per_id * S`` of earlier layers).
* ``fingerprint = fmix64(SEED ^ sum over words of fmix64(word + position * GOLDEN))`` mod 2**64,
  where fmix64 is MurmurHash3's 64-bit finaliser (a bijection). The sum is commutative, so any
  kernel may visit words in physical order (coalesced) and the result is the same for HND and NHD:
  the fingerprint depends only on the logical contents, never on layout or on the block's id.
  Changing one word changes exactly one term (the mixer is a bijection), so a single corrupted word
  - in particular any single-bit flip - always changes the fingerprint; independent corruptions
  cancel with probability about 2**-64.

Backends: the Triton kernel (``pdkit.kernels._fingerprint_triton``, imported lazily) on CUDA
tensors, the pure-torch reference everywhere else. Both use int64 arithmetic with wraparound.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]

MASK64 = (1 << 64) - 1
#: Odd multiplier (2**64 / golden ratio) spreading positions over the 64-bit space.
GOLDEN = 0x9E3779B97F4A7C15
#: MurmurHash3 fmix64 multipliers.
FMIX_C1 = 0xFF51AFD7ED558CCD
FMIX_C2 = 0xC4CEB9FE1A85EC53
#: Mixed into the final sum so an all-zero sum does not give fingerprint 0.
SEED = 0x706B6B6974667031  # "pdkitfp1"


def _signed(value: int) -> int:
    """A 64-bit pattern as the Python int an int64 tensor holds."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def fmix64_int(x: int) -> int:
    """MurmurHash3's fmix64 on a Python int (unsigned 64-bit semantics); the spec for the tensor code."""
    x &= MASK64
    x ^= x >> 33
    x = (x * FMIX_C1) & MASK64
    x ^= x >> 33
    x = (x * FMIX_C2) & MASK64
    x ^= x >> 33
    return x


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """fmix64 on an int64 tensor with wraparound; ``>>`` is arithmetic in torch, so mask to make it logical."""
    low31 = (1 << 31) - 1
    x = x ^ ((x >> 33) & low31)
    x = x * _signed(FMIX_C1)
    x = x ^ ((x >> 33) & low31)
    x = x * _signed(FMIX_C2)
    return x ^ ((x >> 33) & low31)


def finalize(sums: torch.Tensor) -> torch.Tensor:
    """Per-block word sums (int64) -> fingerprints (int64)."""
    return fmix64(sums ^ _signed(SEED))


@dataclass(frozen=True)
class LayerGeometry:
    """How one layer tensor is laid out, in 64-bit words of its raw bytes.

    ``outer``/``inner`` are the two middle dims in *physical* order (larger stride first); the
    ``p_*`` multipliers map them back to the logical (head, token) word position, which is what
    makes the fingerprint layout independent.
    """

    num_blocks: int
    heads: int
    tokens: int
    words_per_row: int
    block_stride: int
    outer_size: int
    outer_stride: int
    p_outer: int
    inner_size: int
    inner_stride: int
    p_inner: int
    layout: str

    @property
    def block_words(self) -> int:
        return self.heads * self.tokens * self.words_per_row

    @property
    def contiguous(self) -> bool:
        """Whether one block of this layer is a single run of memory in physical row order."""
        return self.inner_stride == self.words_per_row and self.outer_stride == self.inner_size * self.words_per_row


def as_words(cache: torch.Tensor) -> torch.Tensor:
    """The logical 4-D view ``(num_blocks, H, N, W)`` of a layer tensor, reinterpreted as int64 words.

    Raises ValueError for shapes vLLM 0.26.0 does not produce for attention layers (e.g. the old
    kv-first ``(2, num_blocks, ...)`` layout) or rows whose byte size is not a multiple of 8.
    """
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor per layer, got {type(cache).__name__} (Mamba states unsupported)")
    if cache.dim() == 3:  # MLA: (num_blocks, block_size, head_dim): one "head"
        cache = cache.unsqueeze(1)
    if cache.dim() != 4:
        raise ValueError(
            f"expected a (num_blocks, num_kv_heads, block_size, 2*head_size) KV tensor, got shape {tuple(cache.shape)}"
        )
    if cache.stride(-1) != 1:
        raise ValueError("the last (channel) dim must be contiguous")
    row_bytes = cache.shape[-1] * cache.element_size()
    if row_bytes % 8:
        raise ValueError(f"a row of {cache.shape[-1]} x {cache.dtype} is {row_bytes} bytes, not a multiple of 8")
    if (cache.storage_offset() * cache.element_size()) % 8 or any(
        (s * cache.element_size()) % 8 for s in cache.stride()[:-1]
    ):
        raise ValueError("KV tensor strides/offset are not 8-byte aligned")
    if cache.element_size() == 8:
        return cache.view(torch.int64)
    # Reinterpret bytes: go through uint8, which any dtype (fp8 included) can view as.
    return cache.view(torch.uint8).view(torch.int64)


def geometry(cache: torch.Tensor) -> LayerGeometry:
    """Describe one layer tensor (see :func:`as_words`) for the kernel."""
    words = as_words(cache)
    nb, heads, tokens, wpr = words.shape
    sb, sh, sn, _ = words.stride()
    head_first = heads == 1 or tokens == 1 or sh >= sn
    if head_first:  # HND physical: (block, head, token, word)
        outer = (heads, sh, tokens * wpr)
        inner = (tokens, sn, wpr)
    else:  # NHD physical: (block, token, head, word)
        outer = (tokens, sn, wpr)
        inner = (heads, sh, tokens * wpr)
    layout = "HND" if head_first else "NHD"
    return LayerGeometry(nb, heads, tokens, wpr, sb, *outer, *inner, layout)


def detect_layout(cache: torch.Tensor) -> str:
    """'HND' or 'NHD': the physical order of a layer tensor's head and token dims (diagnostics only)."""
    return geometry(cache).layout


def ordered_layers(kv_caches: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Layer tensors in fingerprint order, each distinct tensor once.

    A dict is ordered by layer name (prefill and decode then agree even if they built their dicts in
    different orders). Layers sharing one tensor (vLLM's shared KV / HMA pooling) are hashed once:
    the same memory twice would only cost time.
    """
    tensors = [kv_caches[name] for name in sorted(kv_caches)] if isinstance(kv_caches, Mapping) else list(kv_caches)
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor per layer, got {type(t).__name__} (Mamba states unsupported)")
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    if not out:
        raise ValueError("no KV cache layers given")
    return out


def _block_index(block_ids: Sequence[int] | torch.Tensor, blocks_per_id: int, device: torch.device) -> torch.Tensor:
    """Tensor block rows to read: id b covers rows ``b*r .. b*r+r-1`` (vLLM's kernel blocks per block)."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1).to(device)
    if blocks_per_id == 1:
        return ids
    return (ids[:, None] * blocks_per_id + torch.arange(blocks_per_id, device=device)).reshape(-1)


def reference_sums(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int] | torch.Tensor, blocks_per_id: int = 1
) -> torch.Tensor:
    """Pure-torch per-block word sums (before :func:`finalize`); runs on any device."""
    device = layers[0].device
    rows = _block_index(block_ids, blocks_per_id, device)
    n = rows.numel() // blocks_per_id
    total = torch.zeros(n, dtype=torch.int64, device=device)
    base = 0
    for cache in layers:
        words = as_words(cache)
        if rows.numel() and (int(rows.max()) >= words.shape[0] or int(rows.min()) < 0):
            raise IndexError(f"block row {int(rows.max())} out of range for {words.shape[0]} blocks")
        # Indexing copies the selected blocks into logical (k, h, n, j) order, whatever the layout.
        sel = words[rows].reshape(n, blocks_per_id * words[0].numel())
        pos = torch.arange(base, base + sel.shape[1], dtype=torch.int64, device=device)
        total += fmix64(sel + pos * _signed(GOLDEN)).sum(dim=1)
        base += sel.shape[1]
    return total


def reference_fingerprints(
    kv_caches: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    blocks_per_id: int = 1,
) -> torch.Tensor:
    """The torch reference: int64 fingerprint per block id, same device as the caches."""
    return finalize(reference_sums(ordered_layers(kv_caches), block_ids, blocks_per_id))


class KVFingerprinter:
    """Fingerprints blocks of one fixed set of KV caches; build once at ``register_kv_caches``.

    Building groups the layers by geometry and (for Triton) uploads their pointer table once, so a
    call costs one small H2D copy of the block ids plus one kernel launch per geometry group.
    """

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        *,
        blocks_per_id: int = 1,
        backend: Backend = "auto",
    ) -> None:
        if blocks_per_id < 1:
            raise ValueError("blocks_per_id must be >= 1")
        self.layers = ordered_layers(kv_caches)
        self.blocks_per_id = blocks_per_id
        self.device = self.layers[0].device
        if any(t.device != self.device for t in self.layers):
            raise ValueError("all KV cache layers must be on one device")
        self.geometries = [geometry(t) for t in self.layers]
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and _triton_available() else "torch"
        self.backend: Backend = backend
        self._plan = None
        if backend == "triton":
            from pdkit.kernels._fingerprint_triton import TritonPlan

            self._plan = TritonPlan(self.layers, self.geometries, blocks_per_id)

    @property
    def layouts(self) -> set[str]:
        return {g.layout for g in self.geometries}

    def sums(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Per-block word sums (int64, on the cache device), before :func:`finalize`."""
        self._check_range(block_ids)
        if self._plan is not None:
            return self._plan.sums(_block_index(block_ids, self.blocks_per_id, self.device))
        return reference_sums(self.layers, block_ids, self.blocks_per_id)

    def _check_range(self, block_ids: Sequence[int] | torch.Tensor) -> None:
        """Out-of-range ids would make the kernel read foreign memory: refuse them up front."""
        if isinstance(block_ids, torch.Tensor):
            if block_ids.numel() == 0:
                return
            lo, hi = (int(v) for v in torch.aminmax(block_ids))  # a sync for device tensors: pass lists
        else:
            if len(block_ids) == 0:
                return
            lo, hi = min(block_ids), max(block_ids)
        limit = min(g.num_blocks for g in self.geometries) // self.blocks_per_id
        if lo < 0 or hi >= limit:
            raise IndexError(f"block ids must be in [0, {limit}), got [{lo}, {hi}]")

    def __call__(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """int64 fingerprint per block id (on the cache device; ``.tolist()`` for the wire)."""
        return finalize(self.sums(block_ids))


def _triton_available() -> bool:
    if os.environ.get("PDKIT_FINGERPRINT_BACKEND", "") == "torch":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_fingerprints(
    kv_caches: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    block_ids: Sequence[int] | torch.Tensor,
    *,
    blocks_per_id: int = 1,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One-shot: int64 fingerprint per block id over all layers (Triton on CUDA, torch elsewhere).

    Prefer a long-lived :class:`KVFingerprinter` in a connector: this rebuilds the plan every call.
    """
    return KVFingerprinter(kv_caches, blocks_per_id=blocks_per_id, backend=backend)(block_ids)


def compare(
    expected: Sequence[int] | torch.Tensor,
    actual: Sequence[int] | torch.Tensor,
    block_ids: Sequence[int],
) -> list[int]:
    """Block ids (from ``block_ids``, position by position) whose fingerprints differ.

    ``expected`` is typically the list of ints that came over the wire, ``actual`` the tensor
    recomputed locally over ``block_ids``; all three must have the same length.
    """
    exp = [_signed(int(v)) for v in (expected.tolist() if isinstance(expected, torch.Tensor) else expected)]
    act = [_signed(int(v)) for v in (actual.tolist() if isinstance(actual, torch.Tensor) else actual)]
    ids = list(block_ids)
    if not len(exp) == len(act) == len(ids):
        raise ValueError(f"length mismatch: expected {len(exp)}, actual {len(act)}, block_ids {len(ids)}")
    return [b for b, e, a in zip(ids, exp, act, strict=True) if e != a]
