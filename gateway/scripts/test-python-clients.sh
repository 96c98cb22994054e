#!/usr/bin/env bash
# The official `ollama` and `openai` Python clients against vramd-gateway
# (the ignored test `the_official_ollama_and_openai_python_clients_work_through_the_gateway`):
# a virtualenv at .venv in the repository root (created if missing, as
# sdk-python/scripts/test.sh does) with both packages from PyPI.
# Run it from anywhere: bash gateway/scripts/test-python-clients.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv"
cd "$root"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ollama openai
VRAMD_GATEWAY_PYTHON="$venv/bin/python" cargo test -p vramd-tests --test gateway -- \
  --ignored --exact the_official_ollama_and_openai_python_clients_work_through_the_gateway
