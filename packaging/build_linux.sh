#!/usr/bin/env bash
# Build MoeBar for Linux with PyInstaller: one folder, dist/MoeBar/ (binary dist/MoeBar/MoeBar),
# then check that the frozen binary can run MLX (`MoeBar --self-check`).
#
#   packaging/build_linux.sh            uses .venv/bin/python (or $PYTHON)
#
# Needs the app installed in that environment (pip install -e .); PyInstaller is installed
# from packaging/requirements-build.txt when missing. To install the result for your user
# (menu entry, icon, `moebar` on PATH): packaging/linux/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DIST="${MOEBAR_DIST:-dist}"
WORK="${MOEBAR_WORK:-build/pyinstaller}"
export MOEBAR_ICON_DIR="${MOEBAR_ICON_DIR:-build/icons}"

"$PYTHON" -c "import PyInstaller" 2>/dev/null || "$PYTHON" -m pip install -q -r packaging/requirements-build.txt
"$PYTHON" packaging/moebar_icons.py "$MOEBAR_ICON_DIR" >/dev/null

start=$(date +%s)
"$PYTHON" -m PyInstaller --noconfirm --log-level "${PYINSTALLER_LOG_LEVEL:-WARN}" \
  --distpath "$DIST" --workpath "$WORK" packaging/moebar.spec
cp packaging/linux/moebar.desktop "$DIST/MoeBar/moebar.desktop"
mkdir -p "$DIST/MoeBar/icons"
cp -r "$MOEBAR_ICON_DIR/hicolor" "$DIST/MoeBar/icons/"
cp packaging/linux/install.sh "$DIST/MoeBar/install.sh"

QT_QPA_PLATFORM=offscreen "$DIST/MoeBar/MoeBar" --self-check >"$WORK/self-check.json"
echo "built $DIST/MoeBar in $(( $(date +%s) - start )) s, $(du -sh "$DIST/MoeBar" | cut -f1); self-check: $WORK/self-check.json"
