"""The launch plan and the CLI's dry-run / config show / error handling (no GPU, nothing started)."""

from __future__ import annotations

import json
import shlex
from typing import Any

from pdkit.config import load_deployment
from pdkit.kv_config import DISABLE_HMA_FLAG
from pdkit.plan import build_plan


def _by_name(plan_json: dict) -> dict[str, dict]:
    return {p["name"]: p for p in plan_json["processes"]}


def test_disagg_dry_run_shows_roles_gpus_connectors_and_distinct_side_channels(run_cli) -> None:
    code, out, err = run_cli("launch", "disagg", "--prefill-gpu", "1", "--decode-gpu", "0", "--dry-run", "--json")
    assert code == 0, err
    procs = _by_name(json.loads(out))
    assert set(procs) == {"frontend", "prefill-0", "decode-0"}
    prefill, decode = procs["prefill-0"], procs["decode-0"]
    assert prefill["cuda_visible_devices"] == "1" and prefill["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert decode["cuda_visible_devices"] == "0"
    assert prefill["kv_transfer_config"]["kv_connector"] == "PdConnector"
    assert prefill["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert set(prefill["kv_transfer_config"]["kv_connector_extra_config"]) >= {"lmcache", "nixl"}
    assert decode["kv_transfer_config"]["kv_connector"] == "NixlConnector"
    assert decode["kv_transfer_config"]["kv_role"] == "kv_consumer"
    assert DISABLE_HMA_FLAG in decode["engine_argv"] and DISABLE_HMA_FLAG in prefill["engine_argv"]
    p_side, d_side = prefill["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"], decode["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert p_side != d_side
    assert prefill["env"]["PROMETHEUS_MULTIPROC_DIR"] != decode["env"]["PROMETHEUS_MULTIPROC_DIR"]
    # the engine command is a real `vllm serve` line carrying the same config
    argv = prefill["engine_argv"]
    assert argv[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == prefill["kv_transfer_config"]
    assert argv[argv.index("--load-format") + 1] == "dummy"  # embedded synthetic model, no weights
    events = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert events["topic"] == "prefill-0" and events["publisher"] == "zmq"


def test_disagg_text_dry_run_is_readable(run_cli) -> None:
    code, out, _ = run_cli("launch", "disagg", "--prefill-gpu", "1", "--decode-gpu", "0", "--dry-run")
    assert code == 0
    assert "[prefill-0]" in out and "[decode-0]" in out and "CUDA_VISIBLE_DEVICES=1" in out
    assert "PdConnector" in out and "kv_consumer" in out


def test_same_gpu_for_both_roles_exits_2_with_one_line(run_cli) -> None:
    code, out, err = run_cli("launch", "disagg", "--prefill-gpu", "0", "--decode-gpu", "0", "--dry-run")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "GPU 0" in lines[0] and "Traceback" not in err
    assert "--share-gpus" in lines[0]  # the fix, when sharing is what the user meant


def test_share_gpus_puts_both_roles_on_gpu0_with_half_the_memory_each(run_cli) -> None:
    code, out, err = run_cli("launch", "disagg", "--share-gpus", "--dry-run", "--json")
    assert code == 0, err
    workers = [p for p in json.loads(out)["processes"] if p["role"] != "frontend"]
    assert [w["cuda_visible_devices"] for w in workers] == ["0", "0"]
    for w in workers:
        argv = w["engine_argv"]
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"
    code, out, _ = run_cli("launch", "agg", "--share-gpus", "--workers", "2", "--dry-run", "--json")
    assert code == 0 and [p["cuda_visible_devices"] for p in json.loads(out)["processes"][1:]] == ["0", "0"]
    code, out, _ = run_cli("launch", "disagg", "--share-gpus", "--dry-run")
    assert code == 0 and "starts after: decode-0 (shared GPU)" in out  # the supervisor staggers them
    code, out, _ = run_cli("launch", "disagg", "--prefill-gpu", "1", "--decode-gpu", "0", "--dry-run")
    assert code == 0 and "starts after" not in out


def test_bad_flags_exit_2(run_cli) -> None:
    code, _, err = run_cli("launch", "disagg", "--prefill-gpu", "x", "--dry-run")
    assert code == 2 and "not a GPU id" in err
    code, _, err = run_cli("launch", "disagg", "--prefill-gpu", "0,1,2", "--prefill-tp", "2", "--dry-run")
    assert code == 2 and "TP groups of 2" in err
    code, _, err = run_cli("launch", "agg", "--model", "/nonexistent/model", "--dry-run")
    assert code == 2 and "model" in err and "does not exist" in err


def test_agg_dry_run_one_lmcache_worker_on_gpu0(run_cli) -> None:
    code, out, _ = run_cli("launch", "agg", "--dry-run", "--json")
    assert code == 0
    procs = _by_name(json.loads(out))
    assert set(procs) == {"frontend", "agg-0"}
    assert procs["agg-0"]["cuda_visible_devices"] == "0"
    assert procs["agg-0"]["kv_transfer_config"] == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}


def test_2p2d_and_tp2_plans(run_cli) -> None:
    code, out, _ = run_cli("launch", "disagg", "--prefill-gpus", "0,1", "--decode-gpus", "2,3", "--dry-run", "--json")
    assert code == 0
    procs = _by_name(json.loads(out))
    assert [procs[n]["cuda_visible_devices"] for n in ("prefill-0", "prefill-1", "decode-0", "decode-1")] == [
        "0", "1", "2", "3",
    ]  # fmt: skip
    sides = {procs[n]["ports"]["nixl_side_channel"] for n in procs if n != "frontend"}
    assert len(sides) == 4
    code, out, _ = run_cli(
        "launch", "disagg", "--prefill-gpus", "0,1", "--decode-gpus", "2,3", "--tp", "2", "--dry-run", "--json"
    )
    procs = _by_name(json.loads(out))
    assert procs["prefill-0"]["cuda_visible_devices"] == "0,1"
    argv = procs["decode-0"]["engine_argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_config_show_prints_role_json(run_cli) -> None:
    code, out, _ = run_cli("config", "show", "--mode", "disagg", "--role", "prefill")
    assert code == 0
    shown = json.loads(out)
    assert shown["kv_transfer_config"]["kv_connector"] == "PdConnector"
    assert DISABLE_HMA_FLAG in shown["serve_args"]
    code, _, err = run_cli("config", "show", "--mode", "agg", "--role", "decode")
    assert code == 2 and "no decode role" in err


def test_sim_plan_runs_sim_workers_without_gpus() -> None:
    dep = load_deployment(None, {"engine": "sim", "prefill.count": 2, "decode.count": 3})
    plan = build_plan(dep)
    workers = plan.workers()
    assert len(workers) == 5
    for w in workers:
        assert "sim-worker" in w.engine_argv and w.cuda_visible_devices is None and w.kv_transfer_config is None
        assert "--" in w.argv and shlex.join(w.argv).count("sim-worker") == 1


def test_handshake_mismatch_is_caught_at_configuration_time(run_cli, tmp_path) -> None:
    """NIXL's compatibility hash would reject this pair at the first request; pdkit refuses the plan."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text('prefill:\n  extra_args: ["--kv-cache-dtype", "fp8"]\n')
    code, _, err = run_cli("launch", "disagg", "--config", str(cfg), "--dry-run")
    assert code == 2
    assert "kv_cache_dtype" in err and "prefill-0/decode-0" in err and len(err.strip().splitlines()) == 1


def test_block_size_difference_is_a_plan_warning(run_cli, tmp_path) -> None:
    cfg = tmp_path / "bs.yaml"
    cfg.write_text('prefill:\n  extra_args: ["--block-size", "32"]\n')
    code, out, _ = run_cli("launch", "disagg", "--config", str(cfg), "--dry-run")
    assert code == 0 and "warning: prefill-0/decode-0" in out and "block_size" in out


def test_push_mode_uses_the_push_connector_on_both_sides() -> None:
    dep = load_deployment(None, {"nixl.mode": "push"})
    procs = {p.name: p for p in build_plan(dep).processes}
    assert procs["decode-0"].kv_transfer_config["kv_connector"] == "NixlPushConnector"  # type: ignore[index]
    extra = procs["prefill-0"].kv_transfer_config["kv_connector_extra_config"]  # type: ignore[index]
    assert extra["nixl_connector"] == "NixlPushConnector"


def test_plan_says_whether_decodes_are_seeded_and_why(run_cli: Any) -> None:
    """The plan's seeding line follows the frontend's rule (pdkit.stack.seeds_by_default): on where the
    release is proven on a GPU (0.26.0) or on the simulator, off (with the fix) on 0.32.0, forced by the
    setting; no line in agg mode (nothing to seed)."""

    def seeding(**overrides: object) -> str | None:
        return build_plan(load_deployment(None, overrides)).seeding

    assert seeding(mode="disagg", vllm_version="0.26.0") == "on (proven on a GPU with vLLM 0.26.0)"
    off = seeding(mode="disagg", vllm_version="0.32.0")
    assert off is not None and off.startswith("off: not yet proven on a GPU with vLLM 0.32.0")
    assert "frontend.seed_first_token: true forces it" in off
    assert seeding(mode="disagg", engine="sim") == "on (the simulator serves seeded decodes)"
    forced = {"mode": "disagg", "vllm_version": "0.32.0", "frontend.seed_first_token": True}
    assert seeding(**forced) == "on (frontend.seed_first_token: true)"
    assert seeding(mode="agg") is None
    code, out, _ = run_cli("launch", "disagg", "--dry-run", "--vllm-version", "0.32.0")
    assert code == 0 and "first-token seeding: off: not yet proven" in out
