"""Info.plist of MoeBar.app: rendered from packaging/macos/Info.plist.in with pyproject's version."""

from __future__ import annotations

import plistlib
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def test_plist_makes_a_menu_bar_app_with_the_project_version(build: ModuleType) -> None:
    plist = plistlib.loads(build.render_info_plist())
    assert plist["LSUIElement"] is True  # no Dock icon, menu bar only
    assert plist["CFBundleIdentifier"] == build.BUNDLE_ID
    assert plist["CFBundleIdentifier"].count(".") >= 2
    assert plist["CFBundleShortVersionString"] == pyproject_version()
    assert plist["CFBundleVersion"] == pyproject_version()  # "0.1.0" is already all numbers
    assert plist["CFBundleExecutable"] == plist["CFBundleName"] == "MoeBar"
    assert plist["CFBundlePackageType"] == "APPL"
    assert plist["CFBundleIconFile"] == "MoeBar.icns"
    assert plist["LSArchitecturePriority"] == ["arm64"]


def test_a_pre_release_version_gives_a_numeric_bundle_version(build: ModuleType) -> None:
    plist = build.info_plist("2.3.4rc1")  # the dict the spec hands to PyInstaller's BUNDLE
    assert plist["CFBundleShortVersionString"] == "2.3.4rc1"
    assert plist["CFBundleVersion"] == "2.3.4"


@pytest.mark.parametrize(("version", "expected"), [
    ("0.1.0", "0.1.0"), ("1.2.3rc1", "1.2.3"), ("1.2.dev0", "1.2"), ("10", "10"), ("1.2.3.4", "1.2.3"),
])
def test_bundle_version_keeps_the_leading_numbers(build: ModuleType, version: str, expected: str) -> None:
    assert build.bundle_version(version) == expected


def test_bundle_version_refuses_a_version_without_numbers(build: ModuleType) -> None:
    with pytest.raises(ValueError, match="does not start with a number"):
        build.bundle_version("dev")


def test_template_placeholders_are_all_filled(build: ModuleType) -> None:
    template = build.INFO_PLIST_TEMPLATE.read_text(encoding="utf-8")
    for name in build.plist_values("1.0"):
        assert f"@{name}@" in template, f"@{name}@ is never used"
    with pytest.raises(ValueError, match="@MISSING@"):
        build.render_template("<string>@MISSING@</string>", build.plist_values("1.0"))


def test_read_version_reads_the_project_table(build: ModuleType, tmp_path: Path) -> None:
    assert build.read_version() == pyproject_version()
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "x"\nversion = "3.1.4"\n')
    assert build.read_version(other) == "3.1.4"
    other.write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match="version is missing"):
        build.read_version(other)


def test_plist_command_writes_a_plist_file(build: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "Contents" / "Info.plist"
    assert build.main(["plist", str(out)]) == 0
    assert plistlib.loads(out.read_bytes())["CFBundleShortVersionString"] == pyproject_version()
