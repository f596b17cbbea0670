"""The one error type tools raise: its message is shown to the user and returned to the model."""


class ToolError(Exception):
    """A tool call was refused or failed; the message says why and, where possible, what to do instead."""
