"""`moebar` says which packages to install instead of letting Qt abort when its X11 plugin cannot load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.platform_check import QT_APT_LINE, QT_APT_PACKAGES, XCB_CURSOR_LIBRARY, qt_platform_problem, uses_xcb

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = Path("/qt/plugins/platforms")


def loader(missing: dict[str, str]):  # type: ignore[no-untyped-def]
    """A stand-in for ctypes.CDLL failing the way dlopen does for the named libraries."""
    def load(name: str) -> object:
        if name in missing:
            raise OSError(f"{missing[name]}: cannot open shared object file: No such file or directory")
        return object()
    return load


def test_missing_libraries_give_the_apt_line() -> None:
    env = {"DISPLAY": ":0"}
    problem = qt_platform_problem(env, PLUGINS, loader({str(PLUGINS / "libqxcb.so"): "libxcb-icccm.so.4",
                                                        XCB_CURSOR_LIBRARY: XCB_CURSOR_LIBRARY}), "linux")
    assert problem is not None
    assert "libxcb-icccm.so.4" in problem and XCB_CURSOR_LIBRARY in problem and QT_APT_LINE in problem
    only_cursor = qt_platform_problem(env, PLUGINS, loader({XCB_CURSOR_LIBRARY: XCB_CURSOR_LIBRARY}), "linux")
    assert only_cursor is not None and "libxcb-cursor.so.0" in only_cursor


def test_nothing_to_say_when_qt_can_start() -> None:
    broken = loader({XCB_CURSOR_LIBRARY: XCB_CURSOR_LIBRARY})
    assert qt_platform_problem({"DISPLAY": ":0"}, PLUGINS, loader({}), "linux") is None
    assert qt_platform_problem({"DISPLAY": ":0"}, PLUGINS, broken, "darwin") is None  # macOS has no xcb
    assert qt_platform_problem({"QT_QPA_PLATFORM": "offscreen"}, PLUGINS, broken, "linux") is None
    assert qt_platform_problem({"XDG_SESSION_TYPE": "wayland", "WAYLAND_DISPLAY": "wayland-0"},
                               PLUGINS, broken, "linux") is None
    assert uses_xcb({"QT_QPA_PLATFORM": "xcb"}) and uses_xcb({}) and not uses_xcb({"QT_QPA_PLATFORM": "wayland"})


def test_no_display_is_said_in_words() -> None:
    problem = qt_platform_problem({}, PLUGINS, loader({}), "linux")
    assert problem is not None and "DISPLAY" in problem and "QT_QPA_PLATFORM=offscreen" in problem


def test_readme_and_ci_install_the_same_packages() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert QT_APT_LINE in readme
    assert all(package in ci for package in QT_APT_PACKAGES)


def test_moebar_exits_with_the_sentence_instead_of_aborting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MOEBAR_HOME": str(tmp_path), "QT_QPA_PLATFORM": "xcb"}
    done = subprocess.run([sys.executable, "-m", "app.main", "--no-tray"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no display" in done.stderr and "Traceback" not in done.stderr
