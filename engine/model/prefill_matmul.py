"""Long prefill calls: on the CPU at BLAS speed (dequantize each weight once, one dense GEMM), and
on a GPU one quantized matmul per expert run (``PrefillMatmul.kind``, see the last paragraph).

MLX's CPU quantized matmul costs the same per token whether a call carries 1 token or 512 (it
works row by row), so a prefill chunk gains nothing from being batched there. With a fast BLAS
behind MLX (Accelerate on macOS, OpenBLAS on Linux: see ``platform_info.load_fast_blas``) a
chunk can instead dequantize each weight matrix once (split over CPU streams, one thread each)
and multiply all of the chunk's rows with one GEMM: 10-19x less time for 128-512 rows on a
2-core VM. Each output is still the dot product of the same input row with the same dequantized
weights; only the order of the float additions differs (agreement to about 1e-6 relative, as
between MLX's own kernels for different batch sizes).

Two module classes take over (their instances' classes are swapped in place, so parameter paths
and loading are untouched): ``PrefillQuantizedLinear`` for the dense layers (attention, dense
MLPs, shared experts) and ``PrefillSwitchLinear`` for the expert projections of a streamed
layer, which learn the chunk's expert runs from ``PrefillMatmul.plan`` (set by the streamed
layer, which already knows the routing on the host).

On a GPU (kind "quantized", expert projections only): MLX's CUDA ``gather_qmm`` runs every
(token, expert) pair as a one-row product and reads the expert's weights once per pair; each run
of rows routed to one expert becomes one ``mx.quantized_matmul`` instead, reading them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from engine.model.cpu_parallel import cpu_stream

# Experts dequantized between two evaluations: bounds the transient dense copies (a 768 x 2048
# expert projection is 6 MiB in fp32) without costing a measurable sync.
_EXPERTS_PER_EVAL = 8


@dataclass
class PrefillMatmul:
    """When long calls leave mlx-lm's kernels (dense GEMMs on the CPU, one quantized matmul per
    expert run on a GPU); shared by every swapped module of a model."""

    enabled: bool = False
    # "dequant": dequantize + dense GEMM (the CPU with a fast BLAS); "quantized": one quantized
    # matmul per expert run, reading each expert once (a GPU: see ``expert_runs_prefill``)
    kind: str = "dequant"
    streams: int = 1  # CPU streams the dequantization is split over
    min_rows: int = 32  # dense layers: rows (tokens) in one call
    min_expert_rows: int = 4  # expert layers: rows routed to one expert in one call
    # (slot ids ascending, rows per slot) of the sorted expert call being built, else None
    plan: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    dense_gemms: int = 0  # weight matrices multiplied this way (either kind) since load


def dequantize_affine(weight: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int) -> mx.array:
    """``mx.dequantize`` of an affine-quantized matrix, twice as fast on the CPU for 4 and 8 bits.

    The codes are unpacked as bytes (MLX packs them little-endian, low bits first) and scaled by
    plain element-wise ops, which MLX's CPU backend vectorises better than its dequantize
    kernel; the values are the same (``scale * code + bias`` per element).
    """
    if biases is None or bits not in (4, 8):
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    rows = weight.shape[0]
    codes = mx.view(weight, mx.uint8)
    if bits == 4:
        codes = mx.stack([codes & 15, codes >> 4], axis=-1)
    grouped = codes.astype(scales.dtype).reshape(rows, scales.shape[-1], -1)
    return (grouped * scales[..., None] + biases[..., None]).reshape(rows, -1)


def _dequantized(weight: mx.array, scales: mx.array, biases: mx.array | None, module: nn.Module, streams: int) -> list[mx.array]:
    """The weight dequantized in ``streams`` row blocks, each on its own CPU stream."""
    rows = weight.shape[0]
    parts = max(1, min(streams, rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    out = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        with mx.stream(cpu_stream(i)):
            part_biases = None if biases is None else biases[lo:hi]
            out.append(dequantize_affine(weight[lo:hi], scales[lo:hi], part_biases, module.group_size, module.bits))
    return out


def dequant_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array | None, module: nn.Module, streams: int) -> mx.array:
    """``x @ dequantize(weight).T`` for a 2-D ``x``: the rows of each dequantized block at once."""
    blocks = _dequantized(weight, scales, biases, module, streams)
    outs = [mx.matmul(x, w.astype(x.dtype).T) for w in blocks]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


class PrefillQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that multiplies long inputs by its dequantized weight (see module)."""

    _prefill: PrefillMatmul

    def __call__(self, x: mx.array) -> mx.array:
        mode = self._prefill
        rows = x.size // max(1, x.shape[-1])
        if not (mode.enabled and rows >= mode.min_rows):
            return super().__call__(x)
        mode.dense_gemms += 1
        flat = x.reshape(rows, x.shape[-1])
        y = dequant_matmul(flat, self["weight"], self["scales"], self.get("biases"), self, mode.streams)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if "bias" in self:
            y = y + self["bias"]
        return y


