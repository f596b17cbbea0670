"""macOS only: run as a menu-bar app without a Dock icon when not started from a bundle.

A bundle gets this from LSUIElement in its Info.plist; `python -m app.main` has no Info.plist,
so the same effect is asked of NSApplication at run time through the Objective-C runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

NS_APPLICATION_ACTIVATION_POLICY_ACCESSORY = 1


def hide_dock_icon() -> bool:
    """Make the app an accessory app (menu bar only); False where that is not possible."""
    if sys.platform != "darwin":
        return False
    path = ctypes.util.find_library("objc")
    if not path:
        return False
    objc = ctypes.cdll.LoadLibrary(path)
    objc.objc_getClass.restype = ctypes.c_void_p
    objc.objc_getClass.argtypes = [ctypes.c_char_p]
    objc.sel_registerName.restype = ctypes.c_void_p
    objc.sel_registerName.argtypes = [ctypes.c_char_p]
    send = objc.objc_msgSend
    send.restype = ctypes.c_void_p
    send.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    ns_app_class = objc.objc_getClass(b"NSApplication")
    if not ns_app_class:
        return False
    app = send(ns_app_class, objc.sel_registerName(b"sharedApplication"))
    set_policy = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long)(
        ctypes.cast(send, ctypes.c_void_p).value
    )
    return bool(set_policy(app, objc.sel_registerName(b"setActivationPolicy:"),
                           NS_APPLICATION_ACTIVATION_POLICY_ACCESSORY))
