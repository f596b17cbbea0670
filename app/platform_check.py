"""Before Qt starts: say in words what is missing when Qt's Linux display plugin cannot load.

Qt aborts the process (a core dump and a line about "xcb" on stderr) when the xcb platform
plugin's libraries are missing or there is no display. `qt_platform_problem` tries the same
libraries first and returns a sentence with the command that fixes it, so `moebar` can print
that and exit instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

# The Debian/Ubuntu packages Qt's xcb plugin needs beyond a desktop's usual libraries
# (the same list as .ci/run and the README).
QT_APT_PACKAGES = (
    "libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxkbcommon-x11-0", "libxcb-image0",
    "libxcb-render-util0", "libxcb-shape0", "libxcb-xinerama0", "libegl1", "libgl1", "libfontconfig1",
    "libdbus-1-3",
)
QT_APT_LINE = "sudo apt install " + " ".join(QT_APT_PACKAGES)
# Qt 6.5+ opens this one itself at run time (it is not among the plugin's linked libraries).
XCB_CURSOR_LIBRARY = "libxcb-cursor.so.0"


def uses_xcb(env: Mapping[str, str]) -> bool:
    """Whether Qt would pick its X11 (xcb) platform plugin with this environment."""
    platform = env.get("QT_QPA_PLATFORM", "").strip()
    if platform:
        return platform.split(";")[0].split(":")[0] == "xcb"
    return not (env.get("XDG_SESSION_TYPE") == "wayland" and env.get("WAYLAND_DISPLAY"))


def qt_platform_problem(
    env: Mapping[str, str],
    plugin_dir: Path,
    load: Callable[[str], object] = ctypes.CDLL,
    system: str = sys.platform,
) -> str | None:
    """What stops Qt's xcb plugin from loading, as a sentence with the fix; None when nothing does."""
    if not system.startswith("linux") or not uses_xcb(env):
        return None
    if not env.get("DISPLAY"):
        return ("MoeBar found no display to open its window on (DISPLAY is not set). Start it from a "
                "desktop session, or set QT_QPA_PLATFORM=offscreen to run it without one.")
    missing: list[str] = []
    for library in (str(plugin_dir / "libqxcb.so"), XCB_CURSOR_LIBRARY):
        try:
            load(library)
        except OSError as exc:
            missing.append(str(exc).split(":")[0] if "cannot open shared object" in str(exc) else str(exc))
    if not missing:
        return None
    return ("Qt cannot open its X11 display plugin because system libraries are missing "
            f"({'; '.join(missing)}). On Debian or Ubuntu install them with:\n    {QT_APT_LINE}\n"
            "(Fedora: dnf install xcb-util-cursor xcb-util-wm xcb-util-keysyms libxkbcommon-x11.)")


def qt_plugin_dir() -> Path:
    """The folder of Qt's platform plugins for this PySide6 (no QApplication needed)."""
    from PySide6.QtCore import QLibraryInfo

    return Path(QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)) / "platforms"


def exit_if_qt_cannot_start() -> None:
    """Print what is missing and exit with status 1 when Qt's platform plugin would abort."""
    problem = qt_platform_problem(os.environ, qt_plugin_dir())
    if problem:
        print(f"moebar: {problem}", file=sys.stderr)
        raise SystemExit(1)
