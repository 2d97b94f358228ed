#!/usr/bin/env bash
# The test command (README.md and .ci/run call exactly this): set up the cached environment, lint, test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
key=$(cat requirements/vllm-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-12)
venv=${PDKIT_VENV:-$HOME/.cache/pdkit/venv-$key}
bash scripts/setup_env.sh "$venv"
"$venv/bin/ruff" check pdkit connectors kernels tests scripts
"$venv/bin/ruff" format --check --quiet pdkit connectors kernels tests scripts
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
