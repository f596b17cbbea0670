"""Where each layer's experts live on disk: per-expert parameter shapes and byte ranges."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UnsupportedModelError
from engine.storage.safetensors_index import TensorLocation


@dataclass(frozen=True)
class ExpertParam:
    """One parameter of one expert (e.g. ``gate_proj.scales``): per-expert dtype, shape, bytes."""

    key: str  # path inside the switch module, e.g. "gate_proj.weight"
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]  # per-expert shape (the stacked tensor without its first axis)
    nbytes: int


@dataclass
class LayerExperts:
    """The streamed experts of one MoE layer: parameters and, for the unpacked layout, sources."""

    layer: int  # 0-based index among the model's streamed layers
    module_path: str  # e.g. "model.layers.3.mlp.switch_mlp"
    num_experts: int
    params: list[ExpertParam]
    sources: list[TensorLocation] = field(default_factory=list)  # stacked tensor per param
    # packed weights: the elements one expert holds in its quantized type (rows x input columns),
    # by param key; what CUDA's gather kernel counts a slot's offset in (engine.model.array_limits)
    quantized_elements: dict[str, int] = field(default_factory=dict)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its parameters)."""
        return sum(p.nbytes for p in self.params)

    @property
    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """Shape signature: layers with equal signatures can share slot pools."""
        return tuple((p.key, p.dtype, p.shape) for p in self.params)

    def source_ranges(self, expert: int) -> list[tuple[Path, int, int]]:
        """Return (file, offset, nbytes) of each parameter of ``expert`` in the stacked tensors."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"layer {self.layer}: expert {expert} out of range 0..{self.num_experts - 1}")
        return [(s.file, s.offset + expert * p.nbytes, p.nbytes) for s, p in zip(self.sources, self.params)]


def layer_experts_from_index(
    layer: int, module_path: str, param_keys: list[str], index: dict[str, TensorLocation]
) -> LayerExperts:
    """Describe a layer's experts from the safetensors index entries of its stacked tensors."""
    params: list[ExpertParam] = []
    sources: list[TensorLocation] = []
    num_experts: int | None = None
    for key in param_keys:
        name = f"{module_path}.{key}"
        loc = index.get(name)
        if loc is None:
            raise UnsupportedModelError(
                f"expert tensor {name!r} is not in the model's safetensors files; "
                "the experts must be stored stacked, as mlx-lm saves them"
            )
        if not loc.shape:
            raise UnsupportedModelError(f"expert tensor {name!r} has no expert axis")
        e = loc.shape[0]
        if num_experts is None:
            num_experts = e
        elif e != num_experts:
            raise UnsupportedModelError(
                f"{loc.file}: tensor {name!r} stacks {e} experts but its siblings stack {num_experts}"
            )
        params.append(ExpertParam(key, loc.dtype, tuple(loc.shape[1:]), loc.nbytes // e))
        sources.append(loc)
    if num_experts is None:
        raise UnsupportedModelError(f"{module_path}: expert module has no parameters")
    return LayerExperts(layer, module_path, num_experts, params, sources)
