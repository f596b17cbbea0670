"""Checks on names and paths given to tools: hidden characters, lookalikes, safe display."""

from __future__ import annotations

import unicodedata

from app.tools.errors import ToolError

# Characters that reorder how text is displayed, so "evil\u202etxt.exe" shows as "evilexe.txt".
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe_character(text: str) -> str | None:
    """Describe the first character of `text` that could hide or disguise a name, or None if there is none."""
    for char in text:
        code = f"U+{ord(char):04X}"
        if char == "\x00":
            return "a NUL character"
        category = unicodedata.category(char)
        if char in BIDI_CONTROLS:
            return f"a bidirectional text control ({code}) that can disguise a name"
        if category == "Cc":
            return f"a control character ({code})"
        if category == "Cs":
            return f"an undecodable byte or lone surrogate ({code})"
        if category == "Cf":
            return f"an invisible formatting character ({code})"
        if category in ("Zl", "Zp"):
            return f"a line or paragraph separator ({code})"
        if category == "Cn":
            return f"an unassigned Unicode character ({code})"
    return None


def shown(text: str) -> str:
    """`text` with hidden or control characters written as escapes, safe to put in a message or listing."""
    if unsafe_character(text) is None:
        return text
    parts = []
    for char in text:
        if unsafe_character(char) is None:
            parts.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # a raw byte that was not UTF-8 (surrogateescape)
            parts.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            parts.append(f"\\u{ord(char):04x}")
    return "".join(parts)


def lookalike_key(name: str) -> str:
    """A folded form under which names that only differ in case, width or normalization compare equal."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_path_argument(path: str, max_chars: int) -> str:
    """Refuse a tool path that is empty, too long or contains hidden characters; return it unchanged."""
    if not path.strip():
        raise ToolError("The path is empty. Give the name of a dropped file or folder, or a path inside one.")
    if len(path) > max_chars:
        raise ToolError(f"The path is {len(path)} characters long; the limit is {max_chars}.")
    problem = unsafe_character(path)
    if problem is not None:
        raise ToolError(f"The path '{shown(path)}' contains {problem}. Tools only open names without hidden "
                        "or control characters; rename the file or drop it directly.")
    return path


def explain_lookalike(wanted: str, candidates: list[str], where: str) -> str | None:
    """If `wanted` matches one of `candidates` only after folding, a message naming the exact name to use."""
    key = lookalike_key(wanted)
    matches = [name for name in candidates if name != wanted and lookalike_key(name) == key]
    if not matches:
        return None
    exact = matches[0]
    if unicodedata.normalize("NFC", exact) == unicodedata.normalize("NFC", wanted):
        how = "Unicode normalization (composed vs decomposed accents)"
    elif exact.casefold() == wanted.casefold():
        how = "letter case"
    else:
        how = "lookalike characters (such as full-width letters)"
    return (f"There is no '{shown(wanted)}' in {where}, but there is '{shown(exact)}', which differs only in "
            f"{how}. Names must match exactly; use '{shown(exact)}' if that is the one you mean.")
