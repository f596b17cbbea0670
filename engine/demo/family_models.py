"""Tiny random-weight models of any MoE family of the installed mlx-lm, on disk in its format.

Each is built from ``family_configs.tiny_config`` by mlx-lm's own classes, cast to float32,
quantized by ``mlx_lm.utils.quantize_model`` (affine at any bit width mlx supports, mixed
per-module bits written as per-module ``quantization`` overrides, or ``mxfp4``), and written with
the demo model's safetensors writer and the offline qwen3 tokenizer. Weights are random: the
models exist to check that streamed generation equals mlx-lm's, family by family.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.demo.demo_model import TensorSource, write_sharded_safetensors
from engine.demo.family_configs import tiny_config
from engine.demo.tokenizer_builder import install_tokenizer, tokenizer_spec
from engine.errors import ModelError

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")


def _mixed_bits(bits: int) -> Any:
    """A quantization predicate mixing bit widths as mlx-lm's mixed recipes do: dense layers at 6
    bits, expert projections at ``bits`` except the down projections of odd-numbered layers (8
    bits), so one bank holds projections of two widths."""
    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        if "switch" not in type(module).__name__.lower():
            return {"group_size": 64, "bits": 6, "mode": "affine"}
        name = path.rsplit(".", 1)[-1]
        layer = re.search(r"\.(\d+)\.", path)  # the layer number in the module path
        wide = layer is not None and int(layer.group(1)) % 2 == 1 and name in ("down_proj", "fc2")
        return {"group_size": 64, "bits": 8 if wide else bits, "mode": "affine"}

    return predicate


def _draw_constant_matrices(model: nn.Module) -> int:
    """Give random values to matrices a family initialises as a constant (routers often start
    at zero, which would route every token to the same experts); return how many."""
    from mlx.utils import tree_unflatten

    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    drawn = []
    for name, value in params:
        if value.ndim < 2 or not mx.issubdtype(value.dtype, mx.floating):
            continue
        if bool(mx.all(value == value.reshape(-1)[0]).item()):
            bound = value.shape[-1] ** -0.5
            drawn.append((name, mx.random.uniform(-bound, bound, value.shape, dtype=value.dtype)))
    if drawn:
        model.update(tree_unflatten(drawn))
    return len(drawn)


def build_family_model(
    out_dir: str | Path,
    family: str,
    *,
    bits: int = 4,
    mode: str = "affine",
    mixed: bool = False,
    global_scale: bool = False,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random ``family`` model quantized as asked to ``out_dir``; return it.

    ``mixed`` mixes bit widths per module (see ``_mixed_bits``; per-module overrides in
    config.json's ``quantization``). The floating-point modes (``mxfp4``, ``mxfp8``,
    ``nvfp4``) use mlx's own group size and bits; ``global_scale`` gives nvfp4 expert banks one
    tensor scale per expert (a format that cannot stream yet: the loader refuses it).
    """
    if mode not in MODES:
        raise ModelError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "affine" and bits not in AFFINE_BITS:
        raise ModelError(f"bits must be one of {AFFINE_BITS} for affine quantization, got {bits}")
    from mlx_lm.utils import _get_classes, quantize_model, save_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family)
    config.update(config_overrides or {})
    fixed = config.get("quantization")  # a family whose format fixes its quantization (a pack)
    if fixed is not None:
        mode, bits, mixed = fixed["mode"], fixed["bits"], False
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))
    model.set_dtype(mx.float32)
    _draw_constant_matrices(model)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
        if mode != "affine":
            model, qconfig = quantize_model(model, config, None, None, mode=mode, global_scale=global_scale)
        else:
            predicate = _mixed_bits(bits) if mixed else None
            group = fixed["group_size"] if fixed is not None else 64
            model, qconfig = quantize_model(model, config, group_size=group, bits=bits, quant_predicate=predicate)
    if fixed is not None:  # uniform, as the family requires (no per-module entries)
        qconfig["quantization"] = qconfig["quantization_config"] = dict(fixed)
    arrays: dict[str, TensorSource] = dict(tree_flatten(model.parameters()))  # type: ignore[arg-type]
    del model
    write_sharded_safetensors(out, arrays)
    spec = tokenizer_spec("qwen3")
    qconfig["eos_token_id"] = spec.eos_token_ids
    qconfig["moebar_demo"] = {
        "random_weights": True,
        "family": family,
        "seed": seed,
        "note": "Random weights: this model was not trained and produces gibberish.",
    }
    save_config(qconfig, out / "config.json")
    install_tokenizer(out, "qwen3")
    return out
