#!/usr/bin/env bash
# Start a Ray head on this machine, bound to 127.0.0.1 only (DESIGN.md "Running locally"), that takes
# jobs through its dashboard:
#
#   cluster/start_local.sh                       # NUM_CPUS=4, RAY_DASHBOARD_PORT=8265 by default
#   export RAY_ADDRESS=http://127.0.0.1:8265     # printed below
#   ray job submit --working-dir . -- pcpp run pipelines/configs/...
#   cluster/stop_local.sh
#
# Extra arguments go to `ray start` (e.g. --temp-dir=/tmp/ray-pcpp --port=6380). The Python equivalent,
# which also waits for the dashboard, is cluster.head.start_head().
# Ray 2.60 turns token authentication on when this user has a token (~/.ray/auth_token, which a local
# ray.init() creates): clients then need RAY_AUTH_MODE=token, printed below when it applies.
# Clients also need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (printed too) for `ray status` and ray.init.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
else
    echo "start_local.sh: no ray executable: run 'make install' (creates .venv) first" >&2
    exit 1
fi

PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 "$RAY" start --head \
    --num-cpus="${NUM_CPUS:-4}" \
    --node-ip-address=127.0.0.1 \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$PORT" \
    --disable-usage-stats \
    "$@"

echo
echo "Ray head up on 127.0.0.1. To submit jobs from this shell:"
echo "export RAY_ADDRESS=http://127.0.0.1:$PORT"
# Without it Ray rewrites 127.0.0.1 in `ray status` / ray.init addresses to this machine's outward IP.
echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
if [[ "${RAY_AUTH_MODE:-}" != "disabled" && ( -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ) ]]; then
    echo "export RAY_AUTH_MODE=token"
fi
