"""macOS: which physical disk's read counters move when a file on an APFS volume is read.

psutil's per-disk counters on macOS name physical whole disks ("disk0"), while a file sits on an
APFS volume ("disk3s1s1") of a synthesized container ("disk3") whose physical store is a
partition of the real disk ("disk0s2"). ``diskutil info -plist`` names that store: the volume's
(or its container's) ``APFSPhysicalStores``; a non-APFS volume names its ``ParentWholeDisk``.
"""

from __future__ import annotations

import plistlib
import re
import subprocess
from collections.abc import Callable
from typing import Any

DISKUTIL = "/usr/sbin/diskutil"
DiskInfo = Callable[[str], dict[str, Any]]
_physical_cache: dict[str, list[str]] = {}


def diskutil_info(device: str, run: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """``diskutil info -plist DEVICE`` as a dict; OSError when diskutil fails or is absent."""
    try:
        done = run([DISKUTIL, "info", "-plist", device], capture_output=True, timeout=10, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise OSError(f"diskutil info {device}: {e}") from e
    if done.returncode != 0:
        raise OSError(f"diskutil info {device} exited with {done.returncode}")
    try:
        info = plistlib.loads(done.stdout)
    except (plistlib.InvalidFileException, ValueError) as e:
        raise OSError(f"diskutil info {device}: unreadable plist ({e})") from e
    if not isinstance(info, dict):
        raise OSError(f"diskutil info {device}: not a dictionary")
    return info


def whole_disk(identifier: str) -> str | None:
    """"/dev/disk0s2" or "disk0s2" -> "disk0"."""
    match = re.match(r"(?:/dev/)?(disk\d+)", identifier)
    return match.group(1) if match else None


def _stores(info: dict[str, Any]) -> list[str]:
    """Identifiers of the APFS physical stores listed in a diskutil info dict."""
    out = []
    for store in info.get("APFSPhysicalStores") or []:
        if isinstance(store, dict):
            ident = store.get("APFSPhysicalStore") or store.get("DeviceIdentifier")
        else:
            ident = store
        if isinstance(ident, str):
            out.append(ident)
    return out


def macos_physical_disks(volume: str, info: DiskInfo = diskutil_info) -> list[str]:
    """The physical whole disks ("disk0") under a volume device ("/dev/disk3s1s1").

    An APFS volume: its physical stores (several for a Fusion drive), found on the volume itself
    or on its container. Otherwise: the volume's parent whole disk. Raises OSError when
    diskutil cannot be read.
    """
    v = info(volume)
    stores = _stores(v)
    container = v.get("APFSContainerReference")
    if not stores and isinstance(container, str):
        stores = _stores(info(container))
    disks = [d for d in (whole_disk(s) for s in stores) if d]
    if not disks and isinstance(v.get("ParentWholeDisk"), str):
        disks = [v["ParentWholeDisk"]]
    if not disks:
        fallback = whole_disk(volume)
        disks = [fallback] if fallback else []
    return sorted(set(disks))


def cached_physical_disks(volume: str, info: DiskInfo = diskutil_info) -> list[str]:
    """macos_physical_disks, remembered per volume (diskutil takes ~0.1 s; gauges sample twice a second)."""
    if volume not in _physical_cache:
        _physical_cache[volume] = macos_physical_disks(volume, info)
    return _physical_cache[volume]
