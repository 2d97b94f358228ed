"""Triton kernel for :mod:`pdkit.kernels.fingerprint` (imported lazily: needs triton, normally CUDA).

One program hashes one (block, layer) page: it streams the page in physical order (coalesced; when the
page is one run of memory the loads are plain contiguous vectors), keeps a per-lane uint64 partial
sum in registers and writes one partial per page. The cross-layer combine is a wrapping int64 sum
over a small ``(num_blocks, layers * blocks_per_id)`` tensor plus the finaliser, done by torch. Layers
with the same geometry share one launch through a device table of their base pointers, so a
32-layer model costs one launch, not 32.

The arithmetic is the definition in fingerprint.py: uint64 with wraparound, logical shifts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from pdkit.kernels.fingerprint import LayerGeometry, as_words


@triton.jit
def _fmix64(x):
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCD
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53
    x ^= x >> 33
    return x


@triton.jit
def _page_sums_kernel(
    ptr_table,  # int64[layers in group]: base address of each layer's int64 word view
    pos_base_ptr,  # int64[layers in group]: position of each layer's first word
    rows_ptr,  # int64[num_ids * R]: tensor block rows to read
    out_ptr,  # int64[num_ids, out_cols]
    out_cols,
    col_base,  # first output column of this group
    block_stride,
    outer_stride,
    inner_stride,
    R: tl.constexpr,  # tensor blocks per block id
    INNER: tl.constexpr,
    W: tl.constexpr,  # words per row
    P_OUTER: tl.constexpr,
    P_INNER: tl.constexpr,
    BW: tl.constexpr,  # words per page
    CONTIG: tl.constexpr,
    TILE: tl.constexpr,
):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    row = tl.load(rows_ptr + i)
    base = tl.load(ptr_table + layer).to(tl.pointer_type(tl.int64))
    page = base + row * block_stride
    sub = i % R
    pos0 = (tl.load(pos_base_ptr + layer) + sub * BW).to(tl.uint64, bitcast=True)
    acc = tl.zeros([TILE], dtype=tl.uint64)
    for start in range(0, BW, TILE):
        f = start + tl.arange(0, TILE)
        mask = f < BW
        r = f // W
        j = f % W
        o = r // INNER
        n = r % INNER
        if CONTIG:
            ptrs = page + f
        else:
            ptrs = page + o.to(tl.int64) * outer_stride + n.to(tl.int64) * inner_stride + j
        w = tl.load(ptrs, mask=mask, other=0).to(tl.uint64, bitcast=True)
        p = (o * P_OUTER + n * P_INNER + j).to(tl.uint64)
        term = _fmix64(w + (pos0 + p) * 0x9E3779B97F4A7C15)
        acc += tl.where(mask, term, 0)
    total = tl.sum(acc, axis=0)
    col = col_base + layer * R + sub
    tl.store(out_ptr + (i // R) * out_cols + col, total.to(tl.int64, bitcast=True))


class _Group:
    """Layers of one geometry: one launch."""

    def __init__(self, geo: LayerGeometry, ptrs: list[int], pos: list[int], col_base: int, device: torch.device):
        self.geo = geo
        self.col_base = col_base
        self.ptr_table = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.pos_base = torch.tensor(pos, dtype=torch.int64, device=device)
        self.num_layers = len(ptrs)


class TritonPlan:
    """Pointer tables and launch parameters for a fixed set of layers."""

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        geometries: Sequence[LayerGeometry],
        blocks_per_id: int,
        tile: int | None = None,
        num_warps: int = 8,
    ) -> None:
        self.r = blocks_per_id
        self.device = layers[0].device
        self.num_warps = num_warps
        self.tile = tile
        self.num_blocks = min(g.num_blocks for g in geometries)
        groups: dict[tuple, tuple[LayerGeometry, list[int], list[int]]] = {}
        pos = 0
        for t, g in zip(layers, geometries, strict=True):
            key = (g.heads, g.tokens, g.words_per_row, g.block_stride, g.outer_stride, g.inner_stride, g.layout)
            entry = groups.setdefault(key, (g, [], []))
            entry[1].append(as_words(t).data_ptr())
            entry[2].append(pos)
            pos += blocks_per_id * g.block_words
        # Output column of (layer idx, sub-block k) is col_base(group) + slot_in_group * R + k; the
        # combine is a sum, so the column order does not affect the result.
        self.groups: list[_Group] = []
        col = 0
        for g, ptrs, bases in groups.values():
            self.groups.append(_Group(g, ptrs, bases, col, self.device))
            col += len(ptrs) * blocks_per_id
        self.out_cols = col

    def sums(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-block-id word sums (int64) for tensor block ``rows`` (length num_ids * R, already range-checked)."""
        n = rows.numel() // self.r
        out = torch.empty((n, self.out_cols), dtype=torch.int64, device=self.device)  # kernels fill every column
        if n == 0:
            return out.sum(dim=1)
        rows = rows.contiguous()
        for grp in self.groups:
            g = grp.geo
            bw = g.block_words
            tile = self.tile or min(2048, triton.next_power_of_2(bw))
            p_outer = g.p_outer
            p_inner = g.p_inner
            _page_sums_kernel[(rows.numel(), grp.num_layers)](
                grp.ptr_table,
                grp.pos_base,
                rows,
                out,
                self.out_cols,
                grp.col_base,
                g.block_stride,
                g.outer_stride,
                g.inner_stride,
                R=self.r,
                INNER=g.inner_size,
                W=g.words_per_row,
                P_OUTER=p_outer,
                P_INNER=p_inner,
                BW=bw,
                CONTIG=g.contiguous,
                TILE=tile,
                num_warps=self.num_warps,
            )
        return out.sum(dim=1)
