"""GPU check of the KV block fingerprint kernel: Triton kernel == torch reference, bit for bit.

For every physical layout in {HND, NHD} and KV dtype in {bf16, fp16, fp8_e4m3} on fresh random bits
(vLLM 0.26.0 tensors: raw bytes viewed in physical order, permuted to the logical
``(num_blocks, num_kv_heads, block_size, 2*head_size)`` view), plus the awkward geometries (H=1 as
with TP=8, head 64/256, block 32, padded pages, cross-layer buffers, two kernel blocks per block id,
MLA 3-D, layers of two geometries in one call, vLLM's own reshape code when vLLM imports), it checks:

* kernel == torch reference on the same GPU == torch reference on a CPU copy;
* the same logical KV in the other layout gives the same fingerprints;
* one flipped bit in a random layer/position of one block is reported for exactly that block id.

Usage on the device (pdkit installed, torch with CUDA, triton):
    python3 scripts/gpu_check_fingerprint.py            # expected < 1 min (mostly Triton compiles)
Writes ``$OUT/gpu_check_fingerprint.json``; exit status 0 iff every case passed.
On CPU (what the test suite runs): ``TRITON_INTERPRET=1 python3 scripts/gpu_check_fingerprint.py
--device cpu --small``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pdkit.kernels.fingerprint import KVFingerprinter, compare, detect_layout, reference_fingerprints
from pdkit.kernels.fingerprint_layouts import random_layers, relayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn}


def check_layers(
    layers: list[torch.Tensor], ids: list[int], rng: random.Random, *, blocks_per_id: int = 1, flip: bool = True
) -> dict:
    """Kernel vs reference (device and CPU), and one bit flip detected for exactly its block."""
    fp = KVFingerprinter(layers, backend="triton", blocks_per_id=blocks_per_id)
    got = fp(ids)
    ref = reference_fingerprints(layers, ids, blocks_per_id)
    ref_cpu = reference_fingerprints([t.cpu() for t in layers], ids, blocks_per_id)
    detail: dict = {
        "layouts": sorted(fp.layouts),
        "kernel_eq_reference": bool(torch.equal(got.cpu(), ref.cpu())),
        "reference_eq_cpu": bool(torch.equal(ref.cpu(), ref_cpu)),
    }
    ok = detail["kernel_eq_reference"] and detail["reference_eq_cpu"]
    if flip:
        victim = rng.choice(ids)
        layer = rng.choice(layers)
        row = victim * blocks_per_id + rng.randrange(blocks_per_id)
        page = layer[row].view(torch.uint8)  # logical view of one tensor block, as bytes
        idx = tuple(rng.randrange(s) for s in page.shape)
        bit = 1 << rng.randrange(8)
        page[idx] ^= bit
        flipped = fp(ids)
        page[idx] ^= bit
        bad = sorted(set(compare(got, flipped, ids)))
        detail["flip"] = {"block": victim, "reported": bad}
        ok = ok and bad == [victim] and bool(torch.equal(fp(ids), got))
    detail["ok"] = ok
    return detail


def run_cases(device: str, small: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(1234)
    rng = random.Random(1234)
    base = (
        dict(num_blocks=9, heads=2, tokens=16, head_size=16, layers=2)
        if small
        else dict(num_blocks=96, heads=8, tokens=16, head_size=128, layers=6)
    )
    nb = base["num_blocks"]
    cases: list[tuple[str, Callable[[], dict]]] = []

    def ids(n: int, limit: int = nb) -> list[int]:
        picked = rng.sample(range(limit), min(n, limit))
        return picked + picked[:2]  # repeats allowed: the same block twice must match itself

    for layout in ("HND", "NHD"):
        for name, dtype in DTYPES.items():

            def main_case(layout: str = layout, dtype: torch.dtype = dtype) -> dict:
                layers = random_layers(layout, dtype, device=device, gen=gen, **base)
                chosen = ids(nb // 2)
                detail = check_layers(layers, chosen, rng)
                other = relayout(layers, "NHD" if layout == "HND" else "HND")
                same = KVFingerprinter(other, backend="triton")(chosen)
                detail["detected_layout"] = detect_layout(layers[0])
                detail["other_layout_same"] = bool(torch.equal(same, KVFingerprinter(layers, backend="triton")(chosen)))
                detail["ok"] = detail["ok"] and detail["other_layout_same"] and detail["detected_layout"] == layout
                return detail

            cases.append((f"{layout}/{name}", main_case))

    shapes = {
        "tp8_heads1": dict(heads=1),
        "head64": dict(head_size=64 if not small else 8),
        "head256": dict(head_size=256 if not small else 32),
        "head96": dict(head_size=96 if not small else 12),
        "block32": dict(tokens=32),
    }
    for label, change in shapes.items():
        for layout in ("HND", "NHD"):

            def shape_case(layout: str = layout, change: dict = change) -> dict:
                layers = random_layers(layout, torch.bfloat16, device=device, gen=gen, **{**base, **change})
                return check_layers(layers, ids(5), rng)

            cases.append((f"{label}/{layout}", shape_case))

    def padded() -> dict:
        plain = random_layers("NHD", torch.bfloat16, device=device, gen=gen, **base)
        out = []
        for t in plain:
            n_, h, tok, c = t.shape
            page = h * tok * c + 256
            buf = torch.zeros(n_ * page, dtype=t.dtype, device=device)
            view = torch.as_strided(buf, (n_, tok, h, c), (page, h * c, c, 1)).permute(0, 2, 1, 3)
            view.copy_(t)
            out.append(view)
        chosen = ids(6)
        detail = check_layers(out, chosen, rng)
        detail["eq_unpadded"] = bool(
            torch.equal(KVFingerprinter(out, backend="triton")(chosen), reference_fingerprints(plain, chosen))
        )
        detail["ok"] = detail["ok"] and detail["eq_unpadded"]
        return detail

    def cross_layer() -> dict:
        # vLLM's cross-layer HND buffer (num_blocks, H, L, N, C): per-layer views are not one run per page.
        b = base
        buf = torch.randint(
            -128, 128, (nb, b["heads"], b["layers"], b["tokens"], 2 * b["head_size"]), dtype=torch.int16, generator=gen
        )
        buf = buf.to(device).view(torch.bfloat16)
        layers = [buf[:, :, i] for i in range(b["layers"])]
        return check_layers(layers, ids(6), rng)

    def two_kernel_blocks_per_id() -> dict:
        layers = random_layers("HND", torch.float16, device=device, gen=gen, **base)
        return check_layers(layers, ids(3, nb // 2), rng, blocks_per_id=2)

    def mla() -> dict:
        width = 576 if not small else 72
        layers = [
            torch.randint(-128, 128, (nb, 16, width), dtype=torch.int16, generator=gen).to(device).view(torch.bfloat16)
            for _ in range(base["layers"])
        ]
        return check_layers(layers, ids(5), rng)

    def mixed_groups() -> dict:
        a = random_layers("HND", torch.bfloat16, device=device, gen=gen, **base)
        c = random_layers("NHD", torch.bfloat16, device=device, gen=gen, **{**base, "heads": 1})
        return check_layers(a + c, ids(5), rng)

    def vllm_reshape() -> dict:
        try:
            from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
            from vllm.v1.attention.backends.utils import set_kv_cache_layout
            from vllm.v1.kv_cache_interface import FullAttentionSpec
            from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache
        except Exception as exc:  # vLLM is optional here
            return {"ok": True, "skipped": f"vLLM not importable: {exc!r}"}
        out: dict = {"ok": True}
        h, tok, hs = base["heads"], base["tokens"], base["head_size"]
        spec = FullAttentionSpec(tok, num_kv_heads=h, head_size=hs, dtype=torch.bfloat16)
        for layout in ("HND", "NHD"):
            set_kv_cache_layout(layout)
            try:
                shape = FlashAttentionBackend.get_kv_cache_shape(nb, tok, h, hs)
                order = FlashAttentionBackend.get_kv_cache_stride_order()
                layers = []
                for _ in range(2):
                    raw = torch.randint(-128, 128, (nb * spec.page_size_bytes,), dtype=torch.int8, generator=gen)
                    layers.append(_reshape_attention_kv_cache(raw.to(device), spec, shape, order, nb, None))
            finally:
                set_kv_cache_layout(None)
            detail = check_layers(layers, ids(5), rng)
            detail["detected_layout"] = detect_layout(layers[0])
            out[layout] = detail
            out["ok"] = out["ok"] and detail["ok"] and detail["detected_layout"] == layout
        return out

    cases += [
        ("padded_pages", padded),
        ("cross_layer_buffer", cross_layer),
        ("two_kernel_blocks_per_id", two_kernel_blocks_per_id),
        ("mla_3d", mla),
        ("two_geometry_groups", mixed_groups),
        ("vllm_reshape", vllm_reshape),
    ]
    results = []
    for name, fn in cases:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except Exception:
            detail = {"ok": False, "error": traceback.format_exc()[-2000:]}
        detail = {"name": name, **detail, "seconds": round(time.perf_counter() - t0, 3)}
        print(
            ("PASS" if detail["ok"] else "FAIL"),
            name,
            json.dumps({k: v for k, v in detail.items() if k not in ("name", "ok")})[:300],
            flush=True,
        )
        results.append(detail)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/pdkit-gpu-out"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import triton

    t0 = time.perf_counter()
    results = run_cases(args.device, args.small)
    report = {
        "ok": all(r["ok"] for r in results),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "seconds": round(time.perf_counter() - t0, 2),
        "cases": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_fingerprint.json").write_text(json.dumps(report, indent=2))
    passed = sum(r["ok"] for r in results)
    print(f"{'OK' if report['ok'] else 'FAILED'}: {passed}/{len(results)} cases in {report['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
