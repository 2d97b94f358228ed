"""Per-role KV-transfer configs, checked against vLLM 0.26.0's real KVTransferConfig (CPU import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdkit import kv_transfer_config
from pdkit.config import LMCacheConfig, NixlConfig, load_deployment
from pdkit.kv_config import DISABLE_HMA_FLAG, PD_CONNECTOR, PD_CONNECTOR_MODULE, kv_transfer_dict, nixl_mode_of
from pdkit.plan import build_plan

vllm_config = pytest.importorskip("vllm.config")


def test_prefill_is_pdconnector_producer_with_lmcache_and_nixl() -> None:
    ktc, args, env = kv_transfer_config("prefill", side_channel_port=5610, side_channel_host="10.0.0.5")
    assert isinstance(ktc, vllm_config.KVTransferConfig)
    assert ktc.kv_connector == PD_CONNECTOR
    assert ktc.kv_connector_module_path == PD_CONNECTOR_MODULE
    assert ktc.kv_role == "kv_producer" and ktc.is_kv_producer and not ktc.is_kv_consumer
    assert ktc.kv_connector_extra_config["nixl"]["backends"] == ["UCX"]
    assert "lmcache" in ktc.kv_connector_extra_config
    assert DISABLE_HMA_FLAG in args
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5610"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.5"
    assert env["LMCACHE_TRACK_USAGE"] == "false"
    assert env["LMCACHE_CHUNK_SIZE"] == "256"
    assert env["PYTHONHASHSEED"] == "0"


def test_decode_is_nixl_consumer_and_disables_hma_when_prefill_runs_lmcache() -> None:
    ktc, args, env = kv_transfer_config("decode", side_channel_port=5620)
    assert ktc.kv_connector == "NixlConnector"
    assert ktc.kv_role == "kv_consumer" and ktc.is_kv_consumer and not ktc.is_kv_producer
    assert ktc.kv_load_failure_policy == "recompute"
    assert DISABLE_HMA_FLAG in args
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5620"
    assert not any(k.startswith("LMCACHE_") for k in env)


def test_without_lmcache_both_sides_keep_hma_and_prefill_is_plain_nixl() -> None:
    off = LMCacheConfig(enabled=False)
    p, p_args, _ = kv_transfer_config("prefill", lmcache=off)
    d, d_args, _ = kv_transfer_config("decode", lmcache=off)
    assert p.kv_connector == "NixlConnector" and p.kv_role == "kv_producer"
    assert d.kv_connector == "NixlConnector"
    assert DISABLE_HMA_FLAG not in p_args and DISABLE_HMA_FLAG not in d_args
    agg, _, _ = kv_transfer_config("agg", lmcache=off)
    assert agg is None


def test_agg_is_lmcache_kv_both() -> None:
    ktc, args, env = kv_transfer_config("agg", lmcache=LMCacheConfig(cpu_gb=20, chunk_size=512))
    assert ktc.kv_connector == "LMCacheConnectorV1" and ktc.kv_role == "kv_both"
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "20" and env["LMCACHE_CHUNK_SIZE"] == "512"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env


@pytest.mark.parametrize("role", ["prefill", "decode", "agg"])
def test_dict_form_builds_an_equal_vllm_config(role: str) -> None:
    as_obj = kv_transfer_config(role).kv_transfer_config  # type: ignore[arg-type]
    as_dict = kv_transfer_config(role, as_dict=True).kv_transfer_config  # type: ignore[arg-type]
    assert isinstance(as_dict, dict)
    rebuilt = vllm_config.KVTransferConfig(**json.loads(json.dumps(as_dict)))
    # engine_id is a fresh uuid per instance (vLLM's __post_init__); every other field must match.
    rebuilt.engine_id = as_obj.engine_id
    assert rebuilt == as_obj


def test_nixl_backends_and_extra_keys_reach_both_roles() -> None:
    nixl = NixlConfig(backends=["UCX", "GDS"], extra_config={"kv_lease_duration": 60}, env={"UCX_TLS": "cuda_ipc"})
    for role in ("prefill", "decode"):
        ktc, _, env = kv_transfer_config(role, nixl=nixl)  # type: ignore[arg-type]
        extra = ktc.kv_connector_extra_config
        nixl_extra = extra["nixl"] if role == "prefill" else extra
        assert nixl_extra == {"backends": ["UCX", "GDS"], "kv_lease_duration": 60}
        assert env["UCX_TLS"] == "cuda_ipc"


def test_nixl_workers_get_cuda_ipc_get_enabled_unless_nixl_env_says_otherwise() -> None:
    """Without it UCX serves a same-GPU (or PCIe-only) NIXL READ over TCP (~0.5 GB/s, docs/gpu-results.md)."""
    for role in ("prefill", "decode"):
        assert kv_transfer_config(role).env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "on"  # type: ignore[arg-type]
        off = NixlConfig(env={"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "off"})
        assert kv_transfer_config(role, nixl=off).env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "off"  # type: ignore[arg-type]
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in kv_transfer_config("agg").env  # no NIXL there


def test_vllm_loads_the_pdconnector_class_from_the_module_path() -> None:
    ktc, _, _ = kv_transfer_config("prefill")
    factory = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.factory")
    cls = factory.KVConnectorFactory.get_connector_class(ktc)
    assert cls.__name__ == PD_CONNECTOR


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        kv_transfer_config("router")  # type: ignore[arg-type]


def test_import_pdkit_and_kv_transfer_config_without_vllm() -> None:
    """``import pdkit`` and the config function work where vllm cannot be imported at all."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import pdkit, pdkit.cli, pdkit.plan, pdkit.supervisor, pdkit.agent\n"
        "from pdkit import kv_transfer_config\n"
        "ktc, args, env = kv_transfer_config('prefill')\n"
        "assert isinstance(ktc, dict) and ktc['kv_connector'] == 'PdConnector', ktc\n"
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_verify_transfers_puts_pdconnector_on_both_roles() -> None:
    nixl = NixlConfig(verify_transfers=True)
    p, p_args, _ = kv_transfer_config("prefill", nixl=nixl)
    d, d_args, _ = kv_transfer_config("decode", nixl=nixl)
    assert p.kv_connector == d.kv_connector == PD_CONNECTOR
    assert p.kv_connector_extra_config["verify_transfers"] is True
    assert d.kv_role == "kv_consumer" and d.kv_connector_extra_config["lmcache"] is None
    assert d.kv_connector_extra_config["verify_transfers"] is True
    assert DISABLE_HMA_FLAG in p_args and DISABLE_HMA_FLAG in d_args


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("lmcache", [True, False])
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_the_agent_reads_the_nixl_mode_back_from_the_planned_engine_command(
    mode: str, lmcache: bool, verify: bool, tmp_path: Path
) -> None:
    """``WorkerInfo.nixl_mode`` comes from the worker's own --kv-transfer-config (plain NIXL or PdConnector)."""
    overrides = {"mode": "disagg", "nixl.mode": mode, "nixl.verify_transfers": verify, "lmcache.enabled": lmcache,
                 "run_dir": str(tmp_path)}  # fmt: skip
    plan = build_plan(load_deployment(None, overrides))
    workers = [p for p in plan.processes if p.role in ("prefill", "decode")]
    assert {p.role for p in workers} == {"prefill", "decode"}
    for p in workers:
        assert nixl_mode_of(p.argv) == mode, (p.name, p.argv)


def test_nixl_mode_is_none_without_a_readable_nixl_config() -> None:
    agg = json.dumps(kv_transfer_dict("agg"))
    assert nixl_mode_of(["serve", "--kv-transfer-config", agg]) is None  # LMCache only
    assert nixl_mode_of(["serve", "m"]) is None
    assert nixl_mode_of(["serve", "--kv-transfer-config", "{not json"]) is None
    assert nixl_mode_of(["serve", '--kv-transfer-config={"kv_connector": "NixlPushConnector"}']) == "push"
