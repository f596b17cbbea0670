"""Fixtures for the packaging tests: the build helpers in packaging/ (not an importable package,
since a folder called `packaging` would shadow the PyPI library of that name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"


def load_packaging_module(name: str) -> ModuleType:
    """Import packaging/<name>.py under its own name (once per session)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACKAGING / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build() -> ModuleType:
    """packaging/moebar_build.py: version, Info.plist, data files, .desktop entry."""
    return load_packaging_module("moebar_build")


@pytest.fixture(scope="session")
def icons() -> ModuleType:
    """packaging/moebar_icons.py: SVG to PNG, .iconset and .icns."""
    return load_packaging_module("moebar_icons")
