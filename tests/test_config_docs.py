"""docs/configuration.md is generated from pdkit/config.py's models (pdkit/config_docs.py) and kept current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pdkit.config import Deployment
from pdkit.config_docs import COMMAND, DOC_PATH, generate, undocumented

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_has_a_description() -> None:
    missing = undocumented()
    assert not missing, f"settings without a docstring in pdkit/config.py: {', '.join(missing)}"


def test_docs_configuration_md_is_current() -> None:
    path = ROOT / DOC_PATH
    current = path.read_text() if path.is_file() else ""
    assert current == generate(), f"{DOC_PATH} is stale: run `{COMMAND}`"


def test_the_command_prints_the_document() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pdkit.config_docs"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == generate()


def test_the_document_has_every_key_with_its_default() -> None:
    doc = generate()
    for name in Deployment.model_fields:
        assert f"| `{name}` |" in doc
    assert "| `frontend.port` | int (>= 1, <= 65535) | `8000` |" in doc
    assert "| `<role>.http_port_base` | int (>= 1, <= 65535) | `8200` / `8300` / `8400` |" in doc
    assert "| `lmcache.disk_gb` | float (> 0) \\| null | `null` |" in doc
    assert "| `lmcache.verify_restores` | bool | `false` | Restores are never silently wrong:" in doc


def test_readme_links_the_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/configuration.md" in readme
    assert "| `frontend.port`" not in readme  # the table lives in docs/configuration.md only
