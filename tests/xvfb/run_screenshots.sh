#!/usr/bin/env bash
# Run MoeBar under Xvfb with a real tray host (trayer) on the demo model, send a message, and
# save screenshots of the window (light and dark) and of the open tray menu.
#
#   apt-get install -y xvfb trayer xdotool imagemagick libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0
#   tests/xvfb/run_screenshots.sh [OUT_DIR]        (default: docs/screenshots)
#
# MOEBAR_HOME is a fresh temporary folder, so the user's settings and history are not touched;
# set MOEBAR_DEMO_CACHE to a folder to reuse the built demo model between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-docs/screenshots}"
PYTHON="${PYTHON:-.venv/bin/python}"
for tool in Xvfb trayer xdotool; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y xvfb trayer xdotool" >&2; exit 2; }
done

DISPLAY_NUMBER="${XVFB_DISPLAY:-:77}"
HOME_DIR="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$HOME_DIR"
}
trap cleanup EXIT

Xvfb "$DISPLAY_NUMBER" -screen 0 1400x900x24 -nolisten tcp &
PIDS+=($!)
for _ in $(seq 50); do DISPLAY="$DISPLAY_NUMBER" xdotool getdisplaygeometry >/dev/null 2>&1 && break; sleep 0.1; done
DISPLAY="$DISPLAY_NUMBER" trayer --edge top --align right --widthtype request --height 24 \
  --transparent true --tint 0x2d333b --alpha 0 &
PIDS+=($!)
sleep 1

mkdir -p "$OUT"
if [[ -n "${MOEBAR_DEMO_CACHE:-}" ]]; then
  mkdir -p "$HOME_DIR/data" "$MOEBAR_DEMO_CACHE"
  ln -s "$MOEBAR_DEMO_CACHE" "$HOME_DIR/data/models"
fi
DISPLAY="$DISPLAY_NUMBER" QT_QPA_PLATFORM=xcb MOEBAR_HOME="$HOME_DIR" \
  "$PYTHON" tests/xvfb/screenshot_driver.py --out "$OUT"
