"""The torch reference of KV block fingerprints, on CPU (no GPU, no Triton needed)."""

from __future__ import annotations

import random

import pytest
import torch
from vllm_versions import gap_since_vllm

from pdkit.kernels import fingerprint_layouts
from pdkit.kernels.fingerprint import (
    FMIX_C1,
    GOLDEN,
    MASK64,
    SEED,
    KVFingerprinter,
    block_fingerprints,
    compare,
    detect_layout,
    fmix64,
    fmix64_int,
    reference_fingerprints,
)
from pdkit.kernels.fingerprint_layouts import relayout

DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def random_layers(
    layout: str,
    dtype: torch.dtype,
    *,
    num_blocks: int = 6,
    heads: int = 2,
    tokens: int = 16,
    head_size: int = 8,
    layers: int = 3,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Small CPU layer tensors built the way vLLM 0.26.0 does (the shared builder with this file's defaults)."""
    shape = {"num_blocks": num_blocks, "heads": heads, "tokens": tokens, "head_size": head_size, "layers": layers}
    return fingerprint_layouts.random_layers(layout, dtype, gen=torch.Generator().manual_seed(seed), **shape)


def spec_fingerprints(layers: list[torch.Tensor], block_ids: list[int]) -> list[int]:
    """The definition in plain Python ints (independent of the tensor code's int64 tricks)."""
    result = []
    for b in block_ids:
        total, pos = 0, 0
        for t in layers:
            data = t[b].contiguous().view(torch.uint8).reshape(-1).tolist()  # logical (h, n, c) order
            for i in range(0, len(data), 8):
                word = int.from_bytes(bytes(data[i : i + 8]), "little")
                total = (total + fmix64_int(word + pos * GOLDEN)) & MASK64
                pos += 1
        fp = fmix64_int(total ^ SEED)
        result.append(fp - (1 << 64) if fp >> 63 else fp)
    return result


def test_fmix64_tensor_matches_python_ints() -> None:
    rng = random.Random(1)
    values = [0, 1, MASK64, 1 << 63, FMIX_C1] + [rng.getrandbits(64) for _ in range(200)]
    signed = [v - (1 << 64) if v >> 63 else v for v in values]
    got = fmix64(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [g & MASK64 for g in got] == [fmix64_int(v) for v in values]
    # A bijection: distinct inputs give distinct outputs.
    assert len(set(got)) == len(set(values))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_python_spec(layout: str, dtype: torch.dtype) -> None:
    layers = random_layers(layout, dtype, num_blocks=3, tokens=4, layers=2)
    assert reference_fingerprints(layers, [2, 0]).tolist() == spec_fingerprints(layers, [2, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_layout_independent(dtype: torch.dtype) -> None:
    hnd = random_layers("HND", dtype, seed=3)
    nhd = relayout(hnd, "NHD")
    assert detect_layout(hnd[0]) == "HND" and detect_layout(nhd[0]) == "NHD"
    ids = [5, 0, 3, 3]
    first = block_fingerprints(hnd, ids)
    assert torch.equal(first, block_fingerprints(hnd, ids))
    assert torch.equal(first, block_fingerprints(nhd, ids))
    assert first[2] == first[3]
    assert torch.equal(relayout(nhd, "HND")[1].view(torch.uint8), hnd[1].view(torch.uint8))  # bits, NaNs included


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_single_bit_flip_is_detected(layout: str, dtype: torch.dtype) -> None:
    """Flip one bit at a time in every layer, at several byte positions of the block, and in each bit of a byte."""
    layers = random_layers(layout, dtype, num_blocks=4, tokens=16, head_size=8, layers=3, seed=7)
    block = 2
    fp = KVFingerprinter(layers)
    clean = fp([0, 1, block, 3])
    page_bytes = layers[0][block].numel() * layers[0].element_size()
    rng = random.Random(5)
    positions = [0, page_bytes - 1] + rng.sample(range(1, page_bytes - 1), 10)
    for layer in layers:
        as_bytes = layer.view(torch.uint8)  # same physical memory, logical index order
        page = as_bytes[block].reshape(-1) if layer.is_contiguous() else None
        for byte in positions:
            for bit in (0, 3, 7):
                if page is not None:
                    page[byte] ^= 1 << bit
                else:
                    h, rest = divmod(byte, as_bytes.shape[2] * as_bytes.shape[3])
                    n, c = divmod(rest, as_bytes.shape[3])
                    as_bytes[block, h, n, c] ^= 1 << bit
                now = fp([0, 1, block, 3])
                assert now[2] != clean[2], (byte, bit)
                assert torch.equal(now[[0, 1, 3]], clean[[0, 1, 3]])
                if page is not None:
                    page[byte] ^= 1 << bit
                else:
                    as_bytes[block, h, n, c] ^= 1 << bit
        assert torch.equal(fp([0, 1, block, 3]), clean)


def test_position_and_layer_sensitive() -> None:
    """Swapping two tokens, two heads, K with V, or two layers changes the fingerprint."""
    layers = random_layers("NHD", torch.bfloat16, seed=11)
    base = block_fingerprints(layers, [1])
    swaps = []
    t = [x.clone() for x in layers]
    t[0][1, :, [0, 1]] = t[0][1, :, [1, 0]]
    swaps.append(t)
    t = [x.clone() for x in layers]
    t[2][1, [0, 1]] = t[2][1, [1, 0]]
    swaps.append(t)
    t = [x.clone() for x in layers]
    k, v = t[1][1, :, :, :8].clone(), t[1][1, :, :, 8:].clone()
    t[1][1, :, :, :8], t[1][1, :, :, 8:] = v, k
    swaps.append(t)
    swaps.append([layers[1], layers[0], layers[2]])
    for swapped in swaps:
        assert block_fingerprints(swapped, [1]) != base


def test_content_not_block_id_decides() -> None:
    """Different blocks differ; the same contents at another block id (as after a transfer) match."""
    layers = random_layers("HND", torch.float16, num_blocks=8, seed=2)
    fps = block_fingerprints(layers, list(range(8))).tolist()
    assert len(set(fps)) == 8
    for t in layers:
        t[6].copy_(t[1])
    assert block_fingerprints(layers, [6]).tolist() == [fps[1]]
    zeros = [torch.zeros_like(t) for t in layers]
    zfp = block_fingerprints(zeros, [0, 1]).tolist()
    assert zfp[0] == zfp[1] and zfp[0] != 0


def test_dict_input_is_ordered_by_name_and_shared_tensors_count_once() -> None:
    layers = random_layers("HND", torch.bfloat16, seed=4)
    by_name = {"model.layers.0.attn": layers[0], "model.layers.1.attn": layers[1], "model.layers.2.attn": layers[2]}
    shuffled = dict(reversed(list(by_name.items())))
    assert torch.equal(block_fingerprints(by_name, [1, 2]), block_fingerprints(layers, [1, 2]))
    assert torch.equal(block_fingerprints(shuffled, [1, 2]), block_fingerprints(layers, [1, 2]))
    shared = {**by_name, "model.layers.3.attn": layers[2]}  # a layer reusing layer 2's KV tensor
    assert torch.equal(block_fingerprints(shared, [1, 2]), block_fingerprints(layers, [1, 2]))


def test_padded_and_cross_layer_strides() -> None:
    """Pages with padding between them, and per-layer views into one cross-layer buffer, hash like plain ones."""
    plain = random_layers("HND", torch.bfloat16, num_blocks=5, layers=2, seed=9)
    nb, h, n, c = plain[0].shape
    padded = []
    for t in plain:
        buf = torch.zeros(nb, h * n * c + 64, dtype=t.dtype)
        view = torch.as_strided(buf, (nb, h, n, c), (h * n * c + 64, n * c, c, 1))
        view.copy_(t)
        padded.append(view)
    cross = torch.zeros(nb, h, 2, n, c, dtype=torch.bfloat16)  # vLLM's HND cross-layer order
    cross_layers = [cross[:, :, i] for i in range(2)]
    for dst, src in zip(cross_layers, plain, strict=True):
        dst.copy_(src)
    ids = [4, 0, 2]
    want = block_fingerprints(plain, ids)
    assert torch.equal(block_fingerprints(padded, ids), want)
    assert torch.equal(block_fingerprints(cross_layers, ids), want)


def test_mla_and_blocks_per_id() -> None:
    mla = [torch.randn(6, 16, 72, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(2)]
    a = block_fingerprints(mla, [0, 5])
    assert a[0] != a[1]
    layers = random_layers("NHD", torch.bfloat16, num_blocks=8)
    two = block_fingerprints(layers, [3, 0], blocks_per_id=2)  # id 3 = tensor blocks 6, 7
    assert two[0] != block_fingerprints(layers, [6])[0]
    for t in layers:
        t[2:4].copy_(t[6:8])
    assert block_fingerprints(layers, [1], blocks_per_id=2)[0] == two[0]


def test_compare_returns_mismatching_block_ids() -> None:
    layers = random_layers("HND", torch.bfloat16, num_blocks=6)
    ids = [5, 2, 4]
    sent = block_fingerprints(layers, ids).tolist()
    layers[1][2, 0, 3, 1] += 1
    got = block_fingerprints(layers, ids)
    assert compare(sent, got, ids) == [2]
    assert compare(sent, sent, ids) == []
    unsigned = [v & MASK64 for v in sent]  # senders may use unsigned ints on the wire
    assert compare(unsigned, got, ids) == [2]
    with pytest.raises(ValueError):
        compare(sent, got, ids[:2])


def test_rejects_what_it_cannot_hash() -> None:
    with pytest.raises(ValueError):
        block_fingerprints([torch.zeros(2, 4, 16, 2, 8)], [0])  # pre-0.26 kv-first 5-D layout
    with pytest.raises(ValueError):
        block_fingerprints([torch.zeros(2, 2, 16, 3, dtype=torch.bfloat16)], [0])  # 6-byte rows
    with pytest.raises(TypeError):
        block_fingerprints([[torch.zeros(2, 8)]], [0])
    layers = random_layers("HND", torch.bfloat16, num_blocks=4)
    with pytest.raises(IndexError):
        block_fingerprints(layers, [4])
    with pytest.raises(IndexError):
        block_fingerprints(layers, [-1])
    assert block_fingerprints(layers, []).numel() == 0


@pytest.mark.vllm
@gap_since_vllm("0.32", "vLLM 0.32 removed set_kv_cache_layout; the reshape check is not ported to its layout API")
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_tensors_from_vllm_reshape_code(layout: str) -> None:
    """KV tensors made by vLLM 0.26.0's own shape, stride-order and reshape functions (CPU)."""
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.utils import set_kv_cache_layout
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    spec = FullAttentionSpec(16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    set_kv_cache_layout(layout)  # type: ignore[arg-type]
    try:
        shape = FlashAttentionBackend.get_kv_cache_shape(4, 16, 2, 64)
        order = FlashAttentionBackend.get_kv_cache_stride_order()
        made = []
        for i in range(2):
            raw = torch.randint(
                -128, 128, (4 * spec.page_size_bytes,), dtype=torch.int8, generator=torch.Generator().manual_seed(i)
            )
            made.append(_reshape_attention_kv_cache(raw, spec, shape, order, 4, None))
    finally:
        set_kv_cache_layout(None)
    assert detect_layout(made[0]) == layout
    ids = [3, 1]
    want = spec_fingerprints([t.contiguous() for t in made], ids)
    assert block_fingerprints(made, ids).tolist() == want
    other = relayout(made, "NHD" if layout == "HND" else "HND")
    assert block_fingerprints(other, ids).tolist() == want
