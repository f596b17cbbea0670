"""Find a model's routed expert banks and its experts-per-token from what mlx-lm's model does.

No list of family names or config keys: the model (built lazily by mlx-lm's own classes, nothing
read) is run once on one token while every module that owns stacked expert linears
(``SwitchLinear``/``QuantizedSwitchLinear`` children: ``SwitchGLU``, ``SwitchMLP`` or a family's
own) records how its MoE block calls it. Only arrays' shapes are built; nothing is evaluated, so
no weight is read. A module called with routing indices (an integer array after the input) that
it hands on to every one of its expert linears is a routed expert bank, and the indices' last
axis is K; a module that owns a ``SwitchLinear`` but is not called that way, or that indexes it
with a table it keeps (a grouped attention projection, for one), stays a dense module.

The config field that sets K is found the same way: every integer field of config.json (nested
dicts included) equal to the trained K is changed alone on a lazily built model, and the fields
that change what the banks receive are the ones an override sets.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from engine.errors import UnsupportedModelError

_EXPERT_LINEARS = (SwitchLinear, QuantizedSwitchLinear)
_INTEGER_DTYPES = (mx.uint8, mx.uint16, mx.uint32, mx.uint64, mx.int8, mx.int16, mx.int32, mx.int64)


@dataclass
class ExpertBank:
    """One routed expert bank: a module the MoE block calls with (input, routing indices)."""

    path: str  # dotted path in the model's module tree
    module: nn.Module
    param_keys: list[str]  # its stacked expert tensors, relative to the module, sorted
    k: int  # routed experts per token it receives (the indices' last axis)


@dataclass
class _Call:
    order: int
    shape: tuple[int, ...]  # the routing indices' shape
    indices: mx.array  # the indices themselves (to tell computed routing from a stored table)


def expert_linear_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module with ``SwitchLinear``/``QuantizedSwitchLinear`` children."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, _EXPERT_LINEARS):
            continue
        if any(isinstance(child, _EXPERT_LINEARS) for child in module.children().values()):
            found.append((path, module))
    return found


def _indices_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> mx.array | None:
    """The routing indices of a bank call: the first integer array after the input."""
    for value in [*args[1:], *kwargs.values()]:
        if isinstance(value, mx.array) and value.dtype in _INTEGER_DTYPES and value.ndim >= 1:
            return value
    return None


@contextlib.contextmanager
def _recording(owners: list[nn.Module]) -> Iterator[dict[int, _Call]]:
    """Patch the owners' classes so each call records its routing indices' K (first call only)."""
    calls: dict[int, _Call] = {}
    wanted = {id(m) for m in owners}
    wanted.update(id(child) for m in owners for child in m.children().values() if isinstance(child, _EXPERT_LINEARS))
    originals: dict[type, Any] = {}
    classes = [type(m) for m in owners] + [SwitchLinear, QuantizedSwitchLinear]
    for cls in classes:
        if cls in originals:
            continue
        originals[cls] = cls.__dict__.get("__call__")
        original_call = cls.__call__

        def recorder(self: nn.Module, *args: Any, _original: Any = original_call, **kwargs: Any) -> Any:
            if id(self) in wanted and id(self) not in calls:
                indices = _indices_of(args, kwargs)
                if indices is not None:
                    calls[id(self)] = _Call(len(calls), tuple(indices.shape), indices)
            return _original(self, *args, **kwargs)

        cls.__call__ = recorder  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original  # type: ignore[method-assign]


def _is_stored(array: mx.array, module: nn.Module) -> bool:
    """Whether ``array`` is one of the arrays ``module`` (or a submodule) keeps as an attribute."""
    for _, sub in module.named_modules():
        if any(value is array for value in sub.values()):
            return True
    return False


def _run_one_token(model: nn.Module) -> None:
    """Build (never evaluate) the graph of one decode step, as mlx-lm's generation calls it."""
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.array([[0]], dtype=mx.uint32)
    try:
        cache = make_prompt_cache(model)
    except Exception:  # a model without its own cache maker and no layers attribute
        cache = None
    model(tokens, cache=cache)


