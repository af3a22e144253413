#!/usr/bin/env bash
# The test suite: set up (including the services the tests start: Redis, Argilla, Chromium), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ingest`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --services
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest "$@"
