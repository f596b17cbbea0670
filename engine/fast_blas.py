"""A fast BLAS under MLX's CPU backend on Linux (on macOS MLX already uses Accelerate).

The Linux ``mlx[cpu]`` wheel links the netlib reference BLAS (``mlx_cpu.libs/libblas-*.so``):
its ``cblas_sgemm`` takes ~550 ms for a 128 x 2048 x 4096 product on a 2-core VM, where
OpenBLAS takes ~40 ms. A library loaded with ``RTLD_GLOBAL`` before ``mlx.core`` is imported is
searched before the bundled one when MLX's symbols are bound, so MLX's matmuls run on it. Only
``sgemm`` is affected (MLX's quantized kernels are its own). Importing ``engine`` does this
first; ``MOEBAR_BLAS=off`` keeps MLX's own, ``MOEBAR_BLAS=/path/libblas.so`` picks a library.

Nothing here imports MLX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

ENV_VAR = "MOEBAR_BLAS"

# Debian/Ubuntu (libopenblas0-pthread, libopenblas0-openmp), Fedora/RHEL, Arch, Alpine.
CANDIDATES: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: dict[str, str | None] = {"path": None, "why_not": "not tried"}

# OpenBLAS kernels by the CPU features they need (x86-64). OpenBLAS picks its kernels from the
# CPU model, and older releases (Debian 12 ships 0.3.21) fall back to a generic SSE kernel on
# models they do not know, as under some VMs: 3.4x slower sgemm on this project's VM.
_CORETYPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def openblas_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS kernel family the CPU's feature flags allow (x86-64), from /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            for name, needs in _CORETYPES:
                if needs <= flags:
                    return name
            return None
    return None


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _open_global(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _candidates(env: Mapping[str, str]) -> list[str]:
    chosen = env.get(ENV_VAR, "").strip()
    if chosen and chosen.lower() not in ("auto", "on"):
        return [chosen]
    found = ctypes.util.find_library("openblas")
    return [*CANDIDATES, *([found] if found else [])]


def load_fast_blas(
    platform: str = sys.platform,
    env: Mapping[str, str] = os.environ,
    modules: Iterable[str] = sys.modules,
    opener: Callable[[str], ctypes.CDLL] = _open_global,
    exists: Callable[[str], bool] = lambda p: Path(p).is_file() or "/" not in p,
) -> str | None:
    """Load a fast BLAS ahead of MLX's bundled one (Linux); return its path, or None and why not.

    Must run before ``mlx.core`` is imported; later it does nothing (see ``fast_blas_status``).
    """
    if _loaded["path"] is not None:
        return _loaded["path"]
    if platform != "linux":
        _loaded["why_not"] = f"not needed on {platform}"
        return None
    if env.get(ENV_VAR, "").strip().lower() in ("off", "0", "no", "false"):
        _loaded["why_not"] = f"{ENV_VAR}=off"
        return None
    if "mlx.core" in modules:
        _loaded["why_not"] = "mlx.core was imported before engine"
        return None
    if env is os.environ and "OPENBLAS_CORETYPE" not in env:  # read when the library loads
        coretype = openblas_coretype(_cpuinfo())
        if coretype:
            os.environ["OPENBLAS_CORETYPE"] = coretype
    errors = []
    chosen = env.get(ENV_VAR, "").strip()
    for path in _candidates(env):
        if not exists(path):
            if path == chosen:  # the user named it: say so rather than suggest installing OpenBLAS
                errors.append(f"{path}: no such file ({ENV_VAR})")
            continue
        try:
            lib = opener(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        if not hasattr(lib, "cblas_sgemm"):
            errors.append(f"{path}: no cblas_sgemm")
            continue
        _loaded.update(path=path, why_not=None)
        return path
    _loaded["why_not"] = "; ".join(errors) or "no OpenBLAS found (Debian: apt install libopenblas0-pthread)"
    return None


def fast_blas_status(platform: str = sys.platform) -> tuple[bool, str]:
    """(whether MLX's CPU matmuls run on a fast BLAS, the library or the reason they do not)."""
    if platform == "darwin":
        return True, "Accelerate"
    if _loaded["path"] is not None:
        return True, str(_loaded["path"])
    return False, str(_loaded["why_not"])
