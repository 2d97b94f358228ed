"""``scripts/gpu_check_stack.py`` (issue 15's GPU checks) on CPU: its plans, and a rehearsal of both stages.

The rehearsal is the real script end to end -- ``pdkit launch`` with simulated engines (``--engine sim``,
no GPU: the only stand-in), real frontend and agents on loopback, free ports -- so the stage logic, the
JSON verdicts, the KV-prediction comparison and the clean stop are what runs on the H200 later.  The
``vllm bench serve`` command line is checked against vLLM's own argument parser instead of run (its
import alone takes ~20 s on this machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check_stack.py"


def run_script(*args: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_dry_run_prints_both_valid_plans(tmp_path: Path) -> None:
    done = run_script("--dry-run", out=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    agg, disagg = done.stdout.split("== stage disagg")
    assert "pdkit launch agg --enforce-eager --share-gpus" in agg
    assert "[agg-1]" in agg and "starts after: agg-0 (shared GPU)" in agg
    assert "--policy kv_aware" in agg and "--gpu-memory-utilization 0.45" in agg
    # one deployment for (a)-(c), (e): faults on decode, verification both sides, no prefix cache on prefill
    assert "PDKIT_VERIFY_INJECT_FAULT=11" in disagg
    assert disagg.count('"verify_transfers":true') == 2
    prefill = disagg.split("[prefill-0]")[1]
    assert "--no-enable-prefix-caching" in prefill and "starts after: decode-0 (shared GPU)" in prefill
    assert "--max-model-len 8192" in prefill and "--enforce-eager" in prefill


def test_sim_rehearsal_of_both_stages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("--engine", "sim", "--quick", "--free-ports", "--skip-vllm-bench", "--state-dir", str(tmp_path / "st"))
    done = run_script(*args, out=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    agg = json.loads((out / "gpu_check_stack_agg.json").read_text())
    disagg = json.loads((out / "gpu_check_stack_disagg.json").read_text())
    assert agg["ok"] and disagg["ok"]
    a, d = agg["checks"], disagg["checks"]
    assert a["agg_reference_served"]["verdict"] is True
    kv = a["d_kv_prediction"]
    assert kv["verdict"] is True and kv["actual"] > 0 and kv["predicted"] == kv["actual"]
    assert {r["worker"] for r in kv["rows"]} == {"agg-0", "agg-1"} and kv["heartbeats_agree"]
    assert a["f_doctor"]["status"] in ("absent", "recorded", "output is not JSON")
    assert d["a_disagg_equals_agg"]["verdict"] is True and d["a_disagg_equals_agg"]["pass2_equal"] == "4/4"
    assert d["b_lmcache_restore"]["status"].startswith("n/a on sim")
    assert d["c_verify_faults"]["status"].startswith("n/a on sim")
    assert d["d_kv_prediction_info"]["verdict"] is None
    assert d["e_vllm_bench"]["status"].startswith("skipped")
    for stage in (a, d):
        assert stage["stopped_clean"]["verdict"] is True and stage["stopped_clean"]["leftover"] == []
    assert (out / "logs_stack_agg.tar.gz").is_file() and (out / "logs_stack_disagg.tar.gz").is_file()
    assert "stage disagg (sim): PASS" in done.stdout and "e_vllm_bench" in done.stdout


def test_disagg_without_agg_reference_is_one_clear_error(tmp_path: Path) -> None:
    args = ("--stage", "disagg", "--engine", "sim", "--quick", "--free-ports", "--state-dir", str(tmp_path / "st"))
    done = run_script(*args, out=tmp_path / "out", timeout=60)
    assert done.returncode == 1
    report = json.loads((tmp_path / "out" / "gpu_check_stack_disagg.json").read_text())
    assert "run --stage agg first" in report["error"] and not report["ok"]


def load_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_stack", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_reuse_verdict_counts_whole_chunks_only_in_mp_mode() -> None:
    """An MP server stores whole 256-token chunks: a 120-token prompt has nothing to restore there and a
    400-token one 256 tokens; in-process (save_unfull_chunk) the whole prompt counts."""
    module = load_script()
    rows = [{"prompt_tokens": 120, "lmcache_hit_tokens": 0}, {"prompt_tokens": 400, "lmcache_hit_tokens": 256},
            {"prompt_tokens": 512, "lmcache_hit_tokens": 511}]  # fmt: skip
    assert module.reuse_ratios(rows, mp=True) == [1.0, 511 / 512] and module.reused(rows, mp=True)
    assert not module.reused(rows, mp=False)  # in-process the 120- and 400-token prompts would be misses
    assert not module.reused(rows[:1], mp=True)  # nothing restorable proves nothing
    assert not module.reused([{"prompt_tokens": 900, "lmcache_hit_tokens": 0}], mp=True)  # LMCache off


@pytest.mark.vllm
def test_vllm_bench_command_parses_with_vllms_own_parser() -> None:
    pytest.importorskip("vllm")
    from vllm.benchmarks.serve import add_cli_args

    module = load_script()
    argv = module.vllm_bench_argv("http://127.0.0.1:8000", module.Workload())
    assert argv[1:6] == ["-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend"]
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args(argv[5:])
    assert (ns.dataset_name, ns.num_prompts, ns.request_rate, ns.ignore_eos) == ("random", 200, 8.0, True)
    assert ns.random_input_len == 1024 and ns.random_output_len == 64 and ns.save_result


def test_mp_mode_plans_issue_16s_deployments(tmp_path: Path) -> None:
    """``--lmcache-mode mp``: the agg reference runs without LMCache, the prefill gets an ``lmcache server``
    and LMCacheMPConnector with restore checks, and the restart stage's one agg worker runs its own server
    with the prefix cache off (every reuse goes through the server)."""
    done = run_script("--dry-run", "--lmcache-mode", "mp", out=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    agg, disagg = done.stdout.split("== stage disagg")
    assert "-lmcache]" not in agg and "LMCache" not in agg.split("[agg-0]")[1]
    assert "[prefill-0-lmcache]" in disagg and "serves: prefill-0" in disagg
    assert '"lmcache_connector":"LMCacheMPConnector"' in disagg and '"verify_restores":true' in disagg
    done = run_script("--dry-run", "--stage", "restart", out=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    worker = done.stdout.split("[agg-0]")[1]
    assert "[agg-0-lmcache]" in done.stdout and "lmcache.cli.main server" in done.stdout
    assert '"verify_restores":true' in worker and "--no-enable-prefix-caching" in worker
    assert '"kv_load_failure_policy":"recompute"' in worker and "[agg-1]" not in done.stdout
    done = run_script("--dry-run", "--stage", "p5", out=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "-lmcache]" not in done.stdout and '"kv_connector":"LMCacheConnectorV1"' in done.stdout


def test_sim_rehearsal_of_the_restart_and_p5_stages(tmp_path: Path) -> None:
    """The restart and p5 stages end to end on simulated engines (no LMCache there: its checks say n/a):
    passes against the agg reference before and after the (skipped) kill, P5's figures, clean stops."""
    out = tmp_path / "out"
    common = ("--engine", "sim", "--quick", "--free-ports", "--skip-vllm-bench", "--state-dir", str(tmp_path / "st"))
    for stage in ("agg", "restart", "p5"):
        done = run_script("--stage", stage, "--lmcache-mode", "mp", *common, out=out)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    restart = json.loads((out / "gpu_check_stack_restart.json").read_text())
    assert restart["ok"], restart
    c = restart["checks"]
    assert c["g_mp_equals_agg"]["verdict"] is True and c["g_mp_equals_agg"]["restore_equal"] == "4/4"
    assert c["g_mp_reuse"]["status"].startswith("n/a on sim")
    assert c["h_server_restart_under_load"]["verdict"] is None
    assert c["i_after_restart_equals_agg"]["verdict"] is True
    p5 = c["p5_ttft_mp"]
    assert len(p5["cold_ttft_ms"]) == len(p5["warm_ttft_ms"]) == 2 and all(p5["warm_equals_cold"])
    assert c["stopped_clean"]["verdict"] is True
    in_process = json.loads((out / "gpu_check_stack_p5.json").read_text())
    assert in_process["ok"] and in_process["checks"]["p5_ttft_in_process"]["prompt_tokens"] == 600
