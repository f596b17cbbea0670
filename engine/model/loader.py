"""Open an mlx-lm model directory with its experts streamed: lazy load, swap, evaluate the rest.

The model is built by mlx-lm's own classes (``mlx_lm.utils.load_model(lazy=True)``): nothing
is read yet. Every routed expert bank (a module that owns stacked expert linears and that its
MoE block calls with routing indices; found by ``engine.model.discovery``) is replaced by a
``StreamedSwitch`` before anything is evaluated, so only the dense weights are ever loaded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.model.cpu_parallel import cpu_streams, split_output_projection
from engine.model.discovery import ExpertBank, k_fields, k_override, probe_banks
from engine.model import cuda_memory
from engine.model.array_limits import recommended_working_set_bytes
from engine.model.kernel_shapes import MLX_LM_PREFILL_STEP, mirror_setting
from engine.model.prefill_matmul import install_prefill_matmul
from engine.errors import CorruptModelError, MissingFileError, ModelError, RequestError, TokenizerError, UnsupportedModelError
from engine.storage.expert_layout import ExpertParam, LayerExperts, layer_experts_from_index
from engine.storage.expert_store import ExpertStore, piece_bytes_for
from engine.fast_blas import fast_blas_status
from engine.storage.packed_layout import PackedLayer, open_packed_layout
from engine.storage.rank_folder import RANK_MANIFEST, SHARE_DTYPES, read_rank_share
from engine.model.expert_parallel import ExpertParallel
from engine.storage.safetensors_index import TensorLocation, read_model_index
from engine.model.streamed_moe import ExpertStreamer, StreamedSwitch
from engine.model.memory_budget import MemoryBudget, memory_needs, plan_budget, slot_bytes_per_expert
from engine.model.mlx_memory import apply_mlx_limits
from engine.platform_info import raise_open_files_limit
from engine.types import EngineOptions

log = logging.getLogger("moebar.engine")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

ProgressFn = Callable[[str, float], None]


@dataclass
class StreamedModel:
    """A loaded model whose experts stream from disk, with what is needed to run and report it."""

    model: nn.Module
    config: dict[str, Any]
    tokenizer: Any  # mlx_lm TokenizerWrapper
    layers: list[LayerExperts]
    streamer: ExpertStreamer
    store: ExpertStore
    switches: list[StreamedSwitch]
    dense_bytes: int
    expert_bytes_total: int
    trained_k: int
    k: int
    activation_dtype: str
    budget: MemoryBudget


def read_config(model_dir: Path) -> dict[str, Any]:
    """Read config.json with clear errors for a missing or malformed file."""
    if not model_dir.is_dir():
        raise MissingFileError(f"{model_dir}: model directory not found")
    path = model_dir / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: config.json not found; is this an mlx-lm model directory?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CorruptModelError(f"{path}: field 'model_type' is missing")
    return config


def _resolve_model_class(config: dict[str, Any], model_dir: Path) -> None:
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"{model_dir / 'config.json'}: model_type {config['model_type']!r} is not supported by mlx-lm"
        ) from e


def _found(banks: list[ExpertBank]) -> list[tuple[str, nn.Module, list[str]]]:
    """(path, module, streamed parameter keys) of each bank, in module-path order (the layer
    numbering of packed layouts)."""
    found = [(bank.path, bank.module, bank.param_keys) for bank in banks]
    return sorted(found, key=lambda item: _natural_key(item[0]))


def _natural_key(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _set_by_path(root: nn.Module, path: str, value: nn.Module) -> nn.Module:
    """Replace the module at ``path``; return its parent."""
    parts = path.split(".")
    parent: Any = root
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    setattr(parent, parts[-1], value)
    return parent


def _in_final_block(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` sits in the model's last decoder block (nothing after it
    but norms and the output head), so prefill chunks may skip it."""
    parts = path.split(".")
    node: Any = model
    for i, part in enumerate(parts):
        if isinstance(node, list):
            return int(part) == len(node) - 1
        node = getattr(node, part, None)
        if node is None:
            return False
    return False


