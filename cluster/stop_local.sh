#!/usr/bin/env bash
# Stop the Ray head started by cluster/start_local.sh (extra arguments go to `ray stop`, e.g. --force).
#
# `ray stop` finds Ray processes by name: it stops every Ray node this user runs on this machine, not
# only the one start_local.sh started. cluster.head.stop_head() stops exactly the head it started.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
else
    echo "stop_local.sh: no ray executable: run 'make install' (creates .venv) first" >&2
    exit 1
fi

"$RAY" stop "$@"
