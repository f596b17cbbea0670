"""Use more than one CPU core where it pays: MLX runs each CPU stream's kernels on one thread.

The output projection (``lm_head``: hidden -> vocabulary, the largest single matmul of a decode
step, 150k+ rows for Qwen) is split by output rows into one part per stream. Each logit is
the same dot product as before, so the logits are bit-identical; the parts run concurrently.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn


_LOCAL = threading.local()


def cpu_stream(i: int) -> mx.Stream:
    """The i-th extra CPU stream of the calling thread (MLX streams belong to the thread that
    made them); each stream runs its kernels on a thread of its own."""
    streams: list[mx.Stream] = getattr(_LOCAL, "streams", None) or []
    _LOCAL.streams = streams
    while len(streams) <= i:
        streams.append(mx.new_stream(mx.cpu))
    return streams[i]


class RowSplitLinear(nn.Module):
    """A (quantized) linear layer whose output rows are computed on several CPU streams."""

    def __init__(self, linear: nn.Module, parts: int) -> None:
        super().__init__()
        rows = linear.weight.shape[0]
        bounds = [rows * i // parts for i in range(parts + 1)]
        self._quantized = isinstance(linear, nn.QuantizedLinear)
        self._qargs: dict[str, Any] = (
            {"group_size": linear.group_size, "bits": linear.bits, "mode": getattr(linear, "mode", "affine")}
            if self._quantized
            else {}
        )
        self.parts: list[dict[str, mx.array]] = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = {name: mx.contiguous(arr[lo:hi]) for name, arr in linear.parameters().items()}
            mx.eval(part)
            self.parts.append(part)

    def _one(self, x: mx.array, p: dict[str, mx.array]) -> mx.array:
        if self._quantized:
            y = mx.quantized_matmul(
                x, p["weight"], scales=p["scales"], biases=p.get("biases"), transpose=True, **self._qargs
            )
        else:
            y = x @ p["weight"].T
        return y + p["bias"] if "bias" in p else y

    def __call__(self, x: mx.array) -> mx.array:
        outs = []
        for i, part in enumerate(self.parts):
            with mx.stream(cpu_stream(i)):
                outs.append(self._one(x, part))
        return mx.concatenate(outs, axis=-1)


def cpu_streams() -> int:
    """How many CPU streams to split large matmuls over (the usable cores, at most 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def split_output_projection(model: nn.Module, parts: int) -> bool:
    """Replace an untied ``lm_head`` by a row-split one; False when there is none to split."""
    if parts < 2:
        return False
    owner: Any = model
    if not isinstance(getattr(owner, "lm_head", None), (nn.Linear, nn.QuantizedLinear)):
        owner = getattr(model, "language_model", None)
    head = getattr(owner, "lm_head", None) if owner is not None else None
    if not isinstance(head, (nn.Linear, nn.QuantizedLinear)):
        return False
    owner.lm_head = RowSplitLinear(head, parts)
    return True