def _router_of(parent: nn.Module, num_experts: int) -> Callable[[mx.array], mx.array] | None:
    """The parent block's router: a linear child that maps the hidden state to E scores."""
    for child in parent.children().values():
        if isinstance(child, (nn.Linear, nn.QuantizedLinear)):
            out = child.weight.shape[0]
            if out == num_experts:
                return child
    return None


def _load_tokenizer(model_dir: Path, config: dict[str, Any]) -> Any:
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise TokenizerError(
            f"{model_dir}: no tokenizer files (tokenizer.json and tokenizer_config.json); "
            "copy them from the original model"
        )
    from mlx_lm.utils import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for bad tokenizer files
        raise TokenizerError(f"{model_dir / 'tokenizer.json'}: cannot load the tokenizer ({e})") from e
    if len(tokenizer.encode("hello world", add_special_tokens=False)) == 0:
        raise TokenizerError(f"{model_dir}: the tokenizer is empty (it encodes text to no tokens)")
    return tokenizer


def dense_dtype(model: nn.Module) -> mx.Dtype | None:
    """The dtype of the model's norm weights: its activation dtype where nothing casts it."""
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for key, value in params:
        if key.endswith("norm.weight") and isinstance(value, mx.array):
            return value.dtype
    return None


def slots_widen_half_floats(device: str, model: nn.Module, activation_dtype: str = "auto") -> bool:
    """Whether expert slots hold 16-bit scales/biases as fp32: wherever activations are fp32.

    MLX promotes bf16 scales to the activations' fp32 inside ``gather_qmm`` by converting the
    whole stacked array it is given, on every call; a slot pool stacks the experts of many
    layers, so that conversion cost 0.46 ms per layer on the H200 (warm decode 0.61x mlx-lm)
    and 3.3x on the CPU. Widening once per read is exact and costs nothing per call.
    ``activation_dtype`` (EngineOptions) "float32"/"bfloat16" says what the activations will be.
    """
    if activation_dtype in ("float32", "bfloat16"):
        return activation_dtype == "float32"
    return device == "cpu" or dense_dtype(model) == mx.float32


def slot_float_dtype(device: str, model: nn.Module, activation_dtype: str = "auto") -> str:
    """How expert slots hold float parameters (expert_cache.slot_dtype): "F32" where activations
    are fp32 (see slots_widen_half_floats), "BF16" where bf16 activations were asked for, "" else.

    ``activation_dtype`` "bfloat16" casts the dense weights with ``set_dtype`` as mlx-lm's own
    model is cast for the same run, which turns every float parameter, the experts' fp32 or fp16
    scales and biases included, into bf16; slots hold those as bf16 too, or the streamed experts
    would compute with other scales than mlx-lm's (measured: logprobs 0.3 apart after a
    2,100-token prompt on a model with fp32 scales).
    """
    if slots_widen_half_floats(device, model, activation_dtype):
        return "F32"
    return "BF16" if activation_dtype == "bfloat16" else ""


_ACTIVATION_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def cast_activations(model: nn.Module, device: str, setting: str) -> str:
    """Cast the dense weights for the activation dtype asked for; return the dtype's name.

    "auto": fp32 on the CPU (MLX's CPU kernels are several times faster with fp32 activations
    than bf16/fp16), the model's own dtype on a GPU. "float32" / "bfloat16": that dtype anywhere.
    """
    if setting not in ("auto", *_ACTIVATION_DTYPES):
        raise RequestError(f"activation_dtype must be 'auto', 'float32' or 'bfloat16', got {setting!r}")
    if setting == "auto" and device != "cpu":
        return "model"
    name = "float32" if setting == "auto" else setting
    model.set_dtype(_ACTIVATION_DTYPES[name])
    return name


def use_prefill_matmul(setting: str, device: str = "cpu") -> bool:
    """Whether CPU prefill chunks run as dequantize + GEMM: "on", "off", or "auto" (fast BLAS).

    Only where the model runs on the CPU (``device`` as from ``pick_device``): on a GPU the
    weights are on the device, and its own quantized matmul runs each expert's rows at once.
    """
    _check_prefill_matmul(setting)
    if device != "cpu":
        return False
    return setting == "on" or (setting == "auto" and fast_blas_status()[0])


