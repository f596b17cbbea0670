"""Out of memory, whatever the backend: Python's MemoryError and MLX's Metal and CUDA RuntimeErrors.

MLX reports exhaustion on a GPU as a RuntimeError with the backend's own text, e.g.
"[METAL] Command buffer execution failed: Insufficient Memory (...OutOfMemory)",
"[metal::malloc] Attempting to allocate N bytes which is greater than the maximum allowed buffer
size of M bytes.", "[metal::malloc] Resource limit (499000) exceeded.", "[malloc] Unable to
allocate N bytes." or CUDA's "cudaMallocManaged(...) failed: out of memory". After any of them the
engine's state (a half-evaluated graph, buffers in flight) cannot be trusted: it is restarted.
"""

from __future__ import annotations

import re

# Lower-case fragments of MLX's allocator and command-buffer errors (mlx/backend/metal/allocator.cpp,
# metal/eval.cpp, cuda/allocator.cpp, cuda/utils.cpp) and of the drivers' own texts.
_OOM_PATTERNS = (
    re.compile(r"insufficient memory"),
    re.compile(r"outofmemory"),  # kIOGPUCommandBufferCallbackErrorOutOfMemory
    re.compile(r"\[metal::malloc\]"),
    re.compile(r"\[malloc\] unable to allocate"),
    re.compile(r"\[cuda::malloc\]"),
    re.compile(r"failed: out of memory"),  # cudaGetErrorString(cudaErrorMemoryAllocation)
    re.compile(r"\bcuda[_ ]error[_ ]out[_ ]of[_ ]memory\b"),
    re.compile(r"\bout of memory\b"),
)

ADVICE = ("the engine will restart; to fit, choose a smaller expert cache (Settings: Expert cache, "
          "or --cache-mb), a shorter conversation or context, or a smaller model")  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether exc means memory ran out: a MemoryError, or a RuntimeError with a backend's OOM text."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(p.search(text) for p in _OOM_PATTERNS)


def out_of_memory_message(exc: BaseException) -> str:
    """The message the user sees: what failed, and what to change."""
    detail = str(exc).strip() or type(exc).__name__
    return f"out of memory ({type(exc).__name__}: {detail}); {ADVICE}"
