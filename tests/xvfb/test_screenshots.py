"""Runs tests/xvfb/run_screenshots.sh (a real X server and tray host) and checks its pictures.

Opt-in (about a minute, builds the demo model): pytest -m xvfb tests/xvfb
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.qt import QtGui

SCRIPT = Path(__file__).with_name("run_screenshots.sh")
EXPECTED = ("chat-window.png", "chat-window-streaming.png", "chat-window-dark.png", "tray-menu.png",
            "tray-menu-dark.png", "quick-ask.png", "model-dialog.png", "model-dialog-dark.png")


@pytest.mark.xvfb
@pytest.mark.slow
@pytest.mark.skipif(not all(shutil.which(t) for t in ("Xvfb", "trayer", "xdotool")),
                    reason="needs Xvfb, trayer and xdotool (apt-get install -y xvfb trayer xdotool)")
def test_screenshots_show_window_and_tray_menu(tmp_path: Path, qapp) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in EXPECTED:
        image = QtGui.QImage(str(tmp_path / name))
        assert not image.isNull(), name
        colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
        assert len(colours) > 20, f"{name} looks blank"
    window = QtGui.QImage(str(tmp_path / "chat-window.png"))
    assert (window.width(), window.height()) == (1280, 800)
