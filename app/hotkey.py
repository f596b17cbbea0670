"""The global Quick Ask hotkey: pressed anywhere, it opens Quick Ask.

Each platform uses its own hotkey API, so no key handling is hand-rolled here:
- Linux/X11: XGrabKey on the root window (python-xlib), read on a small thread;
- macOS: Carbon's RegisterEventHotKey, which needs no Accessibility permission (app/hotkey_macos.py).
On other systems (Wayland without X11, Windows) `hotkey_backend` returns None and Settings says so.

Shortcuts are written as Qt writes them ("Ctrl+Alt+Space", "Meta+Shift+K"); `parse_shortcut`
turns one into modifier names and a key name.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.qt import QObject, Qt, Signal

log = logging.getLogger(__name__)

MODIFIERS = ("Ctrl", "Alt", "Shift", "Meta")
# Qt's key names that X11 spells differently (letters and digits are lowercased/kept).
X11_KEYSYMS = {"Space": "space", "Return": "Return", "Enter": "Return", "Tab": "Tab", "Esc": "Escape",
               "Backspace": "BackSpace", "Del": "Delete", "Ins": "Insert", "Home": "Home", "End": "End",
               "PgUp": "Prior", "PgDown": "Next", "Left": "Left", "Right": "Right", "Up": "Up", "Down": "Down",
               ",": "comma", ".": "period", "/": "slash", ";": "semicolon", "'": "apostrophe", "`": "grave",
               "-": "minus", "=": "equal", "[": "bracketleft", "]": "bracketright", "\\": "backslash"}


class HotkeyError(RuntimeError):
    """The shortcut cannot be used (malformed, taken by another program, or no API here)."""


@dataclass(frozen=True)
class Shortcut:
    """A global shortcut: modifier names (from MODIFIERS) and one key name as Qt writes it."""

    modifiers: frozenset[str]
    key: str

    def text(self) -> str:
        """The shortcut as Qt writes it."""
        return "+".join([m for m in MODIFIERS if m in self.modifiers] + [self.key])


def parse_shortcut(text: str) -> Shortcut:
    """'Ctrl+Alt+Space' -> Shortcut; HotkeyError names what is wrong."""
    parts = [p.strip() for p in text.strip().split("+")]
    if text.strip().endswith("++"):  # the '+' key itself
        parts = parts[:-2] + ["+"]
    if not parts or not parts[-1]:
        raise HotkeyError(f"'{text}' is not a shortcut; write it like 'Ctrl+Alt+Space'")
    *mods, key = parts
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown:
        raise HotkeyError(f"'{text}': unknown modifier {unknown[0]!r}; use {', '.join(MODIFIERS)}")
    if not mods:
        raise HotkeyError(f"'{text}' has no modifier; a global shortcut needs Ctrl, Alt, Shift or Meta")
    if key in MODIFIERS:
        raise HotkeyError(f"'{text}' has no key after the modifiers")
    return Shortcut(frozenset(mods), key)


class HotkeyBackend(Protocol):
    """What a platform's hotkey API offers."""

    def register(self, shortcut: Shortcut, pressed: Callable[[], None]) -> None:
        """Grab `shortcut`; `pressed` may run on any thread. HotkeyError if it cannot be had."""

    def unregister(self) -> None:
        """Release the shortcut (if any)."""


class X11Hotkey:
    """XGrabKey on the root window; a thread waits for its KeyPress events."""

    # NumLock (Mod2) and CapsLock (Lock) change the modifier state, so each is grabbed too.
    def __init__(self, display_name: str | None = None) -> None:
        self.display_name = display_name
        self._display: Any = None
        self._grabbed: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, shortcut: Shortcut, pressed: Callable[[], None]) -> None:
        from Xlib import X, XK, display, error

        self.unregister()
        try:
            disp = display.Display(self.display_name)
        except (error.DisplayError, error.ConnectionClosedError) as exc:
            raise HotkeyError(f"cannot reach the X display for the shortcut ({exc})") from None
        name = X11_KEYSYMS.get(shortcut.key, shortcut.key.lower() if len(shortcut.key) == 1 else shortcut.key)
        keysym = XK.string_to_keysym(name)
        keycode = disp.keysym_to_keycode(keysym) if keysym else 0
        if not keycode:
            disp.close()
            raise HotkeyError(f"{shortcut.text()}: this keyboard has no key '{shortcut.key}'")
        mask = 0
        for modifier, bit in (("Ctrl", X.ControlMask), ("Alt", X.Mod1Mask), ("Shift", X.ShiftMask),
                              ("Meta", X.Mod4Mask)):
            if modifier in shortcut.modifiers:
                mask |= bit
        root = disp.screen().root
        catch = error.CatchError(error.BadAccess)
        grabs = [(keycode, mask | extra) for extra in (0, X.LockMask, X.Mod2Mask, X.LockMask | X.Mod2Mask)]
        for code, mods in grabs:
            root.grab_key(code, mods, True, X.GrabModeAsync, X.GrabModeAsync, onerror=catch)
        disp.sync()
        if catch.get_error() is not None:
            for code, mods in grabs:
                root.ungrab_key(code, mods)
            disp.close()
            raise HotkeyError(f"{shortcut.text()} is already taken by another program; choose another")
        self._display, self._grabbed = disp, grabs
        self._stop.clear()
        self._thread = threading.Thread(target=self._wait_for_presses, args=(disp, pressed),
                                        name="quick-ask-hotkey", daemon=True)
        self._thread.start()

    def _wait_for_presses(self, disp: Any, pressed: Callable[[], None]) -> None:
        from Xlib import X

        while not self._stop.is_set():
            ready, _, _ = select.select([disp.fileno()], [], [], 0.2)
            if not ready:
                continue
            while disp.pending_events():
                if disp.next_event().type == X.KeyPress:
                    pressed()

    def unregister(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._thread = None
        if self._display is not None:
            root = self._display.screen().root
            for code, mods in self._grabbed:
                root.ungrab_key(code, mods)
            self._display.sync()
            self._display.close()
            self._display, self._grabbed = None, []


def hotkey_backend(platform: str = sys.platform, env: dict[str, str] | None = None) -> HotkeyBackend | None:
    """This system's hotkey API, or None where there is none MoeBar can use."""
    env = dict(os.environ) if env is None else env
    if platform == "darwin":
        from app.hotkey_macos import CarbonHotkey

        return CarbonHotkey()
    if platform.startswith("linux") and env.get("DISPLAY") and env.get("QT_QPA_PLATFORM", "xcb").startswith("xcb"):
        return X11Hotkey(env.get("DISPLAY"))
    return None


class GlobalHotkey(QObject):
    """The app's Quick Ask shortcut: `pressed` is emitted on the GUI thread."""

    pressed = Signal()
    _pressed_from_thread = Signal()

    def __init__(self, backend: HotkeyBackend | None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.backend = backend
        self.shortcut: Shortcut | None = None
        self._pressed_from_thread.connect(self.pressed, Qt.ConnectionType.QueuedConnection)

    def set_shortcut(self, text: str) -> None:
        """Use `text` ('' turns the shortcut off); HotkeyError says why it cannot be used."""
        if self.backend is not None:
            self.backend.unregister()
        self.shortcut = None
        if not text.strip():
            return
        shortcut = parse_shortcut(text)
        if self.backend is None:
            raise HotkeyError("global shortcuts are not available on this system (X11 or macOS is needed)")
        self.backend.register(shortcut, self._pressed_from_thread.emit)
        self.shortcut = shortcut

    def close(self) -> None:
        """Release the shortcut."""
        if self.backend is not None:
            self.backend.unregister()
        self.shortcut = None
