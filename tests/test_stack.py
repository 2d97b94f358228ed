"""The version table (pdkit/stack.py) and the plans it yields for vLLM 0.26.0 and 0.32.0.

The dry-run plans need no vLLM; the checks marked ``vllm`` feed the plan for the *installed* release to
that release's real KVTransferConfig and connector factory (scripts/test.sh runs them on 0.26 and 0.32).
"""

from __future__ import annotations

import json

import pytest

from pdkit import stack as stacks
from pdkit.config import load_deployment
from pdkit.kv_config import DISABLE_HMA_FLAG, kv_transfer_config
from pdkit.plan import build_plan


def _plan(run_cli, *args: str) -> dict[str, dict]:
    code, out, err = run_cli(
        "launch", "disagg", "--prefill-gpu", "1", "--decode-gpu", "0", "--dry-run", "--json", *args
    )
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0"])
def test_dry_run_plan_for_each_known_version(run_cli, version: str) -> None:
    plan = _plan(run_cli, "--vllm-version", version)
    assert plan["vllm_stack"] == {"vllm": version, "status": stacks.STACKS[version].status, "known": True,
                                  "source": "config"}  # fmt: skip
    procs = {p["name"]: p for p in plan["processes"]}
    prefill, decode = procs["prefill-0"]["kv_transfer_config"], procs["decode-0"]["kv_transfer_config"]
    assert prefill["kv_connector"] == "PdConnector" and prefill["kv_role"] == "kv_producer"
    extra = prefill["kv_connector_extra_config"]
    assert extra["nixl_connector"] == "NixlConnector"  # registered on both (0.32: alias of NixlPullConnector)
    assert extra["lmcache_connector"] == "LMCacheConnectorV1"
    assert decode == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute",
                      "kv_connector_extra_config": {"backends": ["UCX"]}}  # fmt: skip
    for name in ("prefill-0", "decode-0"):
        assert DISABLE_HMA_FLAG in procs[name]["engine_argv"]
        env = procs[name]["env"]
        assert env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "on" and "VLLM_NIXL_SIDE_CHANNEL_PORT" in env
    assert procs["prefill-0"]["env"]["LMCACHE_TRACK_USAGE"] == "false"


def test_agg_and_push_names_come_from_the_table() -> None:
    for version, stack in stacks.STACKS.items():
        agg = kv_transfer_config("agg", as_dict=True, vllm_version=version).kv_transfer_config
        if stack.lmcache_in_process:
            assert agg == {"kv_connector": stack.lmcache_connector, "kv_role": "kv_both"}
        else:  # vLLM 0.33: LMCache only in multi-process mode (docs/lmcache-mp.md)
            assert agg is not None and agg["kv_connector"] == stack.lmcache_mp_connector
        dep = load_deployment(None, {"mode": "disagg", "vllm_version": version, "nixl.mode": "push"})
        decode = next(p for p in build_plan(dep).workers() if p.role == "decode")
        assert decode.kv_transfer_config is not None
        assert decode.kv_transfer_config["kv_connector"] == stack.nixl_push_connector == "NixlPushConnector"


def test_unknown_versions_are_planned_like_the_nearest_known_and_marked_untested() -> None:
    newer = stacks.stack_for("0.34.0")
    assert (newer.known, newer.status, newer.vllm, newer.torch) == (False, "untested", "0.34.0", "2.14.0")
    older = stacks.stack_for("0.25.1")
    assert (older.known, older.torch) == (False, "2.11.0")
    assert stacks.stack_for("0.32.0rc1").known  # release candidates of a known release count as it
    assert stacks.stack_for(None).vllm == stacks.DEFAULT_VERSION


def test_without_vllm_the_plan_is_the_default_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stacks, "installed_version", lambda name: None)  # a machine without vllm (sim, CI lint)
    assert stacks.plan_stack().vllm == stacks.DEFAULT_VERSION
    assert stacks.plan_stack("0.26.0").vllm == "0.26.0"  # configured wins, nothing read


def test_lmcache_facts_from_the_wheels() -> None:
    assert stacks.lmcache_extension_module("0.5.2") == "lmcache.c_ops"
    assert stacks.lmcache_extension_module("0.5.6") == "lmcache.cuda_ops"
    assert stacks.lmcache_torch("0.5.2") == "2.11" and stacks.lmcache_torch("0.5.6") == "2.13"
    assert stacks.lmcache_torch("0.5.7") is None
    for stack in stacks.STACKS.values():  # every stack that runs LMCache in-process has one built for its torch
        built_for = stacks.lmcache_torch(stack.lmcache) or "0.0"
        assert not stack.lmcache_in_process or stacks.same_minor(built_for, stack.torch)


def test_bad_vllm_version_in_config_is_one_line_exit_2(run_cli) -> None:
    code, out, err = run_cli("launch", "disagg", "--vllm-version", "latest", "--dry-run")
    assert code == 2 and "vllm_version" in err and len(err.strip().splitlines()) == 1


@pytest.mark.vllm
def test_installed_vllm_accepts_its_own_plan() -> None:
    """The installed release's real KVTransferConfig takes every role's dict (0.32 rejects unknown fields)
    and its factory resolves every connector name the table gives it, PdConnector's children included."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    stack = stacks.plan_stack()
    assert stack.known, f"installed vLLM {stack.vllm} is not in pdkit/stack.py"
    for role in ("prefill", "decode", "agg"):
        fields = kv_transfer_config(role, as_dict=True).kv_transfer_config
        KVTransferConfig(**fields)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    for name in sorted(stack.connector_names()):
        cls = KVConnectorFactory.get_connector_class(KVTransferConfig(kv_connector=name, kv_role="kv_both"))
        assert issubclass(cls, KVConnectorBase_V1), name
