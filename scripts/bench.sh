#!/usr/bin/env bash
# The quality-vs-compute benchmark on the digits reference model (minutes on CPU): writes docs/benchmark/.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/setup_host.sh | tail -n 1)
export FREE_GUIDANCE_CACHE="$CACHE"
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # the test harness, fg_testing
exec "$CACHE/venv/bin/python" bench/digits_quality.py "$@"
