"""Process limits the engine may need raised: open files for models with many shard files."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

# macOS refuses a soft RLIMIT_NOFILE above OPEN_MAX (kern.maxfilesperproc is larger but setrlimit
# still caps at this) even when the hard limit is RLIM_INFINITY.
MACOS_OPEN_MAX = 10240


def raise_open_files_limit(
    needed: int,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    platform: str = sys.platform,
) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``needed`` where the hard limit allows; return it.

    Never lowers the limit. When the hard limit is below ``needed`` the soft limit goes up to the
    hard limit, and the later ``open`` fails with the OS's own error naming the file.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    ceiling = hard if hard != resource.RLIM_INFINITY else needed
    if platform == "darwin":
        ceiling = min(ceiling, MACOS_OPEN_MAX)
    target = max(soft, min(needed, ceiling))
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
    return target
