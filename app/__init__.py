"""MoeBar desktop app (PySide6)."""
