"""pdkit installed from its built wheel (not ``-e``) finds its presets and embedded model and serves.

Why: from a wheel, ``--config disagg-2p2d`` once looked the presets up in a source checkout that is not
there.  The wheel is built from a copy of this tree (no build isolation, no index: offline), unpacked
with ``pip install --no-deps --target``, and run with this venv's Python from a folder outside the
checkout, so the dependencies come from the venv and pdkit only from the wheel.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "pdkit-run", ".venv*", "*.pyc")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(tmp / "dist")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("pdkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"pdkit/configs/{preset.name}" in names
    assert "pdkit/configs/grafana/pdkit.json" in names  # README: import it into Grafana
    for model_file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert f"pdkit/models/synth-llama-8b/{model_file}" in names
    site = tmp / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_pdkit_comes_from_the_wheel_and_finds_its_presets(wheel_site: Path, tmp_path: Path) -> None:
    code = "import pdkit, pdkit.config as c, pdkit.connectors as k; print(pdkit.__file__, c.presets_dir(), k.__file__)"
    result = run_installed(wheel_site, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    files = [Path(p) for p in result.stdout.split()]
    assert all(p.is_relative_to(wheel_site) for p in files), files


def test_preset_dry_run_from_the_wheel(wheel_site: Path, tmp_path: Path) -> None:
    args = ["-m", "pdkit.cli", "launch", "disagg", "--engine", "sim", "--config", "disagg-2p2d", "--dry-run"]
    result = run_installed(wheel_site, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.count("sim-worker --role prefill") == 2 and result.stdout.count("sim-worker --role decode") == 2
    )
    assert f"model={wheel_site}" in result.stdout  # the embedded model ships in the wheel


def test_readme_main_command_smoke_test_from_the_wheel(wheel_site: Path, tmp_path: Path) -> None:
    from pdkit.config import load_deployment
    from pdkit.plan import build_plan
    from pdkit.ports import busy_ports

    offset = next(
        o
        for o in random.sample(range(10000, 50000, 1000), 40)
        if not busy_ports(build_plan(load_deployment(None, {"engine": "sim", "port_offset": o})))
    )
    args = ["-m", "pdkit.cli", "launch", "disagg", "--engine", "sim", "--smoke-test", "--port-offset", str(offset)]
    result = run_installed(wheel_site, tmp_path, *args, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pdkit smoke test: the model answered" in result.stdout
