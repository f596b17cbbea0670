"""Out of memory, whatever the backend: the texts MLX raises on Metal and CUDA are classified as
out_of_memory (the engine is restarted), with advice; other RuntimeErrors stay internal errors."""

from __future__ import annotations

import pytest

from engine.serving.out_of_memory import is_out_of_memory
from engine.serving.service import error_event

# Texts as MLX raises them (mlx/backend/metal/allocator.cpp, metal/eval.cpp, cuda/allocator.cpp,
# cuda/utils.cpp) and as reported by users of MLX on Macs.
OOM_TEXTS = [
    "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[metal::malloc] Attempting to allocate 18253611008 bytes which is greater than the maximum allowed buffer "
    "size of 17179869184 bytes.",
    "[metal::malloc] Resource limit (499000) exceeded.",
    "[malloc] Unable to allocate 1073741824 bytes.",
    "cudaMallocManaged(&buf->data, size) failed: out of memory",
    "cudaMalloc failed: out of memory",
    "CUDA error: out of memory",
]
NOT_OOM = [
    "[metal] command buffer failed",
    "[matmul] Last dimension of first input with shape (1,64) must match second to last dimension",
    "cudaStreamCreate failed: invalid device ordinal",
]


@pytest.mark.parametrize("text", OOM_TEXTS)
def test_backend_exhaustion_is_out_of_memory_and_restarts(text: str) -> None:
    exc = RuntimeError(text)
    assert is_out_of_memory(exc)
    event = error_event(exc, "r1")
    assert (event.code, event.usable, event.id) == ("out_of_memory", False, "r1")
    assert text in event.message  # what failed
    for advice in ("restart", "smaller expert cache", "shorter conversation", "smaller model"):
        assert advice in event.message  # what to change


@pytest.mark.parametrize("text", NOT_OOM)
def test_other_runtime_errors_stay_internal(text: str) -> None:
    assert not is_out_of_memory(RuntimeError(text))
    event = error_event(RuntimeError(text))
    assert (event.code, event.usable) == ("internal_error", True)


def test_memory_error_and_only_runtime_errors_are_classified() -> None:
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocators' RuntimeErrors
    assert error_event(MemoryError("std::bad_alloc")).message.startswith("out of memory (MemoryError: std::bad_alloc)")
