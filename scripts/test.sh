#!/usr/bin/env bash
# Run the test suite inside the pinned ComfyUI host (set up first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/setup_host.sh | tail -n 1)
PY="$CACHE/venv/bin/python"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
export FREE_GUIDANCE_CACHE="$CACHE"
exec "$PY" -m pytest tests "$@"
