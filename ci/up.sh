#!/usr/bin/env bash
# The main job on a fresh machine: install (cached), then local mode with the default values:
# an embedded Ray, the allocator, a monitor and the OpenAI endpoint serving the demo model.
# Usage: bash ci/up.sh [extra `ray-vram up` args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# ci/env.sh turns Ray's token auth off for the test suite's speed; local mode for users keeps it on
# (a choice already in the caller's environment is respected).
caller_auth_mode=${RAY_AUTH_MODE-}
source ci/env.sh
if [[ -n $caller_auth_mode ]]; then export RAY_AUTH_MODE=$caller_auth_mode; else unset RAY_AUTH_MODE; fi
VENV=$(bash ci/install-python.sh | tail -n 1)
exec "$VENV/bin/ray-vram" up -f values/local.yaml "$@"
