#!/usr/bin/env bash
# Build MoeBar.app, the menu-bar app (LSUIElement: no Dock icon), and MoeBar-<version>.dmg,
# with PyInstaller on an Apple-silicon Mac (MLX has no Intel build).
#
#   packaging/build_macos.sh            uses .venv/bin/python (or $PYTHON)
#
# Needs the app installed in that environment (pip install -e .); PyInstaller is installed
# from packaging/requirements-build.txt when missing. The icon is drawn from
# resources/icons/moebar.svg and packed by `iconutil`. Set MOEBAR_CODESIGN_IDENTITY to sign
# with a Developer ID; otherwise PyInstaller signs ad hoc, which is enough on this Mac.
# Afterwards the bundle's own binary runs `--self-check`: MLX must compute on the GPU, which
# proves libmlx found mlx.metallib inside the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "$(uname -s)" == Darwin ]] || { echo "build_macos.sh runs on macOS; use packaging/build_linux.sh here" >&2; exit 2; }
[[ "$(uname -m)" == arm64 ]] || { echo "MLX needs Apple silicon; this Mac is $(uname -m)" >&2; exit 2; }
PYTHON="${PYTHON:-.venv/bin/python}"
DIST="${MOEBAR_DIST:-dist}"
WORK="${MOEBAR_WORK:-build/pyinstaller}"
export MOEBAR_ICON_DIR="${MOEBAR_ICON_DIR:-build/icons}"

"$PYTHON" -c "import PyInstaller" 2>/dev/null || "$PYTHON" -m pip install -q -r packaging/requirements-build.txt
VERSION="$("$PYTHON" packaging/moebar_build.py version)"
"$PYTHON" packaging/moebar_icons.py "$MOEBAR_ICON_DIR" >/dev/null
if command -v iconutil >/dev/null; then
  # Apple's packer over the same PNGs replaces the pure-Python .icns.
  iconutil -c icns "$MOEBAR_ICON_DIR/MoeBar.iconset" -o "$MOEBAR_ICON_DIR/MoeBar.icns"
fi

start=$(date +%s)
"$PYTHON" -m PyInstaller --noconfirm --log-level "${PYINSTALLER_LOG_LEVEL:-WARN}" \
  --distpath "$DIST" --workpath "$WORK" packaging/moebar.spec
APP="$DIST/MoeBar.app"

plist="$APP/Contents/Info.plist"
[[ "$(/usr/libexec/PlistBuddy -c 'Print :LSUIElement' "$plist")" == true ]] || { echo "LSUIElement is not set in $plist" >&2; exit 1; }
[[ "$(/usr/libexec/PlistBuddy -c 'Print :CFBundleShortVersionString' "$plist")" == "$VERSION" ]] || { echo "wrong version in $plist" >&2; exit 1; }
"$APP/Contents/MacOS/MoeBar" --self-check >"$WORK/self-check.json"
grep -q '"device": "Device(gpu' "$WORK/self-check.json" || { echo "MLX did not run on the GPU: $WORK/self-check.json" >&2; exit 1; }
codesign --verify --deep --strict "$APP"

if command -v hdiutil >/dev/null; then
  staging="$WORK/dmg"
  rm -rf "$staging" && mkdir -p "$staging"
  cp -R "$APP" "$staging/"
  ln -s /Applications "$staging/Applications"
  hdiutil create -quiet -volname "MoeBar $VERSION" -srcfolder "$staging" -ov -format UDZO "$DIST/MoeBar-$VERSION.dmg"
  echo "disk image: $DIST/MoeBar-$VERSION.dmg"
fi
echo "built $APP $VERSION in $(( $(date +%s) - start )) s, $(du -sh "$APP" | cut -f1); self-check: $WORK/self-check.json"
