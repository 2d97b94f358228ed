"""The Triton fingerprint kernel on CPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs the kernel's exact integer program on CPU tensors, so kernel == torch reference
is checked here for real, for every layout and dtype, by running the GPU check script itself in
interpreter mode (a subprocess, because the interpreter is chosen when triton.jit decorates the
kernel). What it cannot show is GPU-only behaviour: compiled code generation and speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script_under_interpreter(out: Path, script: str, *args: str) -> dict:
    """Run ``scripts/<script>.py ARGS`` with TRITON_INTERPRET=1 and $OUT=out; its JSON report, once it exited 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / f"{script}.json").read_text())


def test_gpu_check_script_passes_under_triton_interpreter(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    report = run_script_under_interpreter(tmp_path, "gpu_check_fingerprint", "--device", "cpu", "--small")
    assert report["ok"] and report["interpreter"]
    names = {c["name"] for c in report["cases"]}
    assert {f"{layout}/{dt}" for layout in ("HND", "NHD") for dt in ("bf16", "fp16", "fp8_e4m3")} <= names
    for case in report["cases"]:
        if case["name"] != "vllm_reshape":
            assert case["kernel_eq_reference"] and case["flip"]["reported"] == [case["flip"]["block"]], case


def test_kernel_module_stays_out_of_plain_imports() -> None:
    """``import pdkit.kernels.fingerprint`` must not pull triton in (CPU-only installs, API server)."""
    code = "import sys, pdkit.kernels, pdkit.kernels.fingerprint as f; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bench_script_smoke_run_under_interpreter(tmp_path: Path) -> None:
    """The GPU benchmark's code path on tiny CPU tensors (catches script bugs; says nothing about speed)."""
    pytest.importorskip("triton")
    report = run_script_under_interpreter(tmp_path, "bench_fingerprint", "--cpu-smoke")
    assert {(c["dtype"], c["layout"]) for c in report["cases"]} == {
        (d, lay) for d in ("bf16", "fp8_e4m3") for lay in ("HND", "NHD")
    }
    assert all(c["reference_spot_check"] for c in report["cases"])
    assert all(s["same_result"] for s in report["sweep_bf16_HND"])
