#!/usr/bin/env bash
# Install the browser the editor tests drive: Debian's chromium (never `playwright install`; the playwright
# Python package comes from tests/requirements.txt through setup_host.sh). Nothing to do when it is there
# (FREE_GUIDANCE_CHROMIUM names another binary). Needs apt-get, as root or through sudo.
set -euo pipefail
CHROMIUM="${FREE_GUIDANCE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ] || { [ -z "${FREE_GUIDANCE_CHROMIUM:-}" ] && command -v chromium >/dev/null 2>&1; }; then
  exit 0
fi
echo "[free-guidance] installing chromium for the editor tests" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
