#!/usr/bin/env bash
# The main job on a fresh machine: install (cached), then local mode with the default values:
# an embedded Ray, the allocator, a monitor and the OpenAI endpoint serving the demo model.
# Usage: bash ci/up.sh [extra `ray-vram up` args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source ci/env.sh
VENV=$(bash ci/install-python.sh | tail -n 1)
exec "$VENV/bin/ray-vram" up -f values/local.yaml "$@"
