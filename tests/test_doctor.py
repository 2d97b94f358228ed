"""``pdkit doctor`` and the stack check ``pdkit launch`` runs before any vLLM engine.

This machine is read for real (package metadata, ``nvidia-smi``, a torch subprocess).  Situations that
need a GPU machine (an H200 with a mismatched lmcache, vLLM 0.33) use synthetic :class:`Facts`, a fake
named as such: everything from the facts on is pdkit's real verdict code and CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdkit import doctor
from pdkit.doctor import Facts, diagnose

needs_cpu_only = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
FAKE_GPU = ["GPU 0: NVIDIA H200 (fake: synthetic facts)"]


def fake_gpu_machine(**versions: str | None) -> Facts:
    """Fake: the facts of a GPU machine with these packages (the real probe needs one)."""
    base: dict[str, str | None] = {"vllm": "0.32.0", "torch": "2.13.0", "lmcache": "0.5.6", "nixl": "1.5.1"}
    base.update(versions)
    return Facts(versions=base, gpus=list(FAKE_GPU), torch_cuda="13.0")


@needs_cpu_only
def test_doctor_on_this_cpu_machine_says_sim_only_exit_0(run_cli) -> None:
    code, out, err = run_cli("doctor")
    assert code == 0, err
    assert "verdict: sim-only" in out and "GPUs     0" in out
    code, out, _ = run_cli("doctor", "--json")
    report = json.loads(out)
    assert code == 0 and report["verdict"] == "sim-only" and report["gpus"] == []
    assert set(report["versions"]) == {"vllm", "torch", "lmcache", "nixl"}


def test_known_good_gpu_stack_is_ok() -> None:
    diagnosis = diagnose(fake_gpu_machine())
    assert (diagnosis.verdict, diagnosis.errors, diagnosis.exit_code) == ("ok", [], 0)
    assert diagnose(fake_gpu_machine(vllm="0.26.0", torch="2.11.0", lmcache="0.5.2")).verdict == "ok"


def test_lmcache_built_for_another_torch_is_refused_with_the_fix() -> None:
    diagnosis = diagnose(fake_gpu_machine(lmcache="0.5.2"))
    assert diagnosis.verdict == "refused" and diagnosis.exit_code == 2
    assert diagnosis.errors == [
        "lmcache 0.5.2 is built for torch 2.11, this is torch 2.13.0; pip install lmcache==0.5.6 "
        "or run with --no-lmcache"
    ]
    # Without in-process LMCache the same wheel is only a warning.
    assert diagnose(fake_gpu_machine(lmcache="0.5.2"), lmcache_enabled=False).verdict == "ok"


def test_newer_vllm_than_pdkit_knows_is_refused() -> None:
    diagnosis = diagnose(fake_gpu_machine(vllm="0.34.0", torch="2.14.0"))
    assert diagnosis.verdict == "refused"
    first = diagnosis.errors[0]
    assert "vLLM 0.34.0 is untested" in first and "no lmcache release is built for its torch 2.14.0" in first
    assert "--allow-untested-stack" in first


def test_a_release_in_the_table_but_never_run_is_refused_too() -> None:
    """vLLM 0.33.0 is in the version table (its names read from the wheel) but no GPU check ran on it."""
    diagnosis = diagnose(fake_gpu_machine(vllm="0.33.0", torch="2.14.0", lmcache=None), lmcache_enabled=False)
    assert diagnosis.verdict == "refused" and "vLLM 0.33.0 is untested" in diagnosis.errors[0]


def test_extension_that_does_not_load_with_this_torch_is_refused() -> None:
    facts = fake_gpu_machine()
    facts.lmcache_extension = {
        "module": "lmcache.cuda_ops",
        "ok": False,
        "detail": "ImportError: undefined symbol: _ZN3c10",
    }
    assert "lmcache.cuda_ops does not load" in diagnose(facts).errors[0]


def test_doctor_cli_refuses_a_faked_mismatch_with_one_line(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "gather", lambda: fake_gpu_machine(lmcache="0.5.2"))
    code, out, err = run_cli("doctor")
    assert code == 2 and "verdict: refused" in out
    assert err.strip().splitlines() == [
        "pdkit: error: stack: lmcache 0.5.2 is built for torch 2.11, this is torch 2.13.0; pip install "
        "lmcache==0.5.6 or run with --no-lmcache"
    ]
    code, out, _ = run_cli("doctor", "--json")
    assert code == 2 and json.loads(out)["verdict"] == "refused"


def test_launch_runs_the_check_before_any_engine(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import pdkit.supervisor

    started: list[object] = []
    monkeypatch.setattr(pdkit.supervisor, "run_launch", lambda plan, smoke_test=False: started.append(plan) or 0)
    monkeypatch.setattr(doctor, "gather", lambda: fake_gpu_machine(vllm="0.34.0", torch="2.14.0"))
    args = ("launch", "disagg", "--prefill-gpu", "1", "--decode-gpu", "0", "--run-dir", str(tmp_path))
    code, _, err = run_cli(*args)
    assert code == 2 and started == []
    assert len(err.strip().splitlines()) == 1 and "pdkit: error: stack: vLLM 0.34.0 is untested" in err
    code, _, err = run_cli(*args, "--allow-untested-stack")
    assert code == 0 and len(started) == 1 and "untested stack allowed" in err
    code, _, _ = run_cli("launch", "disagg", "--engine", "sim", "--run-dir", str(tmp_path))  # sim: no check
    assert code == 0 and len(started) == 2


@needs_cpu_only
def test_launch_with_vllm_on_this_cpu_machine_exits_2(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import pdkit.supervisor

    monkeypatch.setattr(pdkit.supervisor, "run_launch", lambda plan, smoke_test=False: pytest.fail("started"))
    code, _, err = run_cli("launch", "agg", "--run-dir", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("pdkit: error: stack: ")


def test_python_dash_m_pdkit_is_the_pdkit_command(tmp_path: Path) -> None:
    """``python -m pdkit`` works where no console script was installed (``pip install --target``, as on
    the GPU machines): the same doctor, the same one-line refusal with exit code 2."""
    ok = subprocess.run([sys.executable, "-m", "pdkit", "doctor"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode in (0, 2) and "verdict:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pdkit", "--bogus"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("pdkit: error:") and "Traceback" not in bad.stderr
