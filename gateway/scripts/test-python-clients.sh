#!/usr/bin/env bash
# The official `ollama` and `openai` Python clients against vramd-gateway
# (the ignored tests `the_official_ollama_and_openai_python_clients_work_through_the_gateway`
# in front of the fake Ollama, and `the_official_openai_python_client_works_through_an_openai_app`
# in front of the fake OpenAI-compatible server):
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
VRAMD_GATEWAY_PYTHON="$venv/bin/python" cargo test -p vramd-tests --test gateway_openai -- \
  --ignored --exact the_official_openai_python_client_works_through_an_openai_app
