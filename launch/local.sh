#!/usr/bin/env bash
# Start a local Ray head bound to loopback (dashboard and job server on 127.0.0.1 only), then submit a job.
# Usage: launch/local.sh JOB.yaml [--set key=value ...]
set -euo pipefail
JOB="${1:?usage: launch/local.sh JOB.yaml [--set key=value ...]}"; shift
PORT="${RAY_PORT:-6379}"
DASH="${RAY_DASHBOARD_PORT:-8265}"
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH"
trap 'ray stop' EXIT
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . -- batchrun run "$JOB" "$@"
