"""The PATH that MCP servers start with.

A macOS menu-bar app is started by launchd with PATH=/usr/bin:/bin:/usr/sbin:/sbin, so `npx`
and `uvx` (Homebrew, nvm, ~/.local/bin) are not found. On macOS the PATH is taken once from the
user's login shell (`$SHELL -l -c 'printf ...'`); elsewhere the app's own PATH is used.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

SHELL_TIMEOUT_S = 5.0
_MARKER = "__MOEBAR_PATH__"

# Runs a command and returns its stdout (raises OSError / subprocess errors on failure).
Runner = Callable[[Sequence[str], float], str]


def _run(command: Sequence[str], timeout: float) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=True)
    return done.stdout


def login_shell_path(platform: str = sys.platform, environ: dict[str, str] | None = None,
                     runner: Runner = _run) -> str:
    """The PATH to start servers with: the login shell's on macOS (falling back to ours), ours elsewhere."""
    environ = dict(os.environ) if environ is None else environ
    own = environ.get("PATH", os.defpath)
    if platform != "darwin":
        return own
    shell = environ.get("SHELL") or "/bin/zsh"
    # Markers around the value: login scripts may print banners before or after it.
    command = [shell, "-l", "-c", f"printf '{_MARKER}%s{_MARKER}' \"$PATH\""]
    try:
        output = runner(command, SHELL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not read PATH from the login shell %s (%s); using the app's PATH", shell, exc)
        return own
    parts = output.split(_MARKER)
    if len(parts) < 3 or not parts[1].strip():
        log.warning("the login shell %s printed no PATH; using the app's PATH", shell)
        return own
    # The shell's entries first, then any of ours it lacks.
    merged = [p for p in parts[1].split(os.pathsep) if p]
    merged += [p for p in own.split(os.pathsep) if p and p not in merged]
    return os.pathsep.join(merged)
