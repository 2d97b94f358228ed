"""KV layer tensors shaped the way vLLM 0.26.0 allocates them, for checking and timing the fingerprints.

Why a module: the fingerprint's promise is "same logical KV, same fingerprint, whatever the physical
layout", so its unit test, its GPU check and its benchmark all need tensors built exactly like
vLLM's (raw bytes viewed in *physical* order, then permuted to the *logical*
``(num_blocks, num_kv_heads, block_size, 2*head_size)`` view) and a way to move the same logical
contents into the other layout. One definition here keeps the three from drifting apart.
"""

from __future__ import annotations

import torch


def view_as_layer(
    raw: torch.Tensor, layout: str, dtype: torch.dtype, *, num_blocks: int, heads: int, tokens: int, head_size: int
) -> torch.Tensor:
    """A flat byte buffer as one layer's KV tensor in vLLM's logical view over the given physical layout.

    ``layout`` is "HND" (heads before tokens in memory) or anything else for NHD (tokens before heads,
    permuted so the logical view is still heads-first), as vLLM does.
    """
    data = raw.view(dtype)
    if layout == "HND":
        return data.view(num_blocks, heads, tokens, 2 * head_size)
    return data.view(num_blocks, tokens, heads, 2 * head_size).permute(0, 2, 1, 3)


def layer_bytes(dtype: torch.dtype, *, num_blocks: int, heads: int, tokens: int, head_size: int) -> int:
    """Bytes one layer's KV tensor takes (K and V packed in the last dim)."""
    return num_blocks * heads * tokens * 2 * head_size * torch.empty(0, dtype=dtype).element_size()


def random_layers(
    layout: str,
    dtype: torch.dtype,
    *,
    num_blocks: int,
    heads: int,
    tokens: int,
    head_size: int,
    layers: int,
    gen: torch.Generator,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """``layers`` layer tensors of random bits from ``gen`` (drawn on the CPU, so reproducible), on ``device``.

    Random *bits*, not values: fp8/bf16 NaNs and -0.0 appear, as the fingerprint hashes bits.
    """
    shape = {"num_blocks": num_blocks, "heads": heads, "tokens": tokens, "head_size": head_size}
    n = layer_bytes(dtype, **shape)
    raws = [torch.randint(-128, 128, (n,), dtype=torch.int8, generator=gen).to(device) for _ in range(layers)]
    return [view_as_layer(raw, layout, dtype, **shape) for raw in raws]


def relayout(layers: list[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """The same logical bits in the given physical layout ("HND" or "NHD"), on each tensor's device."""
    out = []
    for t in layers:
        nb, h, n, c = t.shape
        if layout == "HND":
            dst = torch.empty((nb, h, n, c), dtype=t.dtype, device=t.device)
        else:
            dst = torch.empty((nb, n, h, c), dtype=t.dtype, device=t.device).permute(0, 2, 1, 3)
        dst.view(torch.uint8).copy_(t.view(torch.uint8))
        out.append(dst)
    return out
