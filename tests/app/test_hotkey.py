"""The global Quick Ask shortcut: parsing, the X11 grab under a real Xvfb (key presses sent with
XTEST), the macOS Carbon calls against a recorded fake, and the app wiring (Settings, notice)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.hotkey import GlobalHotkey, HotkeyError, Shortcut, X11Hotkey, hotkey_backend, parse_shortcut
from app.hotkey_macos import EVENT_HOTKEY_EXISTS_ERR, CarbonHotkey, carbon_key
from app.main import MoeBarApp
from app.qt import QtWidgets
from app.settings import SettingsStore


def test_parse_shortcut() -> None:
    assert parse_shortcut("Ctrl+Shift+Space") == Shortcut(frozenset({"Ctrl", "Shift"}), "Space")
    assert parse_shortcut("Meta+Alt+K").text() == "Alt+Meta+K"
    for bad, needle in (("Space", "no modifier"), ("Ctrl+", "not a shortcut"), ("Hyper+K", "unknown modifier"),
                        ("Ctrl+Shift", "no key")):
        with pytest.raises(HotkeyError, match=needle):
            parse_shortcut(bad)


def test_backend_per_platform() -> None:
    assert isinstance(hotkey_backend("darwin", {}), CarbonHotkey)
    assert isinstance(hotkey_backend("linux", {"DISPLAY": ":0"}), X11Hotkey)
    assert hotkey_backend("linux", {"WAYLAND_DISPLAY": "wayland-0"}) is None
    assert hotkey_backend("linux", {"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}) is None
    assert hotkey_backend("win32", {}) is None


class FakeCarbon:
    """Records the Carbon calls; `press()` runs the installed handler as the event loop would."""

    def __init__(self, register_status: int = 0) -> None:
        self.register_status = register_status
        self.calls: list[tuple[Any, ...]] = []
        self.handler: Callable[[Any, Any, Any], int] | None = None

    def GetApplicationEventTarget(self) -> int:  # noqa: N802 (Carbon's names)
        return 1234

    def InstallEventHandler(self, target: int, proc: Any, count: int, spec: Any, data: Any, ref: Any) -> int:  # noqa: N802
        spec_value = spec._obj
        self.calls.append(("install", target, count, spec_value.eventClass, spec_value.eventKind))
        self.handler = proc
        return 0

    def RegisterEventHotKey(self, code: int, mods: int, hotkey_id: Any, target: int, options: int, ref: Any) -> int:  # noqa: N802
        self.calls.append(("register", code, mods, hotkey_id.signature, target))
        return self.register_status

    def UnregisterEventHotKey(self, ref: Any) -> int:  # noqa: N802
        self.calls.append(("unregister",))
        return 0

    def press(self) -> int:
        assert self.handler is not None
        return int(self.handler(None, None, None))


def test_carbon_hotkey_registers_and_fires() -> None:
    carbon = FakeCarbon()
    backend = CarbonHotkey(carbon)
    pressed: list[bool] = []
    backend.register(parse_shortcut("Ctrl+Shift+Space"), lambda: pressed.append(True))
    # Command (Qt's Ctrl) 0x100 + Shift 0x200, kVK_Space 0x31, the 'keyb' class and kEventHotKeyPressed
    assert carbon.calls == [("install", 1234, 1, int.from_bytes(b"keyb", "big"), 5),
                            ("register", 0x31, 0x300, int.from_bytes(b"MoeB", "big"), 1234)]
    assert carbon.press() == 0 and pressed == [True]
    backend.register(parse_shortcut("Meta+Alt+K"), lambda: None)  # the handler is installed once
    assert carbon.calls[-2:] == [("unregister",), ("register", 0x28, 0x1800, int.from_bytes(b"MoeB", "big"), 1234)]
    backend.unregister()
    assert carbon.calls[-1] == ("unregister",)
    assert carbon_key(parse_shortcut("Ctrl+F5")) == (0x60, 0x100)
    with pytest.raises(HotkeyError, match="cannot be a global shortcut key"):
        carbon_key(parse_shortcut("Ctrl+Pause"))


def test_carbon_hotkey_taken_by_another_app() -> None:
    with pytest.raises(HotkeyError, match="already taken by another app"):
        CarbonHotkey(FakeCarbon(EVENT_HOTKEY_EXISTS_ERR)).register(parse_shortcut("Ctrl+Space"), lambda: None)


@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb)")
    # Xvfb picks a free display and writes its number (a fixed one collides with other test runs)
    read_fd, write_fd = os.pipe()
    # -noreset: the readiness probe below is the first client to leave; no reset may follow it
    command = ["Xvfb", "-displayfd", str(write_fd), "-noreset", "-screen", "0", "640x480x24", "-nolisten", "tcp"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_fd,))
    os.close(write_fd)
    with os.fdopen(read_fd) as numbers:
        number = numbers.readline().strip()
    assert number.isdigit(), f"Xvfb did not say its display (exit status {proc.poll()})"
    display = f":{number}"
    from Xlib import display as xdisplay, error

    deadline = time.monotonic() + 20
    while True:
        try:
            xdisplay.Display(display).close()
            break
        except (error.DisplayError, error.ConnectionClosedError):
            assert proc.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.1)
    yield display
    proc.terminate()
    proc.wait(timeout=10)


def press_keys(display: str, keys: list[str]) -> None:
    """Type a key combination through the XTEST extension, as a keyboard would."""
    from Xlib import X, XK
    from Xlib import display as xdisplay
    from Xlib.ext import xtest

    disp = xdisplay.Display(display)
    codes = [disp.keysym_to_keycode(XK.string_to_keysym(k)) for k in keys]
    for code in codes:
        xtest.fake_input(disp, X.KeyPress, code)
    for code in reversed(codes):
        xtest.fake_input(disp, X.KeyRelease, code)
    disp.sync()
    disp.close()


def test_x11_grab_fires_on_the_combination_only(xvfb: str) -> None:
    hits = threading.Semaphore(0)
    backend = X11Hotkey(xvfb)
    backend.register(parse_shortcut("Ctrl+Shift+Space"), hits.release)
    try:
        press_keys(xvfb, ["Control_L", "Shift_L", "space"])
        assert hits.acquire(timeout=10)
        press_keys(xvfb, ["Control_L", "space"])  # another combination: not ours
        assert not hits.acquire(timeout=0.5)
        with pytest.raises(HotkeyError, match="already taken by another program"):
            X11Hotkey(xvfb).register(parse_shortcut("Ctrl+Shift+Space"), lambda: None)
    finally:
        backend.unregister()
    other = X11Hotkey(xvfb)
    other.register(parse_shortcut("Ctrl+Shift+Space"), lambda: None)  # released: free again
    other.unregister()


class RecordingBackend:
    """A hotkey API stand-in for the app wiring: records what is grabbed; `press()` fires it."""

    def __init__(self, taken: set[str] | None = None) -> None:
        self.taken = taken or set()
        self.grabbed: list[str] = []
        self._pressed: Callable[[], None] | None = None

    def register(self, shortcut: Shortcut, pressed: Callable[[], None]) -> None:
        if shortcut.text() in self.taken:
            raise HotkeyError(f"{shortcut.text()} is already taken by another program; choose another")
        self.grabbed.append(shortcut.text())
        self._pressed = pressed

    def unregister(self) -> None:
        self._pressed = None

    def press(self) -> None:
        assert self._pressed is not None
        self._pressed()


def test_the_app_grabs_the_setting_and_opens_quick_ask(qtbot, isolated_moebar_home: Path,
                                                        fake_engine_command: list[str], tmp_path: Path) -> None:
    SettingsStore().set("model_dir", str(tmp_path / "m"))
    backend = RecordingBackend(taken={"Ctrl+Alt+T"})
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False, hotkey=backend)
    qtbot.addWidget(app.window)
    try:
        app.start()
        assert backend.grabbed == ["Ctrl+Shift+Space"]  # the default
        backend.press()
        qtbot.waitUntil(lambda: app.quick_ask.isVisible(), timeout=5_000)
        app.settings.set("quick_ask_shortcut", "Ctrl+Alt+T")  # taken: the window says so
        assert app.window.notice_bar.text() == ("The Quick Ask shortcut is off: Ctrl+Alt+T is already taken by "
                                                "another program; choose another.")
        app.settings.set("quick_ask_shortcut", "")  # off
        assert app.hotkey.shortcut is None
    finally:
        app.shutdown()
        app.qt_app.setQuitOnLastWindowClosed(False)


def test_settings_dialog_edits_the_shortcut(qtbot, isolated_moebar_home: Path, tmp_path: Path) -> None:
    from app.qt import QtGui
    from app.ui.settings_dialog import SettingsDialog

    settings = SettingsStore(tmp_path / "s.json")
    dialog = SettingsDialog(settings)
    qtbot.addWidget(dialog)
    assert dialog.quick_ask_shortcut.keySequence().toString() == "Ctrl+Shift+Space"
    dialog.quick_ask_shortcut.setKeySequence(QtGui.QKeySequence("Ctrl+Alt+K"))
    dialog.accept()
    assert settings.get("quick_ask_shortcut") == "Ctrl+Alt+K"
    with pytest.raises(HotkeyError, match="not available on this system"):
        GlobalHotkey(None).set_shortcut("Ctrl+K")
