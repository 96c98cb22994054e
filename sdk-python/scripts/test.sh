#!/usr/bin/env bash
# Tests of the Python SDK (sdk-python/), as scripts/test and CI run them:
#   - a virtualenv at .venv in the repository root (created if missing) with
#     maturin, pytest and pytest-timeout from PyPI;
#   - the binaries the tests start (cargo build -p vramd -p vramctl --bins);
#   - cargo fmt --check and cargo clippy -D warnings on sdk-python's own crate
#     (it is not a member of the root workspace);
#   - the wheel, built by maturin in release mode (what `pip install` builds,
#     and what the benchmark's Python figure measures: a debug build is
#     twice as slow per call) and installed into the virtualenv;
#   - pytest over sdk-python/tests, which fails if it collects no test.
# Run it from anywhere: bash sdk-python/scripts/test.sh [extra pytest args]
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
sdk="$root/sdk-python"
venv="$root/.venv"
cd "$root"

if [ ! -x "$venv/bin/python" ]; then
  echo "== python sdk: creating the virtualenv $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
echo "== python sdk: installing maturin and pytest"
"$py" -m pip install --quiet --disable-pip-version-check \
  "maturin>=1.5,<2" "pytest>=7" "pytest-timeout>=2"

echo "== python sdk: building the daemon"
cargo build --quiet -p vramd -p vramctl --bins
target_dir="${CARGO_TARGET_DIR:-$root/target}"
export VRAMD_BIN="${VRAMD_BIN:-$target_dir/debug/vramd}"

echo "== python sdk: cargo fmt"
(cd "$sdk" && cargo fmt -- --check)
echo "== python sdk: cargo clippy"
(cd "$sdk" && cargo clippy --quiet --all-targets -- -D warnings)

echo "== python sdk: building (release) and installing the wheel"
wheels="$sdk/target/test-wheels"
rm -rf "$wheels"
"$venv/bin/maturin" build --quiet --release --manifest-path "$sdk/Cargo.toml" \
  --interpreter "$py" --out "$wheels"
wheel="$(ls "$wheels"/vramd-*.whl)"
"$py" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"

echo "== python sdk: pytest"
cd "$sdk"
set +e
"$py" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests in $sdk/tests" >&2
  exit 1
fi
exit "$rc"