def expert_runs_prefill(setting: str, device: str) -> bool:
    """Whether a GPU prefill runs each expert's routed rows as one quantized matmul.

    MLX's CUDA ``gather_qmm`` takes every (token, expert) pair as its own one-row product (it does
    not use ``sorted_indices``), reading the expert's weights once per pair; one
    ``quantized_matmul`` per expert run reads them once per run. Metal's sorted ``gather_qmm``
    already groups an expert's rows. "on" turns it on for any GPU; "auto" leaves it off until
    it is measured on one (``bench/gpu/run_397b.sh``: exactness and time against the pair path).
    """
    _check_prefill_matmul(setting)
    return device == "gpu" and setting == "on"


def _check_prefill_matmul(setting: str) -> None:
    if setting not in ("auto", "on", "off"):
        raise RequestError(f"prefill_matmul must be 'auto', 'on' or 'off', got {setting!r}")


def pick_device(requested: str) -> str:
    """Resolve ``auto``/``cpu``/``gpu`` to the device MLX will run on, and make it the default."""
    has_gpu = False
    try:
        has_gpu = bool(mx.metal.is_available())
    except Exception:
        pass
    try:
        has_gpu = has_gpu or bool(mx.cuda.is_available())  # type: ignore[attr-defined]
    except Exception:
        pass
    if requested == "gpu" and not has_gpu:
        raise ModelError("--device gpu: MLX has no GPU on this machine (no Metal or CUDA)")
    device = "gpu" if requested == "gpu" or (requested == "auto" and has_gpu) else "cpu"
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return device


@dataclass
class ModelExperts:
    """A model built lazily (nothing read) with its expert modules found and located on disk."""

    model: nn.Module
    config: dict[str, Any]
    found: list[tuple[str, nn.Module, list[str]]]
    layers: list[LayerExperts]
    dense_bytes_on_disk: int
    trained_k: int
    k: int


def quantized_elements(module: nn.Module, params: list[ExpertParam]) -> dict[str, int]:
    """For each packed weight of a quantized expert module (``gate_proj.weight`` of a module whose
    ``gate_proj`` has ``bits``): the elements one expert holds in its quantized type.

    A packed (uint32) weight whose bits cannot be found is counted at 2 bits, MLX's narrowest: the
    most elements its words can hold, so a limit on them stays a limit.
    """
    out: dict[str, int] = {}
    for p in params:
        owner, _, leaf = p.key.rpartition(".")
        if leaf != "weight" or p.dtype != "U32":
            continue
        sub: Any = module
        for part in owner.split(".") if owner else []:
            sub = getattr(sub, part, None)
        bits = getattr(sub, "bits", None)
        if not (isinstance(bits, int) and bits > 0):
            log.info("%s: no bits found for packed weight %s; counted as 2-bit", type(module).__name__, p.key)
            bits = 2
        out[p.key] = math.prod(p.shape) * 32 // bits
    return out


def inspect_experts(model_dir: Path, experts_per_token: int | None = None) -> ModelExperts:
    """Build the model lazily with mlx-lm's classes and locate every expert tensor on disk.

    The routed expert banks and K come from tracing one token through the model (see
    ``engine.model.discovery``); a K override sets the config fields found to change it, or
    warns and keeps the trained K where none does.
    """
    config = read_config(model_dir)
    _resolve_model_class(config, model_dir)
    index = read_model_index(model_dir)
    if experts_per_token is not None and experts_per_token < 1:
        raise ModelError(f"--experts-per-token must be at least 1, got {experts_per_token}")
    raw_config = config
    share = read_rank_share(model_dir)  # a rank's share: dense tensors here, only its own experts packed
    stand_ins = share.placeholders() if share else None
    model, config = _load_lazily(model_dir, config, index, None, stand_ins)
    banks = probe_banks(model, str(model_dir))
    if not banks:
        raise UnsupportedModelError(
            f"{model_dir}: model_type {config['model_type']!r} has no MoE layers with stacked experts to stream"
        )
    trained_k = max(bank.k for bank in banks)
    k = experts_per_token or trained_k
    if k != trained_k:
        fields = k_fields(raw_config, trained_k, k)
        if fields:
            model, config = _load_lazily(model_dir, raw_config, index, k_override(raw_config, fields, k), stand_ins)
            banks = probe_banks(model, str(model_dir))
        if not fields or any(bank.k != k for bank in banks):
            print(
                f"warning: --experts-per-token {k} ignored: model_type {raw_config['model_type']!r} has no "
                f"config field that changes its experts per token (fixed at {trained_k})",
                file=sys.stderr,
            )
            k = trained_k
    found = _found(banks)
    if share is not None:
        layers = share.layer_experts(found)
    else:
        layers = [layer_experts_from_index(i, path, keys, index) for i, (path, _, keys) in enumerate(found)]
    _check_shapes(found, layers, model_dir)
    for layer, (_, module, _) in zip(layers, found):
        layer.quantized_elements = quantized_elements(module, layer.params)
    expert_names = {s.name for layer in layers for s in layer.sources}
    dense = sum(loc.nbytes for name, loc in index.items() if name not in expert_names)
    return ModelExperts(model, config, found, layers, dense, trained_k, k)


