#!/usr/bin/env bash
# Run the test suite inside the pinned ComfyUI host. On a fresh machine it first sets the host up
# (scripts/setup_host.sh: ComfyUI, its venv, tests/requirements.txt) and installs the browser the editor tests
# drive (scripts/install_browser.sh: Debian's chromium). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/setup_host.sh | tail -n 1)
scripts/install_browser.sh
PY="$CACHE/venv/bin/python"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
export FREE_GUIDANCE_CACHE="$CACHE"
exec "$PY" -m pytest tests "$@"
