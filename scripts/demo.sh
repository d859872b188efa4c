#!/usr/bin/env bash
# The main job: start the pinned ComfyUI with this pack and the trained digits reference model, queue workflows headless
# over HTTP, and write a technique x digit grid (grid.png) and the network-evaluation counts to ./demo-output (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/setup_host.sh | tail -n 1)
export FREE_GUIDANCE_CACHE="$CACHE"
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # the test harness, fg_testing
exec "$CACHE/venv/bin/python" scripts/demo.py --out "${1:-demo-output}"
