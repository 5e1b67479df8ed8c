#!/usr/bin/env bash
# The project's test command: creates its own virtual environment, installs
# the project with its cloud and dev extras from the package registries, runs
# the static checks and the whole test suite (unit tests, and integration
# tests that start real local servers themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAMPLEFLOW_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[cloud,dev]"
export PATH="$PWD/$VENV/bin:$PATH"
echo "== ruff"
ruff check edge_agent cloud tests
ruff format --check edge_agent cloud tests
echo "== mypy"
mypy
# kinesalite: the local Kinesis server for the resharding tests (npm).
bash scripts/install-kinesalite.sh
echo "== pytest"
pytest "$@"
