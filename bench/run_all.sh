#!/usr/bin/env bash
# Run every bench and rewrite the table in docs/benchmarks.md (see bench/run_all.py).
#   bash bench/run_all.sh            # full size: tens of minutes; not for CI
#   bash bench/run_all.sh --quick    # small sizes: shows each bench runs (figures labeled quick, not results)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" bench/run_all.py "$@"