def probe_banks(model: nn.Module, where: str = "model") -> list[ExpertBank]:
    """The routed expert banks of ``model`` in call order, found by running one token's graph.

    Raises UnsupportedModelError naming the module and the reason when an expert format has no
    streamed equivalent or the model cannot be run lazily.
    """
    owners = expert_linear_owners(model)
    if not owners:
        return []
    for path, module in owners:  # before tracing: mlx cannot even build their graph on the CPU
        for name, child in module.children().items():
            if isinstance(child, _EXPERT_LINEARS) and getattr(child, "global_scale", None) is not None:
                raise UnsupportedModelError(
                    f"{where}: {path}.{name}: experts with a global scale (nvfp4) have no streamed equivalent yet"
                )
    with _recording([m for _, m in owners]) as calls:
        try:
            _run_one_token(model)
        except Exception as e:
            raise UnsupportedModelError(
                f"{where}: cannot trace one token through the model to find its expert banks ({type(e).__name__}: {e})"
            ) from e
    banks: list[tuple[int, ExpertBank]] = []
    for path, module in owners:
        call = calls.get(id(module))
        linears = {n: c for n, c in module.children().items() if isinstance(c, _EXPERT_LINEARS)}
        if call is None or not call.shape:
            continue  # owns expert linears but is not called with routing indices: dense
        if any(id(c) not in calls or calls[id(c)].shape != call.shape for c in linears.values()):
            continue  # its expert linears are indexed by something else than its routing input
        if any(_is_stored(calls[id(c)].indices, module) for c in linears.values()):
            continue  # indexed by a table the module keeps (fixed groups), not by routing
        keys: list[str] = []
        for name, child in linears.items():
            flat: list[tuple[str, Any]] = tree_flatten(child.parameters())  # type: ignore[assignment]
            keys.extend(f"{name}.{key}" for key, _ in flat)
        own: list[tuple[str, Any]] = tree_flatten(module.parameters())  # type: ignore[assignment]
        extra = sorted({key for key, _ in own} - set(keys))
        if extra:  # streamed, its expert ids become cache slot ids: these could be indexed wrongly
            raise UnsupportedModelError(
                f"{where}: {path}: the expert bank holds parameters besides its expert linears "
                f"({', '.join(extra)}); streaming it is not supported"
            )
        banks.append((call.order, ExpertBank(path, module, sorted(keys), call.shape[-1])))
    return [bank for _, bank in sorted(banks, key=lambda item: item[0])]


def _int_fields(config: dict[str, Any], value: int, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the integer fields of ``config`` (nested dicts too) equal to ``value``."""
    out: list[tuple[str, ...]] = []
    for key, item in config.items():
        if isinstance(item, bool):
            continue
        if isinstance(item, int) and item == value:
            out.append((*prefix, key))
        elif isinstance(item, dict):
            out.extend(_int_fields(item, value, (*prefix, key)))
    return out


def _with_field(config: dict[str, Any], path: tuple[str, ...], value: int) -> dict[str, Any]:
    out = copy.deepcopy(config)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _build_lazily(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model for ``config`` with its random initial weights (lazy: nothing allocated)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def banks_of_config(config: dict[str, Any]) -> list[ExpertBank]:
    """The expert banks of a model built lazily from ``config`` (no weights)."""
    return probe_banks(_build_lazily(config), f"model_type {config.get('model_type')!r}")


def k_fields(config: dict[str, Any], trained_k: int, try_k: int) -> list[tuple[str, ...]]:
    """The config fields that set experts-per-token: those that, changed alone to ``try_k``, make
    every bank receive ``try_k`` experts (found by building the model lazily, no weights)."""
    found = []
    for path in _int_fields(config, trained_k):
        if path and path[0] == "quantization":
            continue
        try:
            banks = banks_of_config(_with_field(config, path, try_k))
        except Exception:  # a field that breaks the model (a head count equal to K, say)
            continue
        if banks and all(b.k == try_k for b in banks):
            found.append(path)
    return found


def k_override(config: dict[str, Any], fields: list[tuple[str, ...]], k: int) -> dict[str, Any]:
    """Top-level config overrides (for mlx-lm's ``load_model(model_config=...)``) setting K to ``k``."""
    changed = copy.deepcopy(config)
    for path in fields:
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = k
    return {path[0]: changed[path[0]] for path in fields}