_MX_DTYPES = SHARE_DTYPES  # (the manifest is checked to name only these)


def _with_stand_ins(stand_ins: dict[str, tuple[tuple[int, ...], str]]) -> Callable[[dict[str, Any]], Any]:
    """mlx-lm's classes for a config, the model's ``sanitize`` first adding the stacked expert tensors
    a rank's share lacks as unevaluated zeros of their shape and dtype (never read: the streamed
    layers replace them), so mlx-lm quantizes and checks the model exactly as from the full shards."""
    from mlx_lm.utils import _get_classes

    def classes(config: dict[str, Any]) -> Any:
        model_class, args_class = _get_classes(config)

        def build(args: Any) -> nn.Module:
            model = model_class(args)
            own = getattr(model, "sanitize", None)

            def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
                weights = dict(weights)
                for name, (shape, dtype) in stand_ins.items():
                    if name not in weights:
                        weights[name] = mx.zeros(shape, dtype=getattr(mx, _MX_DTYPES[dtype]))
                return own(weights) if own is not None else weights

            model.sanitize = sanitize
            return model

        return build, args_class

    return classes


def _load_lazily(
    model_dir: Path, config: dict[str, Any], index: dict[str, TensorLocation], overrides: dict[str, Any] | None,
    stand_ins: dict[str, tuple[tuple[int, ...], str]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """mlx-lm's model for ``model_dir`` with its weights attached lazily (nothing read)."""
    from mlx_lm.utils import _get_classes, load_model

    classes = _with_stand_ins(stand_ins) if stand_ins else _get_classes
    try:
        return load_model(model_dir, lazy=True, model_config=overrides, get_model_classes=classes)
    except ValueError as e:
        raise CorruptModelError(_weights_mismatch(model_dir, config, index, e)) from e
    except KeyError as e:
        raise CorruptModelError(f"{model_dir / 'config.json'}: missing field {e}") from e
    except TypeError as e:
        raise CorruptModelError(f"{model_dir / 'config.json'}: bad or missing field ({e})") from e


def _weights_mismatch(
    model_dir: Path, config: dict[str, Any], index: dict[str, TensorLocation], exc: ValueError
) -> str:
    """One line saying how the weights and config.json disagree.

    mlx lists every unexpected or missing tensor on a line of its own (dozens for a wrong
    model_type); keep the first one as an example and name the field or the weight file at fault.
    """
    lines = [line.strip().rstrip(",") for line in str(exc).splitlines() if line.strip()]
    head = lines[0].rstrip(": ") if lines else type(exc).__name__
    example = f" (e.g. {lines[1]})" if len(lines) > 1 else ""
    if "not in model" in head or head.startswith("Missing"):
        return (
            f"{model_dir / 'config.json'}: model_type {config['model_type']!r} does not match the weights: "
            f"{head}{example}; is model_type right?"
        )
    match = re.search(r"for parameter (\S+)", head)
    where = index.get(match.group(1)) if match else None
    in_file = f" in {where.file.name}" if where is not None else ""
    return f"{model_dir}: the weights{in_file} do not match config.json: {head}{example}"


def load_streamed_model(model_dir: Path, options: EngineOptions, progress: ProgressFn | None = None) -> StreamedModel:
    """Load ``model_dir`` with only its dense weights resident and its experts streamed."""
    report = progress or (lambda stage, fraction: None)
    model_dir = Path(model_dir)
    report("reading headers", 0.0)
    config = read_config(model_dir)
    refuse_share_alone(model_dir)
    tokenizer = _load_tokenizer(model_dir, config)
    device = pick_device(options.device)
    report("building model", 0.05)
    inspected = inspect_experts(model_dir, options.experts_per_token)
    model, config, found, layers = inspected.model, inspected.config, inspected.found, inspected.layers
    k, trained_k = inspected.k, inspected.trained_k
    if k < trained_k:
        print(
            f"warning: {k} experts per token is below the model's trained {trained_k}; "
            "answers will be worse (K<=3 often collapses)",
            file=sys.stderr,
        )
    share = read_rank_share(model_dir)
    ranks = share.ranks if share is not None else ExpertParallel.ranks_in_environment()
    budget = memory_budget_for(inspected, options, device, ranks=ranks)
    apply_mlx_limits(budget)
    # the store holds each file open once (twice in cold mode: O_DIRECT), plus the process's own
    raise_open_files_limit(2 * _shard_files(layers) + options.io_threads + 64)
    packed: list[PackedLayer] | None
    if share is not None:  # only this rank's experts are in the folder
        packed = share.packed_layers(layers)
    else:
        packed = open_packed_layout(model_dir, layers) if options.use_packed else None
    store = ExpertStore(layers, io_threads=options.io_threads, cold=options.cold, packed=packed,
                        piece_bytes=piece_bytes_for(options.read_piece_kb, options.cold))
    # the streamer counts its budget in on-disk expert bytes; slots may hold scales in another dtype
    floats = slot_float_dtype(device, model, options.activation_dtype)
    per_slot = max(1, slot_bytes_per_expert(layers[0], floats))
    streamer = ExpertStreamer(
        layers,
        store,
        cache_bytes=budget.cache_bytes * layers[0].expert_bytes // per_slot,
        experts_per_token=k,
        prefetch=options.prefetch,
        policy=options.cache_policy,
        slot_floats=floats,
    )
    streamer.gather_slots = cuda_memory.gather_slots_enabled(options.gather_slots)
    switches: list[StreamedSwitch] = []
    parents: list[nn.Module] = []
    for i, (path, module, keys) in enumerate(found):
        switch = StreamedSwitch(module, i, streamer, keys)
        parents.append(_set_by_path(model, path, switch))
        switches.append(switch)
    for i in range(len(switches) - 1):
        switches[i].set_next_router(_router_of(parents[i + 1], layers[i + 1].num_experts))
    streamer.last_layer_is_final_block = _in_final_block(model, found[-1][0])

    activation_dtype = cast_activations(model, device, options.activation_dtype)
    if device == "cpu":
        if options.cpu_split:
            split_output_projection(model, cpu_streams())
        # the dense-GEMM prefill computes in fp32: only beside fp32 activations
        if activation_dtype == "float32" and use_prefill_matmul(options.prefill_matmul, device):
            streamer.prefill_matmul.enabled = True
            streamer.prefill_matmul.streams = cpu_streams()
            install_prefill_matmul([model, *(s.inner_module for s in switches)], streamer.prefill_matmul)
    if expert_runs_prefill(options.prefill_matmul, device):
        streamer.prefill_matmul.enabled = True
        streamer.prefill_matmul.kind = "quantized"
        install_prefill_matmul([model, *(s.inner_module for s in switches)], streamer.prefill_matmul, experts_only=True)
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    dense_bytes = 0
    for i, (_, arr) in enumerate(params):
        mx.eval(arr)
        dense_bytes += arr.nbytes
        if i % 16 == 0:
            report("loading dense weights", 0.1 + 0.9 * (i + 1) / max(1, len(params)))
    report("ready", 1.0)
    expert_total = sum(l.expert_bytes * l.num_experts for l in layers)
    return StreamedModel(
        model, config, tokenizer, layers, streamer, store, switches, dense_bytes, expert_total, trained_k, k,
        activation_dtype, budget,
    )


def refuse_share_alone(model_dir: Path) -> None:
    """A rank's share loads only as one of its ranks: alone, the other ranks' experts are missing."""
    share = read_rank_share(model_dir)
    if share is not None and ExpertParallel.from_environment() is None:
        raise MissingFileError(share.alone_problem())


def _shard_files(layers: list[LayerExperts]) -> int:
    """Distinct files the expert store may hold open."""
    return len({s.file for layer in layers for s in layer.sources})


def slot_bytes_total(model_dir: Path, options: EngineOptions) -> int:
    """Bytes every expert of ``model_dir`` takes in the slot pools a load with ``options`` makes
    (scales as the slots will hold them: see slot_float_dtype). Picks the device as a load does."""
    inspected = inspect_experts(model_dir)
    floats = slot_float_dtype(pick_device(options.device), inspected.model, options.activation_dtype)
    return _every_expert_slot_bytes(inspected.layers, floats)


def _every_expert_slot_bytes(layers: list[LayerExperts], floats: str, ranks: int = 1) -> int:
    """Slot bytes of every expert (one rank's share of each layer's, of ``ranks``)."""
    return sum(slot_bytes_per_expert(l, floats) * -(-l.num_experts // max(1, ranks)) for l in layers)


def memory_budget_for(inspected: "ModelExperts", options: EngineOptions, device: str, ranks: int = 1) -> MemoryBudget:
    """The memory budget of this load: the expert cache from options and this machine (see memory_budget).

    As one of ``ranks`` ranks the cache holds only this rank's experts (e % ranks == rank), so
    "every expert" is at most a ``1/ranks`` share of each layer's.
    """
    from engine.platform_info import memory_info, process_rss_bytes

    on_cpu = device == "cpu"
    floats = slot_float_dtype(device, inspected.model, options.activation_dtype)
    needs = memory_needs(
        model=inspected.model,
        config=inspected.config,
        expert_paths=[path for path, _, _ in inspected.found],
        layers=inspected.layers,
        k=inspected.k,
        device=device,
        context_tokens=options.context_tokens,
        # with mlx-lm's shapes (a GPU) the prompt goes in mlx-lm's steps of 2,048 tokens at least
        prefill_chunk=max(options.prefill_chunk, MLX_LM_PREFILL_STEP)
        if mirror_setting(options.mlx_lm_shapes, "cpu" if device == "cpu" else "gpu") else options.prefill_chunk,
        prefetch=options.prefetch,
        slot_floats=floats,
        cpu_prefill_gemm=use_prefill_matmul(options.prefill_matmul, device) and options.activation_dtype != "bfloat16",
        dense_fp32=options.activation_dtype == "float32" or (on_cpu and options.activation_dtype == "auto"),
        runtime_bytes=process_rss_bytes(),
    )
    ram = memory_info()
    return plan_budget(
        needs=needs,
        # what every expert takes in the slot pools (scales as the slots hold them)
        expert_bytes_total=_every_expert_slot_bytes(inspected.layers, floats, ranks),
        ram_total=ram.total_bytes,
        ram_available=ram.available_bytes,
        cache_mb=options.cache_mb,
        memory_limit_mb=options.memory_limit_mb,
        gpu_working_set_bytes=recommended_working_set_bytes() if device != "cpu" else None,
    )


def _check_shapes(found: list[tuple[str, nn.Module, list[str]]], layers: list[LayerExperts], model_dir: Path) -> None:
    """The module built from config.json must match the expert tensors on disk (or a share's manifest)."""
    for (path, module, keys), layer in zip(found, layers):
        declared = dict(tree_flatten(module.parameters()))
        for key, param in zip(keys, layer.params):
            want = tuple(declared[key].shape)
            got = (layer.num_experts, *param.shape)
            if want != got:
                i = layer.params.index(param)
                src = layer.sources[i].file if layer.sources else model_dir / RANK_MANIFEST
                raise CorruptModelError(
                    f"{src}: tensor '{path}.{key}' has shape {list(got)} but config.json implies {list(want)}"
                )
