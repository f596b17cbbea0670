#!/usr/bin/env bash
# Install the Linux build of MoeBar for the current user, or remove it again.
#
#   ./install.sh              from inside the built folder (dist/MoeBar/install.sh), or
#   packaging/linux/install.sh [BUILD_DIR]    from the source tree (default dist/MoeBar)
#   ./install.sh --uninstall  remove what install put there (not your chats or settings)
#
# Puts the folder in ~/.local/lib/moebar, links ~/.local/bin/moebar to its binary, and adds the
# menu entry (~/.local/share/applications/moebar.desktop) and icons (hicolor theme).
# XDG_DATA_HOME and PREFIX (default ~/.local) move these places.
set -euo pipefail
PREFIX="${PREFIX:-$HOME/.local}"
DATA_HOME="${XDG_DATA_HOME:-$PREFIX/share}"
LIB_DIR="$PREFIX/lib/moebar"
BIN_LINK="$PREFIX/bin/moebar"
DESKTOP="$DATA_HOME/applications/moebar.desktop"
ICON_ROOT="$DATA_HOME/icons/hicolor"
here="$(cd "$(dirname "$0")" && pwd)"

if [[ "${1:-}" == "--uninstall" ]]; then
  rm -rf "$LIB_DIR"
  rm -f "$BIN_LINK" "$DESKTOP"
  find "$ICON_ROOT" -path '*/apps/moebar.png' -delete 2>/dev/null || true
  echo "MoeBar removed. Its chats, settings and models stay in ~/.local/share/MoeBar, ~/.config/MoeBar,"
  echo "~/.cache/MoeBar and ~/.local/state/MoeBar; delete those folders to remove them too."
  exit 0
fi

if [[ -x "$here/MoeBar" ]]; then
  build="$here"
else
  build="${1:-$here/../../dist/MoeBar}"
fi
[[ -x "$build/MoeBar" ]] || { echo "no MoeBar build at $build (run packaging/build_linux.sh)" >&2; exit 1; }
build="$(cd "$build" && pwd)"

mkdir -p "$PREFIX/lib" "$PREFIX/bin" "$(dirname "$DESKTOP")"
if [[ "$build" != "$LIB_DIR" ]]; then
  rm -rf "$LIB_DIR.new"
  cp -a "$build" "$LIB_DIR.new"
  rm -rf "$LIB_DIR"
  mv "$LIB_DIR.new" "$LIB_DIR"
fi
ln -sfn "$LIB_DIR/MoeBar" "$BIN_LINK"
# The .desktop file runs `moebar`; point it at the link so it works without ~/.local/bin on PATH.
sed -e "s|^Exec=moebar|Exec=$BIN_LINK|" -e "s|^TryExec=moebar|TryExec=$BIN_LINK|" \
  "$LIB_DIR/moebar.desktop" >"$DESKTOP"
if [[ -d "$LIB_DIR/icons/hicolor" ]]; then
  mkdir -p "$ICON_ROOT"
  cp -r "$LIB_DIR/icons/hicolor/." "$ICON_ROOT/"
fi
command -v update-desktop-database >/dev/null && update-desktop-database -q "$(dirname "$DESKTOP")" || true
command -v gtk-update-icon-cache >/dev/null && gtk-update-icon-cache -q -t "$ICON_ROOT" 2>/dev/null || true
echo "MoeBar installed: $BIN_LINK -> $LIB_DIR/MoeBar; menu entry $DESKTOP"
