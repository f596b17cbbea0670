"""Does a row's result depend on how many rows its call has, within one kernel? (a GPU's self-check)

Where MLX picks kernels by shape, the engine calls them with mlx-lm's shapes, except that a
prefill pass runs its MLP over the whole pass where mlx-lm ran steps of 2,048 tokens
(engine.model.kernel_shapes). That is exact only if, within one kernel, a row's sum does not
depend on the call's length: CUDA's tiled kernels pick their tile height by the row count.
Checked here in bf16 at widths like a real model's (multiples of 128), for a quantized linear
layer (calls of 8 to 2,048 rows) and for mlx-lm's expert module (calls of 16 to 64 tokens, every
one sorted by expert as mlx-lm sorts 64 pairs or more).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

LINEAR_ROWS = (8, 20, 64, 2048)
EXPERT_TOKENS = (16, 24, 64)  # x top-4: 64 pairs and more, sorted in mlx-lm's SwitchGLU
HEAD = 8  # rows compared across the calls


@dataclass
class RowLengthResult:
    """The first call length whose head rows differ from the shortest call's (None: all equal)."""

    what: str  # "quantized linear" or "experts"
    rows: int | None
    max_abs_diff: float
    against: int  # the shortest call's length, whose rows the others are compared with


def _first_difference(heads: list[mx.array], lengths: tuple[int, ...], what: str) -> RowLengthResult:
    mx.eval(*heads)
    for length, head in zip(lengths[1:], heads[1:]):
        if not bool(mx.array_equal(heads[0], head)):
            diff = float(mx.max(mx.abs(heads[0].astype(mx.float32) - head.astype(mx.float32))))
            return RowLengthResult(what, length, diff, lengths[0])
    return RowLengthResult(what, None, 0.0, lengths[0])


def check_row_length(dtype: mx.Dtype = mx.bfloat16, hidden: int = 512, width: int = 256) -> list[RowLengthResult]:
    """Rows 0-7 of a 4-bit linear layer and of mlx-lm's 4-bit experts, in calls of several lengths."""
    from mlx_lm.models.switch_layers import SwitchGLU

    mx.random.seed(0)
    x = mx.random.normal((max(LINEAR_ROWS), hidden)).astype(dtype)
    linear = nn.QuantizedLinear.from_linear(nn.Linear(hidden, width, bias=False), group_size=64, bits=4)
    linear.set_dtype(dtype)
    lin = _first_difference([linear(x[:m])[:HEAD] for m in LINEAR_ROWS], LINEAR_ROWS, "quantized linear")
    experts, k = 8, 4
    switch = SwitchGLU(hidden, width, experts)
    nn.quantize(switch, group_size=64, bits=4)
    switch.set_dtype(dtype)
    idx = mx.random.randint(0, experts, (max(EXPERT_TOKENS), k)).astype(mx.uint32)
    exp = _first_difference([switch(x[:m], idx[:m])[:HEAD] for m in EXPERT_TOKENS], EXPERT_TOKENS, "experts")
    return [lin, exp]
