"""Light and dark themes: icons and style sheets from resources/, chosen from the system scheme."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from app.qt import Qt, QtGui, QtWidgets
from app.ui.markdown import DARK_CODE, LIGHT_CODE, CodePalette

ThemeName = Literal["light", "dark"]


@dataclass(frozen=True)
class Theme:
    """Colours the widgets paint themselves with (the rest comes from the style sheet)."""

    name: ThemeName
    text: str
    muted: str
    accent: str
    ok: str
    warning: str
    error: str
    user_bubble: str
    assistant_bubble: str
    card: str
    border: str
    code: CodePalette
    window: str = "#f6f8fa"
    base: str = "#ffffff"
    button: str = "#f3f4f6"


LIGHT = Theme("light", "#1f2328", "#656d76", "#0a66c2", "#1a7f37", "#bf8700", "#cf222e",
              "#ddf4ff", "#ffffff", "#f6f8fa", "#d0d7de", LIGHT_CODE)
DARK = Theme("dark", "#e6edf3", "#8b949e", "#4c9ded", "#3fb950", "#d29922", "#f85149",
             "#1c2d41", "#161b22", "#1c2128", "#30363d", DARK_CODE,
             window="#0d1117", base="#161b22", button="#21262d")


def resources_dir() -> Path:
    """The resources/ folder: beside the app package, or inside a frozen bundle."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return Path(bundle) / "resources"
    return Path(__file__).resolve().parents[2] / "resources"


def theme_named(name: str) -> Theme:
    """Return the theme called `name` ("light" or "dark"; anything else gives light)."""
    return DARK if name == "dark" else LIGHT


def system_theme() -> Theme:
    """The theme matching the desktop's colour scheme (light when it cannot be told)."""
    app = QtGui.QGuiApplication.instance()
    if isinstance(app, QtGui.QGuiApplication):
        if app.styleHints().colorScheme() == Qt.ColorScheme.Dark:
            return DARK
    return LIGHT


def resolve_theme(preference: str) -> Theme:
    """Resolve a setting ("system", "light" or "dark") to a theme."""
    return system_theme() if preference == "system" else theme_named(preference)


@lru_cache(maxsize=256)
def icon(name: str, theme: ThemeName = "light") -> QtGui.QIcon:
    """The SVG icon `name` drawn for `theme`; raises FileNotFoundError for an unknown name."""
    path = resources_dir() / "icons" / theme / f"{name}.svg"
    if not path.is_file():
        raise FileNotFoundError(f"icon {name!r} not found at {path}")
    return QtGui.QIcon(str(path))


def app_icon() -> QtGui.QIcon:
    """The application icon (window, about box, bundle)."""
    return QtGui.QIcon(str(resources_dir() / "icons" / "moebar.svg"))


def style_sheet(theme: Theme) -> str:
    """The style sheet for `theme` from resources/qss."""
    return (resources_dir() / "qss" / f"{theme.name}.qss").read_text(encoding="utf-8")


def palette_for(theme: Theme) -> QtGui.QPalette:
    """A palette in `theme`'s colours, for the widgets the style sheet does not name."""
    role = QtGui.QPalette.ColorRole
    palette = QtGui.QPalette()
    colours = {
        role.Window: theme.window, role.WindowText: theme.text, role.Base: theme.base,
        role.AlternateBase: theme.card, role.Text: theme.text, role.Button: theme.button,
        role.ButtonText: theme.text, role.ToolTipBase: theme.base, role.ToolTipText: theme.text,
        role.PlaceholderText: theme.muted, role.Highlight: theme.accent, role.HighlightedText: "#ffffff",
        role.Link: theme.accent, role.Mid: theme.border,
    }
    for colour_role, value in colours.items():
        palette.setColor(colour_role, QtGui.QColor(value))
    disabled = QtGui.QPalette.ColorGroup.Disabled
    for colour_role in (role.WindowText, role.Text, role.ButtonText):
        palette.setColor(disabled, colour_role, QtGui.QColor(theme.muted))
    return palette


def apply_theme(app: QtWidgets.QApplication, theme: Theme) -> None:
    """Install `theme`'s palette and style sheet on the whole application."""
    app.setPalette(palette_for(theme))
    app.setStyleSheet(style_sheet(theme))
