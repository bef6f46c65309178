#!/usr/bin/env bash
# Start a local Ray head with the dashboard and job server bound to loopback, submit a job, and stop the head.
# Usage: launch/local.sh JOB.yaml [--set key=value ...]
# Ports (all on 127.0.0.1): $RAY_PORT (GCS, 6379), $RAY_DASHBOARD_PORT (dashboard + job API, 8265),
# $RAY_METRICS_PORT (Prometheus metrics, 8080). Ray's token authentication is on: the CLI and the cluster share the
# token in ~/.ray/auth_token (created by `ray get-auth-token --generate` if absent).
set -euo pipefail
JOB="${1:?usage: launch/local.sh JOB.yaml [--set key=value ...]}"; shift
PORT="${RAY_PORT:-6379}"
DASH="${RAY_DASHBOARD_PORT:-8265}"
METRICS="${RAY_METRICS_PORT:-8080}"
export RAY_AUTH_MODE=token
# Arrow on jemalloc in every Ray process (pyarrow's mimalloc keeps freed Parquet pages: batchrun/worker.py)
export ARROW_DEFAULT_MEMORY_POOL="${ARROW_DEFAULT_MEMORY_POOL:-jemalloc}"
[ -f "$HOME/.ray/auth_token" ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || ray get-auth-token --generate >/dev/null
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
  --metrics-export-port="$METRICS" --disable-usage-stats
trap 'ray stop' EXIT
echo "dashboard: http://127.0.0.1:$DASH   metrics: http://127.0.0.1:$METRICS/metrics"
ray job submit --address "http://127.0.0.1:$DASH" -- batchrun run "$JOB" "$@"
