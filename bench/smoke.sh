#!/usr/bin/env bash
# Runs every benchmark of vramd-bench tiny (`--smoke`), only to prove that the
# harness still runs end to end: floor, SDK round trips, throughput,
# kill-to-grant, Python (if importable), scale, footprint, the gateway's
# added latency and the scheduling
# simulator. The figures mean nothing. A debug build is enough; scripts/test
# calls this when it exists. Fails if any section fails.
set -euo pipefail
cd "$(dirname "$0")/.."

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# `cargo run` builds the harness; the harness builds the daemon beside it.
timeout 600 cargo run --quiet -p vramd-bench -- \
  --smoke --json "$out/smoke.json" --markdown "$out/smoke.md" >/dev/null

for key in floor rtt_rust throughput kill_to_grant rtt_python scale footprint gateway scheduling targets; do
  if ! grep -q "\"$key\"" "$out/smoke.json"; then
    echo "bench/smoke.sh: no \"$key\" in the results" >&2
    exit 1
  fi
done
echo "bench smoke: ok ($(grep -o '"total_seconds": [0-9.]*' "$out/smoke.json"))"
