"""Size, count and time caps for the file tools and for drops."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class ToolLimits:
    """Caps that keep every tool call small and quick, whatever the user dropped."""

    max_file_bytes: int = 64 * MIB  # larger files are refused outright ("too big")
    max_read_bytes: int = 256 * KIB  # read_file returns at most this much text
    max_read_lines: int = 2000  # ... and at most this many lines
    sniff_bytes: int = 8 * KIB  # the first block checked for NUL bytes and UTF-8
    max_list_entries: int = 2000  # list_folder hard cap (the model may ask for fewer)
    max_search_results: int = 500  # search_text hard cap on matching lines
    max_search_files: int = 5000  # files opened by one search
    max_search_bytes: int = 256 * MIB  # bytes read by one search
    search_timeout_s: float = 3.0  # wall-clock budget of one search, regex included
    max_path_chars: int = 4096
    max_symlink_hops: int = 16


DEFAULT_LIMITS = ToolLimits()


def human_size(size: int) -> str:
    """A byte count as '812 B', '4.2 KB', '17.0 MB' (powers of 1024)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
