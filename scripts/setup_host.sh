#!/usr/bin/env bash
# Set up the pinned ComfyUI test host for comfyui-free-guidance.
#
# Makes (or reuses) a cache directory outside the repository holding:
#   comfyui/   a checkout of ComfyUI at the pinned commit
#   venv/      a Python virtual environment with ComfyUI's requirements and the test tools
# and links this pack into comfyui/custom_nodes/.
#
# Usage: scripts/setup_host.sh [--source GIT_URL_OR_DIR] [--cache DIR]
#   COMFYUI_SOURCE  where to clone ComfyUI from (default: the public GitHub repository);
#                   on a machine without internet, a local git directory of the repository.
#   FREE_GUIDANCE_CACHE  cache directory (default: ~/.cache/comfyui-free-guidance)
# Prints the cache directory on its last line.
set -euo pipefail

COMFYUI_COMMIT=a125cd84b054a57729b5eecab930ca9408719832   # v0.3.64
SOURCE=${COMFYUI_SOURCE:-https://github.com/Comfy-Org/ComfyUI.git}
CACHE=${FREE_GUIDANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-free-guidance}
PYTHON=${PYTHON:-python3.11}
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    *) echo "setup_host: unknown argument $1" >&2; exit 2 ;;
  esac
done
PACK_DIR=$(cd "$(dirname "$0")/.." && pwd)
HOST=$CACHE/comfyui
VENV=$CACHE/venv
STAMP_VERSION=3
mkdir -p "$CACHE"
log() { echo "[setup_host] $*" >&2; }

# 1. ComfyUI at the pinned commit.
if [ "$(git -C "$HOST" rev-parse HEAD 2>/dev/null || true)" != "$COMFYUI_COMMIT" ]; then
  log "getting ComfyUI $COMFYUI_COMMIT from $SOURCE"
  rm -rf "$HOST.tmp"
  if ! git clone --quiet --no-checkout "$SOURCE" "$HOST.tmp"; then
    log "ERROR: could not clone ComfyUI from '$SOURCE'."
    log "Provide the ComfyUI source: set COMFYUI_SOURCE (or pass --source) to a git URL or a local git"
    log "directory of https://github.com/Comfy-Org/ComfyUI that contains commit $COMFYUI_COMMIT."
    exit 1
  fi
  # A local copy of the repository may lack one blob that only HunyuanVideo's llama tokenizer uses.
  git -C "$HOST.tmp" -c advice.detachedHead=false checkout --quiet "$COMFYUI_COMMIT" -- \
    . ':!comfy/text_encoders/llama_tokenizer/tokenizer.json'
  git -C "$HOST.tmp" checkout --quiet "$COMFYUI_COMMIT" -- comfy/text_encoders/llama_tokenizer/tokenizer.json 2>/dev/null \
    || log "note: llama tokenizer.json missing from the source (only HunyuanVideo text encoding needs it)"
  git -C "$HOST.tmp" update-ref --no-deref HEAD "$COMFYUI_COMMIT"
  rm -rf "$HOST"; mv "$HOST.tmp" "$HOST"
fi

# 2. Virtual environment with ComfyUI's requirements, `requests` and the test tools.
STAMP="$VENV/.free-guidance-ready-$STAMP_VERSION-$COMFYUI_COMMIT"
if [ ! -f "$STAMP" ]; then
  log "creating the virtual environment in $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --quiet)
  # Only this torch/torchvision/torchaudio set imports cleanly here (the CPU-only build breaks torchvision).
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
  "${PIP[@]}" -r "$HOST/requirements.txt" requests
  touch "$STAMP"
fi
# The test tools, reinstalled whenever tests/requirements.txt changes (without rebuilding the environment).
TEST_STAMP="$VENV/.free-guidance-test-requirements-$(sha256sum "$PACK_DIR/tests/requirements.txt" | cut -c1-16)"
if [ ! -f "$TEST_STAMP" ]; then
  log "installing the test requirements"
  "$VENV/bin/python" -m pip install --quiet -r "$PACK_DIR/tests/requirements.txt"
  rm -f "$VENV"/.free-guidance-test-requirements-*
  touch "$TEST_STAMP"
fi

# 3. The pack, linked into the host's custom nodes.
mkdir -p "$HOST/custom_nodes"
ln -sfn "$PACK_DIR" "$HOST/custom_nodes/comfyui-free-guidance"
log "host ready"
echo "$CACHE"
