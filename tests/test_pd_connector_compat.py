"""connectors/compat.py: the NIXL handshake checks, reproduced from serve settings (pure Python, no vllm)."""

from __future__ import annotations

import json

from pdkit.connectors.compat import (
    Mismatch,
    check_nixl_compat,
    format_mismatches,
    hma_enabled,
    settings_from_serve,
)

PD_KTC = json.dumps(
    {
        "kv_connector": "PdConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"lmcache": {}, "nixl": {"backends": ["UCX"]}},
    }
)
NIXL_KTC = json.dumps(
    {"kv_connector": "NixlConnector", "kv_role": "kv_consumer", "kv_connector_extra_config": {"backends": ["UCX"]}}
)


def fields(mismatches: list[Mismatch]) -> dict[str, str]:
    return {m.field: m.severity for m in mismatches}


def test_pdconnector_prefill_with_plain_nixl_decode_needs_the_hma_flag_on_decode() -> None:
    prefill = settings_from_serve(["/models/x", "--kv-transfer-config", PD_KTC])
    decode = settings_from_serve(["/models/x", "--kv-transfer-config", NIXL_KTC])
    assert not hma_enabled(prefill) and hma_enabled(decode)
    found = check_nixl_compat(prefill, decode)
    assert fields(found) == {"hybrid_kv_cache_manager": "error"}
    assert "--disable-hybrid-kv-cache-manager" in found[0].message
    decode_fixed = settings_from_serve(
        ["/models/x", "--kv-transfer-config", NIXL_KTC, "--disable-hybrid-kv-cache-manager"]
    )
    assert check_nixl_compat(prefill, decode_fixed) == []


def test_what_pdkit_kv_config_emits_is_compatible() -> None:
    from pdkit.kv_config import kv_transfer_config

    pre = kv_transfer_config("prefill", as_dict=True)
    dec = kv_transfer_config("decode", as_dict=True)
    prefill = settings_from_serve(
        ["m", "--kv-transfer-config", json.dumps(pre.kv_transfer_config), *pre.serve_args], pre.env
    )
    decode = settings_from_serve(
        ["m", "--kv-transfer-config", json.dumps(dec.kv_transfer_config), *dec.serve_args], dec.env
    )
    assert check_nixl_compat(prefill, decode) == []


def test_hashed_fields_mismatch_are_errors() -> None:
    base = {"disable_hybrid_kv_cache_manager": True, "model": "m", "dtype": "bfloat16"}
    found = check_nixl_compat(
        {**base, "kv_cache_dtype": "fp8", "attention_backend": "FLASH_ATTN", "block_size": 16},
        {
            **base,
            "model": "/other/m",
            "kv_cache_dtype": "auto",
            "attention_backend": "FLASHINFER",
            "block_size": 64,
            "kv_cache_layout": "NHD",
        },
    )
    assert fields(found) == {
        "model": "error",
        "kv_cache_dtype": "error",
        "attention_backend": "error",
        "block_size": "warning",
        "kv_cache_layout": "error",
    }
    text = format_mismatches(found)
    assert text.splitlines()[-1].startswith("warning: block_size")


def test_dtype_aliases_match_and_auto_is_a_warning() -> None:
    assert check_nixl_compat({"dtype": "bf16"}, {"dtype": "torch.bfloat16"}) == []
    assert fields(check_nixl_compat({"dtype": "auto"}, {"dtype": "bfloat16"})) == {"dtype": "warning"}
    assert fields(check_nixl_compat({"dtype": "float16"}, {"dtype": "bfloat16"})) == {"dtype": "error"}


def test_block_size_is_an_error_with_hma_and_attention_backend_auto_is_a_warning() -> None:
    found = check_nixl_compat({"block_size": 16, "attention_backend": "FLASH_ATTN"}, {"block_size": "32"})
    assert fields(found) == {"block_size": "error", "attention_backend": "warning"}


def test_settings_from_serve_reads_flags_and_env() -> None:
    got = settings_from_serve(
        [
            "/m",
            "--dtype=half",
            "--kv-cache-dtype",
            "fp8_e4m3",
            "--block-size",
            "32",
            "--no-disable-hybrid-kv-cache-manager",
        ],
        {"VLLM_KV_CACHE_LAYOUT": "HND", "VLLM_ATTENTION_BACKEND": "TRITON_ATTN"},
    )
    assert got == {
        "model": "/m",
        "dtype": "half",
        "kv_cache_dtype": "fp8_e4m3",
        "block_size": "32",
        "disable_hybrid_kv_cache_manager": False,
        "kv_cache_layout": "HND",
        "attention_backend": "TRITON_ATTN",
    }


def test_cross_layer_blocks_from_pdconnector_nixl_subconfig() -> None:
    ktc = json.dumps(
        {
            "kv_connector": "PdConnector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"nixl": {"enable_cross_layers_blocks": "True"}},
        }
    )
    prefill = settings_from_serve(["m", "--kv-transfer-config", ktc, "--disable-hybrid-kv-cache-manager"])
    decode = settings_from_serve(["m", "--kv-transfer-config", NIXL_KTC, "--disable-hybrid-kv-cache-manager"])
    assert fields(check_nixl_compat(prefill, decode)) == {"enable_cross_layers_blocks": "error"}


def test_push_prefill_with_pull_decode_is_an_error_and_pdkit_emits_one_mode() -> None:
    """vLLM 0.32 hashes the transfer mode: a push side and a pull side never complete a handshake."""
    from pdkit.config import NixlConfig
    from pdkit.kv_config import kv_transfer_config

    def settings(role: str, mode: str) -> dict:
        kv = kv_transfer_config(role, nixl=NixlConfig(mode=mode), as_dict=True)  # type: ignore[arg-type]
        return settings_from_serve(["m", "--kv-transfer-config", json.dumps(kv.kv_transfer_config), *kv.serve_args])

    assert settings("prefill", "push")["nixl_transfer_mode"] == "push"
    assert settings("decode", "pull")["nixl_transfer_mode"] == "pull"
    found = check_nixl_compat(settings("prefill", "push"), settings("decode", "pull"))
    assert [m.field for m in found if m.severity == "error"] == ["nixl_transfer_mode"]
    assert check_nixl_compat(settings("prefill", "push"), settings("decode", "push")) == []
