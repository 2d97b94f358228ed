#!/usr/bin/env bash
# The test command (README.md and .ci/run call exactly this): set up the three cached environments, lint, test.
#
# Part 1, vLLM 0.26.0's Python layer (PDKIT_VENV): ruff, then the whole suite with "$@".
# Part 2, vLLM 0.32.0's Python layer (PDKIT_VENV_032): the tests that use vLLM's real classes
#   (-m vllm) with the same "$@"; tests that hold for one release only skip themselves on the other
#   (tests/vllm_versions.py).  PDKIT_SKIP_032=1 runs part 1 only (quick local loops).
# Part 3, vLLM 0.33.0's Python layer (PDKIT_VENV_033; torch 2.13 CPU, see requirements/vllm033-cpu.txt):
#   the same -m vllm tests; PDKIT_SKIP_033=1 leaves it out.
# Extra args apply to every part (parts 2 and 3 put -m vllm first, so a -m of yours replaces it; a file or -k
# that selects no vLLM test makes parts 2 and 3 no-ops).  The wall time of each part is printed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
key=$(cat requirements/vllm-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-12)
key032=$(cat requirements/vllm032-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-12)
venv=${PDKIT_VENV:-$HOME/.cache/pdkit/venv-$key}
venv032=${PDKIT_VENV_032:-$HOME/.cache/pdkit/venv032-$key032}
key033=$(cat requirements/vllm033-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-12)
venv033=${PDKIT_VENV_033:-$HOME/.cache/pdkit/venv033-$key033}
t0=$SECONDS
bash scripts/setup_env.sh "$venv" 0.26.0
"$venv/bin/ruff" check pdkit connectors kernels tests scripts
"$venv/bin/ruff" format --check --quiet pdkit connectors kernels tests scripts
rc=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || rc=$?
t1=$SECONDS
echo "test.sh: part 1 (lint + suite, vLLM 0.26.0): rc=$rc, $((t1 - t0)) s" >&2
if [ "${PDKIT_SKIP_032:-0}" = "1" ]; then
  exit "$rc"
fi
bash scripts/setup_env.sh "$venv032" 0.32.0
rc032=0
"$venv032/bin/python" -m pytest -q -p no:cacheprovider -m vllm "$@" || rc032=$?
# pytest exits 5 when a narrowing -k/-m selects no vLLM test: nothing failed.
[ "$rc032" = 5 ] && rc032=0
t2=$SECONDS
rc033=0
if [ "${PDKIT_SKIP_033:-0}" != "1" ]; then
  bash scripts/setup_env.sh "$venv033" 0.33.0
  "$venv033/bin/python" -m pytest -q -p no:cacheprovider -m vllm "$@" || rc033=$?
  [ "$rc033" = 5 ] && rc033=0
fi
t3=$SECONDS
echo "test.sh: part 1 (vLLM 0.26.0): rc=$rc, $((t1 - t0)) s; part 2 (-m vllm, vLLM 0.32.0): rc=$rc032, $((t2 - t1)) s; part 3 (-m vllm, vLLM 0.33.0): rc=$rc033, $((t3 - t2)) s" >&2
[ "$rc" = 0 ] && [ "$rc032" = 0 ] && [ "$rc033" = 0 ]
