"""Drive MoeBar under Xvfb for screenshots: demo model, one message with a dropped file, the
window in light and dark, and the tray menu opened by a real click on the tray icon.

Run through tests/xvfb/run_screenshots.sh (it starts Xvfb and trayer and sets MOEBAR_HOME).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.bridge import READY  # noqa: E402
from app.main import MoeBarApp  # noqa: E402
from app.qt import QtCore, QtGui, QtWidgets  # noqa: E402
from app.ui.model_dialog import ModelDialog  # noqa: E402

MESSAGE = "Here are my notes. Summarise them, then write a Python function that counts words."
QUESTION = "What is a mixture of experts?"
NOTES = "# Trip notes\n\n- Day 1: arrived late, rain.\n- Day 2: museum, long walk by the river.\n"


def wait_until(app: QtWidgets.QApplication, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Process events until `condition` holds; exit with a message after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {what}")
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.02)


def settle(app: QtWidgets.QApplication, seconds: float) -> None:
    """Let repaints and timers run for a while."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.02)


def grab_screen(rect: QtCore.QRect, path: Path) -> None:
    """Save a region of the whole X screen (other windows, the tray host) to `path`."""
    screen = QtGui.QGuiApplication.primaryScreen()
    assert screen is not None
    screen.grabWindow(0, rect.x(), rect.y(), rect.width(), rect.height()).save(str(path))


def open_tray_menu(app: QtWidgets.QApplication, moebar: MoeBarApp) -> QtCore.QRect:
    """Right-click the tray icon with xdotool, like a user; returns the icon's geometry."""
    assert moebar.tray is not None
    wait_until(app, lambda: moebar.tray is not None and moebar.tray.icon.geometry().width() > 0, 20, "tray icon")
    geometry = moebar.tray.icon.geometry()
    centre = geometry.center()
    subprocess.Popen(["xdotool", "mousemove", str(centre.x()), str(centre.y()), "click", "3"])
    wait_until(app, lambda: moebar.tray is not None and moebar.tray.menu.isVisible(), 10, "tray menu")
    settle(app, 0.8)
    return geometry


def quick_ask_by_shortcut(app: QtWidgets.QApplication, moebar: MoeBarApp, path: Path) -> None:
    """Open Quick Ask with its global shortcut (a real key press), ask, and save it answered."""
    subprocess.Popen(["xdotool", "key", "ctrl+shift+space"])
    wait_until(app, moebar.quick_ask.isVisible, 10, "Quick Ask to open on Ctrl+Shift+Space")
    moebar.quick_ask.input.setText(QUESTION)
    moebar.quick_ask.ask()
    wait_until(app, lambda: not moebar.quick_ask.is_answering() and moebar.quick_ask.status.text() != "",
               120, "the Quick Ask answer")
    settle(app, 0.5)
    moebar.quick_ask.grab().save(str(path))
    moebar.quick_ask.close()


def model_dialog(app: QtWidgets.QApplication, moebar: MoeBarApp, path: Path) -> None:
    """Open the Model dialog (catalogue and the loaded model's plan) and save it."""
    dialog = ModelDialog(moebar.settings, moebar.models, moebar.window)
    dialog.show()
    wait_until(app, lambda: "Resident" in dialog.plan_view.text(), 120, "the demo model's memory plan")
    dialog.downloads.catalogue.select("mlx-community/Qwen3.5-397B-A17B-4bit")
    settle(app, 0.5)
    dialog.grab().save(str(path))
    dialog.reject()


def main() -> int:
    """Take the screenshots into --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    app = QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("MoeBar")
    moebar = MoeBarApp(app)
    if moebar.tray is None:
        sys.exit("no system tray: is trayer running on this display?")
    moebar.settings.update({"theme": "light", "max_tokens": 60, "thinking": True})
    moebar.window.setGeometry(20, 40, 1280, 800)
    moebar.start()
    wait_until(app, lambda: moebar.bridge.state == READY, 600, "the demo model to build and load")

    notes = Path(moebar.settings.path).parent / "trip-notes.md"
    notes.write_text(NOTES)
    moebar.window.add_files([str(notes), "/bin/ls"])
    wait_until(app, lambda: bool(moebar.window.composer.attachments()), 10, "the dropped file")
    moebar.window.composer.input.setPlainText(MESSAGE)
    moebar.window.composer.send_button.click()
    answer = moebar.controller.entries[-1]
    wait_until(app, lambda: len(answer.content) > 40, 120, "the first tokens")
    settle(app, 0.3)
    moebar.window.grab().save(str(out / "chat-window-streaming.png"))
    wait_until(app, lambda: not moebar.controller.is_busy(), 300, "the answer to finish")
    settle(app, 1.0)
    moebar.window.grab().save(str(out / "chat-window.png"))
    quick_ask_by_shortcut(app, moebar, out / "quick-ask.png")
    model_dialog(app, moebar, out / "model-dialog.png")

    icon_rect = open_tray_menu(app, moebar)
    assert moebar.tray is not None
    menu_rect = moebar.tray.menu.geometry()
    region = icon_rect.united(menu_rect).adjusted(-220, -4, 8, 8)
    screen = QtGui.QGuiApplication.primaryScreen()
    assert screen is not None
    grab_screen(region.intersected(screen.geometry()), out / "tray-menu.png")
    moebar.tray.menu.hide()
    settle(app, 0.3)

    moebar.settings.set("theme", "dark")
    settle(app, 1.0)
    moebar.window.grab().save(str(out / "chat-window-dark.png"))
    model_dialog(app, moebar, out / "model-dialog-dark.png")
    icon_rect = open_tray_menu(app, moebar)
    menu_rect = moebar.tray.menu.geometry()
    grab_screen(icon_rect.united(menu_rect).adjusted(-220, -4, 8, 8).intersected(screen.geometry()),
                out / "tray-menu-dark.png")
    moebar.tray.menu.hide()
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))
    moebar.quit()
    app.processEvents()
    moebar.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