class PrefillSwitchLinear(QuantizedSwitchLinear):
    """Expert projection that runs a chunk's long expert runs as dense GEMMs, or on a GPU as one
    quantized matmul each (see module).

    Used only for mlx-lm's sorted call shape (rows ``[N, 1, D]`` ordered by slot, as
    ``SwitchGLU``/``SwitchMLP`` make for 64 or more routed rows) while the streamed layer has set
    a plan; short runs, and every other call, go to mlx-lm's own ``gather_qmm``.
    """

    _prefill: PrefillMatmul

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        mode = self._prefill
        plan = mode.plan
        if (
            plan is None
            or not mode.enabled
            or not sorted_indices
            or x.ndim != 3
            or x.shape[1] != 1
            or indices.ndim != 1
            or x.shape[0] != int(plan[1].sum())
            or self.get("global_scale") is not None
        ):
            return super().__call__(x, indices, sorted_indices)
        slots, counts = plan
        pieces: list[mx.array] = []
        pending: list[mx.array] = []  # pieces built since the last evaluation
        dense_runs = 0
        start = 0
        short_from: int | None = None  # first row of a stretch of short runs not yet computed
        for slot, count in zip(slots.tolist(), counts.tolist()):
            if count < mode.min_expert_rows:
                short_from = start if short_from is None else short_from
                start += count
                continue
            if short_from is not None:
                pending.append(super().__call__(x[short_from:start], indices[short_from:start], True))
                short_from = None
            mode.dense_gemms += 1
            rows = x[start : start + count, 0, :]
            if mode.kind == "quantized":
                y = quantized_run(rows, self, slot)
            else:
                y = dequant_matmul(rows, self["weight"][slot], self["scales"][slot], _at(self.get("biases"), slot), self, mode.streams)
            if "bias" in self:
                y = y + self["bias"][slot]
            pending.append(y[:, None, :])
            start += count
            dense_runs += 1
            if mode.kind == "dequant" and dense_runs % _EXPERTS_PER_EVAL == 0:  # bounds the dense copies
                mx.eval(pending)
                pieces.extend(pending)
                pending = []
        if short_from is not None:
            pending.append(super().__call__(x[short_from:start], indices[short_from:start], True))
        pieces.extend(pending)
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)


def quantized_run(rows: mx.array, module: QuantizedSwitchLinear, slot: int) -> mx.array:
    """One expert's routed rows times its quantized weight, read once (the GPU kind)."""
    return mx.quantized_matmul(rows, module["weight"][slot], module["scales"][slot], _at(module.get("biases"), slot),
                               transpose=True, group_size=module.group_size, bits=module.bits, mode=module.mode)  # fmt: skip


def _at(arr: mx.array | None, i: int) -> mx.array | None:
    return None if arr is None else arr[i]


def install_prefill_matmul(roots: list[nn.Module], mode: PrefillMatmul, experts_only: bool = False) -> int:
    """Give every affine-quantized linear under ``roots`` the long-input path; return how many.

    Swaps the class of exact ``nn.QuantizedLinear`` and ``QuantizedSwitchLinear`` instances (not
    subclasses, whose behaviour may differ) so the parameter tree is unchanged. The roots are the
    model and the switch modules that streamed layers keep outside its tree. ``experts_only``:
    the expert projections alone (a GPU's dense layers already multiply all rows at once).
    """
    swapped = 0
    modules = [m for root in roots for _, m in root.named_modules()]
    for module in modules:
        if getattr(module, "mode", "affine") != "affine":
            continue
        if type(module) is nn.QuantizedLinear and not experts_only:
            module.__class__ = PrefillQuantizedLinear
        elif type(module) is QuantizedSwitchLinear:
            module.__class__ = PrefillSwitchLinear
        else:
            continue
        module._prefill = mode
        swapped += 1
    return swapped
