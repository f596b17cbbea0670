"""Built-in file tools for the model, sandboxed to what the user dropped onto the window."""

from app.tools.builtin import file_info, list_folder, read_file, search_text
from app.tools.errors import ToolError
from app.tools.limits import DEFAULT_LIMITS, ToolLimits, human_size
from app.tools.registry import BUILTIN_TOOLS, ToolRegistry, ToolSpec, parse_arguments, validate_arguments
from app.tools.sandbox import (
    REASON_BINARY,
    REASON_NOT_FILE_OR_FOLDER,
    REASON_TOO_BIG,
    REASON_UNREADABLE,
    DroppedFiles,
    DroppedItem,
    OpenedPath,
    classify_drop,
)

__all__ = [
    "BUILTIN_TOOLS",
    "DEFAULT_LIMITS",
    "REASON_BINARY",
    "REASON_NOT_FILE_OR_FOLDER",
    "REASON_TOO_BIG",
    "REASON_UNREADABLE",
    "DroppedFiles",
    "DroppedItem",
    "OpenedPath",
    "ToolError",
    "ToolLimits",
    "ToolRegistry",
    "ToolSpec",
    "classify_drop",
    "file_info",
    "human_size",
    "list_folder",
    "parse_arguments",
    "read_file",
    "search_text",
    "validate_arguments",
]
