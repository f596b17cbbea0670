"""packaging/linux/moebar.desktop: a valid menu entry that starts `moebar` with the app's icon."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Main categories of the freedesktop.org menu specification.
MAIN_CATEGORIES = {"AudioVideo", "Audio", "Video", "Development", "Education", "Game", "Graphics",
                   "Network", "Office", "Science", "Settings", "System", "Utility"}


def test_desktop_entry_starts_moebar(build: ModuleType) -> None:
    entry = build.read_desktop_entry()
    assert entry["Type"] == "Application"
    assert entry["Name"] == "MoeBar"
    with open(ROOT / "pyproject.toml", "rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    command = entry["Exec"].split()
    assert command[0] in scripts, "Exec must run the console script pip installs"
    assert scripts[command[0]] == "app.main:main"
    assert all(not arg.startswith("%") for arg in command[1:]), "moebar takes no files or URLs"
    assert entry["TryExec"] == command[0]
    assert entry["Terminal"] == "false"


def test_desktop_entry_icon_and_categories(build: ModuleType) -> None:
    entry = build.read_desktop_entry()
    assert entry["Icon"] == "moebar"  # a theme name: packaging/linux/install.sh installs hicolor/*/apps/moebar.png
    assert "/" not in entry["Icon"]
    categories = entry["Categories"]
    assert categories.endswith(";")
    assert set(categories.rstrip(";").split(";")) & MAIN_CATEGORIES
    # Qt names the window class after the application name, which app.main sets to "MoeBar".
    assert entry["StartupWMClass"] == build.APP_NAME


def test_desktop_entry_without_its_group_is_refused(build: ModuleType, tmp_path: Path) -> None:
    broken = tmp_path / "broken.desktop"
    broken.write_text("[Something Else]\nName=x\n")
    with pytest.raises(ValueError, match="Desktop Entry"):
        build.read_desktop_entry(broken)


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None,
                    reason="desktop-file-validate not installed (apt-get install desktop-file-utils)")
def test_desktop_file_validate_accepts_it(build: ModuleType) -> None:
    done = subprocess.run(["desktop-file-validate", str(build.DESKTOP_FILE)], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "error" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_linux_install_script_installs_and_removes_a_build(build: ModuleType, tmp_path: Path) -> None:
    """install.sh on a stand-in build folder: binary link, menu entry pointing at it, icons; then --uninstall."""
    fake = tmp_path / "dist" / "MoeBar"
    (fake / "icons" / "hicolor" / "48x48" / "apps").mkdir(parents=True)
    (fake / "icons" / "hicolor" / "48x48" / "apps" / "moebar.png").write_bytes(b"png")
    (fake / "MoeBar").write_text("#!/bin/sh\necho moebar-stand-in\n")
    (fake / "MoeBar").chmod(0o755)
    shutil.copy(build.DESKTOP_FILE, fake / "moebar.desktop")
    prefix = tmp_path / "prefix"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFIX": str(prefix)}
    script = ROOT / "packaging" / "linux" / "install.sh"

    done = subprocess.run(["bash", str(script), str(fake)], check=False, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    link = prefix / "bin" / "moebar"
    ran = subprocess.run([str(link)], check=False, capture_output=True, text=True)
    assert ran.stdout.strip() == "moebar-stand-in"
    installed = build.read_desktop_entry(prefix / "share" / "applications" / "moebar.desktop")
    assert installed["Exec"] == str(link) and installed["Icon"] == "moebar"
    assert (prefix / "share" / "icons" / "hicolor" / "48x48" / "apps" / "moebar.png").is_file()

    done = subprocess.run(["bash", str(script), "--uninstall"], check=False, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not link.exists() and not (prefix / "lib" / "moebar").exists()
    assert not (prefix / "share" / "applications" / "moebar.desktop").exists()
    assert not (prefix / "share" / "icons" / "hicolor" / "48x48" / "apps" / "moebar.png").exists()
