#!/usr/bin/env bash
# The demo in one command: creates (or reuses) the project's virtual
# environment, installs the project with its cloud and local extras from the
# package registries (the local servers MiniStack and SecantusDB come with
# the local extra), then runs `sampleflow demo`, which starts the local stack,
# replays CTU-13 scenario 6 through it, prints a report and stops the stack.
# Extra arguments go to the demo (`bash scripts/demo.sh --minutes 20`).
# Needs Python 3.11+ and Java 17+ (the Spark engine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAMPLEFLOW_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if ! command -v java >/dev/null 2>&1; then
    echo "demo: java not found; the Spark engine needs Java 17+" \
        "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Install once per version of pyproject.toml (pip is slow to find out that
# nothing changed).
STAMP="$VENV/.sampleflow-demo-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "demo: installing sampleflow[cloud,local] into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[cloud,local]"
    echo "$WANT" > "$STAMP"
fi
exec "$VENV/bin/sampleflow" demo "$@"
