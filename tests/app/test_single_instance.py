"""One MoeBar per profile: a second launch hands over (the first shows its window) and exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.single_instance import SingleInstance, server_name

ROOT = Path(__file__).resolve().parents[2]
SECOND_LAUNCH = """
import sys
from pathlib import Path
from PySide6.QtCore import QCoreApplication
from app.single_instance import SingleInstance
app = QCoreApplication([])
instance = SingleInstance(Path(sys.argv[1]))
print("claimed" if instance.claim() else "handed over", flush=True)
"""


def launch(profile: Path) -> str:
    done = subprocess.run([sys.executable, "-c", SECOND_LAUNCH, str(profile)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_second_launch_hands_over_and_the_first_shows(qtbot, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    first = SingleInstance(profile)
    assert first.claim()
    try:
        with qtbot.waitSignal(first.show_requested, timeout=20_000):
            assert launch(profile) == "handed over"
        assert launch(tmp_path / "other-profile") == "claimed"  # another profile is another app
    finally:
        first.release()
    assert launch(profile) == "claimed"  # once the first quit, a launch starts normally


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    crash = SECOND_LAUNCH + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n"
    killed = subprocess.run([sys.executable, "-c", crash, str(profile)], cwd=ROOT, capture_output=True, timeout=60)
    assert killed.returncode == -9 and (profile / "moebar.lock").exists()  # its lock is left behind
    assert launch(profile) == "claimed"


def test_names_differ_per_profile(tmp_path: Path) -> None:
    assert server_name(tmp_path / "a") != server_name(tmp_path / "b")
    assert server_name(tmp_path / "a") == server_name(tmp_path / "a")
