"""Will NIXL accept this prefill/decode pair?  Checked at configuration time, without vllm.

NIXL (vLLM 0.26.0) refuses a transfer at the *first request* when the two sides differ in what its
handshake checks, and the error («NIXL compatibility hash mismatch», or a RuntimeError in the remote
agent validation) lands in a worker log, not in front of whoever configured the pair.  This module
reproduces those checks from the serve settings so pdkit can refuse the configuration instead.

What vLLM hashes (``compute_nixl_compatibility_hash``): vLLM version, model (the *string* passed to
``vllm serve``), model dtype, KV heads / head size / layers (same model ⇒ same), attention backend name,
``cache_dtype`` (the raw ``--kv-cache-dtype`` string: ``auto`` ≠ ``bfloat16``), cross-layer blocks, and
whether the hybrid KV-cache manager (HMA) is on.  What the handshake validates afterwards: KV-cache
layout (``VLLM_KV_CACHE_LAYOUT``) and, with HMA, equal block sizes.

HMA is the trap: vLLM turns it off by itself for a connector without HMA support (PdConnector,
LMCacheConnectorV1), but leaves it on for plain NixlConnector, so prefill=PdConnector with
decode=NixlConnector differ unless ``--disable-hybrid-kv-cache-manager`` is given.

Settings are plain dicts (every key optional); :func:`settings_from_serve` builds one from ``vllm serve``
argv and env.  Keys: ``model``, ``dtype``, ``kv_cache_dtype``, ``block_size``, ``attention_backend``,
``kv_cache_layout``, ``kv_connector``, ``nixl_transfer_mode`` (push/pull), ``disable_hybrid_kv_cache_manager``
(True/False/None = vLLM decides), ``enable_cross_layers_blocks``, ``vllm_version``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Connectors without SupportsHMA in vLLM 0.26.0 that pdkit may configure: vLLM disables HMA for them.
CONNECTORS_WITHOUT_HMA = frozenset({"PdConnector", "LMCacheConnectorV1", "LMCacheConnectorV1Dynamic"})

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "half": "float16",
    "fp16": "float16",
    "float16": "float16",
    "torch.float16": "float16",
    "float": "float32",
    "fp32": "float32",
    "float32": "float32",
    "torch.float32": "float32",
}


@dataclass(frozen=True)
class Mismatch:
    """One difference NIXL would reject (``error``) or that pdkit cannot rule out (``warning``)."""

    field: str
    prefill: Any
    decode: Any
    severity: Literal["error", "warning"]
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.field}: prefill={self.prefill!r} decode={self.decode!r}: {self.message}"


def hma_enabled(settings: Mapping[str, Any]) -> bool:
    """Whether vLLM 0.26.0 will run the hybrid KV-cache manager with these settings (GPU platform)."""
    explicit = settings.get("disable_hybrid_kv_cache_manager")
    if explicit is not None:
        return not explicit
    return settings.get("kv_connector") not in CONNECTORS_WITHOUT_HMA


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    return _DTYPE_ALIASES.get(text, text)


def check_nixl_compat(prefill: Mapping[str, Any], decode: Mapping[str, Any]) -> list[Mismatch]:
    """Every mismatch between the prefill and decode settings that NIXL's handshake would reject.

    An empty list means NIXL's hash and handshake checks agree as far as the settings tell.
    """
    out: list[Mismatch] = []

    def both(key: str, default: Any = None) -> tuple[Any, Any]:
        return prefill.get(key, default), decode.get(key, default)

    p_hma, d_hma = hma_enabled(prefill), hma_enabled(decode)
    if p_hma != d_hma:
        out.append(
            Mismatch(
                "hybrid_kv_cache_manager",
                p_hma,
                d_hma,
                "error",
                "NIXL hashes whether the hybrid KV-cache manager is on; vLLM turns it off by itself for "
                f"{prefill.get('kv_connector') if not p_hma else decode.get('kv_connector')} only. Pass "
                "--disable-hybrid-kv-cache-manager to both prefill and decode.",
            )
        )
    for key, what in (("model", "the model string passed to vllm serve"), ("vllm_version", "the vLLM version")):
        p, d = both(key)
        if p is not None and d is not None and str(p) != str(d):
            out.append(Mismatch(key, p, d, "error", f"NIXL hashes {what}; use the same on both sides."))
    p, d = both("dtype", "auto")
    if _dtype(p) != _dtype(d):
        auto = "auto" in (str(p).lower(), str(d).lower())
        out.append(
            Mismatch(
                "dtype",
                p,
                d,
                "warning" if auto else "error",
                "NIXL hashes the resolved model dtype; "
                + (
                    "'auto' resolves from the model config, so state the same --dtype on both sides."
                    if auto
                    else "use the same --dtype on both sides."
                ),
            )
        )
    p, d = both("kv_cache_dtype", "auto")
    if str(p) != str(d):
        out.append(
            Mismatch(
                "kv_cache_dtype",
                p,
                d,
                "error",
                "NIXL hashes the --kv-cache-dtype string itself ('auto' and its resolved dtype differ); "
                "pass the identical value on both sides.",
            )
        )
    p, d = both("attention_backend")
    if p != d:
        explicit = p is not None and d is not None
        out.append(
            Mismatch(
                "attention_backend",
                p,
                d,
                "error" if explicit else "warning",
                "NIXL hashes the attention backend name; "
                + (
                    "use the same --attention-backend on both sides."
                    if explicit
                    else "one side lets vLLM choose: pass the same --attention-backend on both sides."
                ),
            )
        )
    p, d = both("enable_cross_layers_blocks", False)
    if bool(p) != bool(d):
        out.append(
            Mismatch(
                "enable_cross_layers_blocks",
                p,
                d,
                "error",
                "NIXL hashes cross-layer blocks; set the NIXL extra-config key the same on both sides.",
            )
        )
    p, d = both("nixl_transfer_mode")
    if p is not None and d is not None and p != d:
        out.append(
            Mismatch(
                "nixl_transfer_mode",
                p,
                d,
                "error",
                "a push (NixlPushConnector) and a pull side never pair (vLLM 0.32 hashes the transfer mode); "
                "set nixl.mode once for both roles.",
            )
        )
    p, d = both("kv_cache_layout")
    if (p or "HND") != (d or "HND"):
        out.append(
            Mismatch(
                "kv_cache_layout",
                p,
                d,
                "error",
                "NIXL's handshake refuses different KV-cache layouts (NIXL asks for HND); set "
                "VLLM_KV_CACHE_LAYOUT the same on both sides or leave it unset.",
            )
        )
    p, d = both("block_size")
    if p is not None and d is not None and int(p) != int(d):
        out.append(
            Mismatch(
                "block_size",
                p,
                d,
                "error" if (p_hma or d_hma) else "warning",
                "with the hybrid KV-cache manager NIXL refuses different block sizes; without it NIXL "
                "re-maps blocks (slower, many more descriptors): use the same --block-size.",
            )
        )
    return out


def format_mismatches(mismatches: Sequence[Mismatch]) -> str:
    """One line per mismatch, errors first (for a ConfigError message)."""
    ordered = sorted(mismatches, key=lambda m: m.severity != "error")
    return "\n".join(str(m) for m in ordered)


_FLAG_KEYS = {
    "--model": "model",
    "--dtype": "dtype",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--block-size": "block_size",
    "--attention-backend": "attention_backend",
}


def settings_from_serve(
    argv: Sequence[str], env: Mapping[str, str] | None = None, kv_connector: str | None = None
) -> dict[str, Any]:
    """The settings dict of one ``vllm serve`` command line (``argv`` after ``serve``) and its env.

    Understands ``--flag value`` and ``--flag=value``, a positional model, the HMA flags and the
    connector named in ``--kv-transfer-config`` (or given as ``kv_connector``).
    """
    import json

    env = env or {}
    out: dict[str, Any] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        key, _, inline = arg.partition("=")
        if key == "--disable-hybrid-kv-cache-manager":
            out["disable_hybrid_kv_cache_manager"] = True
        elif key == "--no-disable-hybrid-kv-cache-manager":
            out["disable_hybrid_kv_cache_manager"] = False
        elif key in _FLAG_KEYS or key == "--kv-transfer-config":
            value = inline if inline else (items[i + 1] if i + 1 < len(items) else "")
            i += 0 if inline else 1
            if key == "--kv-transfer-config":
                ktc = json.loads(value)
                out["kv_connector"] = ktc.get("kv_connector")
                extra = ktc.get("kv_connector_extra_config") or {}
                nixl = extra.get("nixl", extra) if ktc.get("kv_connector") == "PdConnector" else extra
                nixl_name = (
                    extra.get("nixl_connector") if ktc.get("kv_connector") == "PdConnector" else ktc.get("kv_connector")
                )
                out["nixl_transfer_mode"] = "push" if nixl_name == "NixlPushConnector" else "pull"
                if "enable_cross_layers_blocks" in nixl:
                    out["enable_cross_layers_blocks"] = str(nixl["enable_cross_layers_blocks"]).lower() == "true"
            else:
                out[_FLAG_KEYS[key]] = value
        elif not arg.startswith("-") and "model" not in out and i == 0:
            out["model"] = arg
        i += 1
    if kv_connector is not None:
        out["kv_connector"] = kv_connector
    if env.get("VLLM_KV_CACHE_LAYOUT"):
        out["kv_cache_layout"] = env["VLLM_KV_CACHE_LAYOUT"]
    if env.get("VLLM_ATTENTION_BACKEND") and "attention_backend" not in out:
        out["attention_backend"] = env["VLLM_ATTENTION_BACKEND"]
    return out
