"""The Quick Ask hotkey on macOS: Carbon's RegisterEventHotKey through ctypes.

Apple's hotkey API delivers only the registered combination to the app that registered it, so
unlike event taps it needs no Accessibility or Input Monitoring permission. The Carbon library is
a parameter, so tests drive this code with a recorded fake on Linux.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import CFUNCTYPE, POINTER, Structure, byref, c_int32, c_uint32, c_void_p
from typing import Any

from app.hotkey import HotkeyError, Shortcut

CARBON_PATH = "/System/Library/Frameworks/Carbon.framework/Carbon"
NO_ERR = 0
EVENT_HOTKEY_EXISTS_ERR = -9878  # eventHotKeyExistsErr: another app registered the combination
# Carbon modifier bits (Events.h). Qt writes the Command key as "Ctrl" and the Control key as "Meta".
MODIFIER_BITS = {"Ctrl": 0x0100, "Shift": 0x0200, "Alt": 0x0800, "Meta": 0x1000}
# Virtual key codes of the ANSI layout (kVK_* in Events.h), by Qt's key name.
KEY_CODES = {
    "A": 0x00, "S": 0x01, "D": 0x02, "F": 0x03, "H": 0x04, "G": 0x05, "Z": 0x06, "X": 0x07, "C": 0x08,
    "V": 0x09, "B": 0x0B, "Q": 0x0C, "W": 0x0D, "E": 0x0E, "R": 0x0F, "Y": 0x10, "T": 0x11, "1": 0x12,
    "2": 0x13, "3": 0x14, "4": 0x15, "6": 0x16, "5": 0x17, "=": 0x18, "9": 0x19, "7": 0x1A, "-": 0x1B,
    "8": 0x1C, "0": 0x1D, "]": 0x1E, "O": 0x1F, "U": 0x20, "[": 0x21, "I": 0x22, "P": 0x23, "Return": 0x24,
    "L": 0x25, "J": 0x26, "'": 0x27, "K": 0x28, ";": 0x29, "\\": 0x2A, ",": 0x2B, "/": 0x2C, "N": 0x2D,
    "M": 0x2E, ".": 0x2F, "Tab": 0x30, "Space": 0x31, "`": 0x32, "Backspace": 0x33, "Esc": 0x35,
    "F1": 0x7A, "F2": 0x78, "F3": 0x63, "F4": 0x76, "F5": 0x60, "F6": 0x61, "F7": 0x62, "F8": 0x64,
    "F9": 0x65, "F10": 0x6D, "F11": 0x67, "F12": 0x6F, "Left": 0x7B, "Right": 0x7C, "Down": 0x7D, "Up": 0x7E,
}


def four_char_code(text: str) -> int:
    """A Carbon OSType: four ASCII characters as a big-endian 32-bit number."""
    return int.from_bytes(text.encode("ascii"), "big")


K_EVENT_CLASS_KEYBOARD = four_char_code("keyb")
K_EVENT_HOTKEY_PRESSED = 5
HOTKEY_SIGNATURE = four_char_code("MoeB")


class EventTypeSpec(Structure):
    _fields_ = [("eventClass", c_uint32), ("eventKind", c_uint32)]


class EventHotKeyID(Structure):
    _fields_ = [("signature", c_uint32), ("id", c_uint32)]


EventHandlerProc = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_void_p)


def load_carbon() -> Any:
    """The Carbon framework with the signatures of the four calls used here."""
    lib = ctypes.CDLL(CARBON_PATH)
    lib.GetApplicationEventTarget.restype = c_void_p
    lib.GetApplicationEventTarget.argtypes = []
    lib.InstallEventHandler.restype = c_int32
    lib.InstallEventHandler.argtypes = [c_void_p, EventHandlerProc, c_uint32, POINTER(EventTypeSpec), c_void_p,
                                        POINTER(c_void_p)]
    lib.RegisterEventHotKey.restype = c_int32
    lib.RegisterEventHotKey.argtypes = [c_uint32, c_uint32, EventHotKeyID, c_void_p, c_uint32, POINTER(c_void_p)]
    lib.UnregisterEventHotKey.restype = c_int32
    lib.UnregisterEventHotKey.argtypes = [c_void_p]
    return lib


def carbon_key(shortcut: Shortcut) -> tuple[int, int]:
    """(virtual key code, Carbon modifier bits) of `shortcut`; HotkeyError for a key with no code."""
    key = shortcut.key.upper() if len(shortcut.key) == 1 else shortcut.key
    if key not in KEY_CODES:
        raise HotkeyError(f"{shortcut.text()}: '{shortcut.key}' cannot be a global shortcut key on macOS")
    bits = 0
    for modifier in shortcut.modifiers:
        bits |= MODIFIER_BITS[modifier]
    return KEY_CODES[key], bits


class CarbonHotkey:
    """One registered hotkey; its handler runs on the main thread (Qt's Cocoa event loop)."""

    def __init__(self, carbon: Any = None) -> None:
        self._carbon = carbon
        self._proc: Any = None  # keeps the C callback alive while installed
        self._handler = c_void_p()
        self._hotkey: c_void_p | None = None
        self._pressed: Callable[[], None] | None = None

    def _lib(self) -> Any:
        if self._carbon is None:
            self._carbon = load_carbon()
        return self._carbon

    def register(self, shortcut: Shortcut, pressed: Callable[[], None]) -> None:
        self.unregister()
        code, bits = carbon_key(shortcut)
        lib = self._lib()
        target = lib.GetApplicationEventTarget()
        if self._proc is None:
            self._proc = EventHandlerProc(self._on_event)
            spec = EventTypeSpec(K_EVENT_CLASS_KEYBOARD, K_EVENT_HOTKEY_PRESSED)
            status = lib.InstallEventHandler(target, self._proc, 1, byref(spec), None, byref(self._handler))
            if status != NO_ERR:
                self._proc = None
                raise HotkeyError(f"macOS refused the hotkey handler (error {status})")
        ref = c_void_p()
        status = lib.RegisterEventHotKey(code, bits, EventHotKeyID(HOTKEY_SIGNATURE, 1), target, 0, byref(ref))
        if status == EVENT_HOTKEY_EXISTS_ERR:
            raise HotkeyError(f"{shortcut.text()} is already taken by another app; choose another")
        if status != NO_ERR:
            raise HotkeyError(f"macOS refused {shortcut.text()} (error {status})")
        self._hotkey, self._pressed = ref, pressed

    def _on_event(self, next_handler: Any, event: Any, user_data: Any) -> int:
        if self._pressed is not None:
            self._pressed()
        return NO_ERR

    def unregister(self) -> None:
        if self._hotkey is not None:
            self._lib().UnregisterEventHotKey(self._hotkey)
            self._hotkey, self._pressed = None, None
