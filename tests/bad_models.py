"""Damaged copies of a tiny model, one per kind of damage, shared by the protocol and app tests.

Each `BadModel` damages a fresh copy of a good model and returns the pieces of text the error
must contain (the file or field at fault). `at` says when the damage shows: at `load`, or only
when a chat reads the damaged experts (`chat`: the packed layout's checksums).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class BadModel:
    """One kind of damage, the error code it must give and when it shows."""

    id: str
    damage: Callable[[Path], tuple[str, ...]]  # damages the copy, returns the texts the message must hold
    code: str
    at: Literal["load", "chat"] = "load"


def copy_model(src: Path, dst: Path) -> Path:
    """A private copy of a (shared, read-only) model directory."""
    shutil.copytree(src, dst)
    return dst


def _shards(model: Path) -> list[Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "the model must be sharded"
    return [model / s for s in shards]


def _edit_config(model: Path, **changes: object) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def truncate_shard(model: Path) -> tuple[str, ...]:
    """Cut the end off the first weight file."""
    shard = _shards(model)[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return (shard.name, "truncated")


def delete_listed_shard(model: Path) -> tuple[str, ...]:
    """Remove a weight file that model.safetensors.index.json lists."""
    shard = _shards(model)[-1]
    shard.unlink()
    return (shard.name, "model.safetensors.index.json", "missing")


def flip_packed_expert_bytes(model: Path) -> tuple[str, ...]:
    """Pack the experts, then flip one byte inside every expert blob of layer 0."""
    from engine.model.loader import inspect_experts
    from engine.storage.pack import pack_model
    from engine.storage.packed_layout import open_packed_layout

    pack_model(model)
    layers = inspect_experts(model).layers
    packed = open_packed_layout(model, layers)
    assert packed is not None
    with open(packed[0].file, "r+b") as f:
        for expert in range(layers[0].num_experts):
            f.seek(packed[0].blob_offset(expert) + 7)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x55]))
    return (packed[0].file.name, "checksum mismatch", "layer 0 expert")


def dense_model_type(model: Path) -> tuple[str, ...]:
    """Claim the MoE weights belong to a dense model family (qwen3): a wrong but known model_type."""
    _edit_config(model, model_type="qwen3")
    return ("config.json", "model_type", "qwen3")


def unknown_model_type(model: Path) -> tuple[str, ...]:
    """A model_type mlx-lm has never heard of."""
    _edit_config(model, model_type="not_a_real_arch")
    return ("config.json", "not_a_real_arch")


def config_disagrees_with_shapes(model: Path) -> tuple[str, ...]:
    """config.json says the experts are twice as wide as the tensors on disk."""
    config = json.loads((model / "config.json").read_text())
    _edit_config(model, moe_intermediate_size=config["moe_intermediate_size"] * 2)
    return ("config.json", "switch_mlp")


def config_not_json(model: Path) -> tuple[str, ...]:
    """config.json cut in the middle."""
    path = model / "config.json"
    path.write_text(path.read_text()[:40])
    return ("config.json", "not valid JSON")


def empty_tokenizer(model: Path) -> tuple[str, ...]:
    """tokenizer.json present and well-formed, but its vocabulary and merges are empty."""
    path = model / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"] = {}
    tokenizer["model"]["merges"] = []
    path.write_text(json.dumps(tokenizer))
    return ("tokenizer", "empty")


def no_tokenizer_files(model: Path) -> tuple[str, ...]:
    """The tokenizer files are gone."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return ("no tokenizer files",)


BAD_MODELS = [
    BadModel("truncated-shard", truncate_shard, "corrupt_model"),
    BadModel("missing-listed-shard", delete_listed_shard, "missing_file"),
    BadModel("flipped-packed-expert-bytes", flip_packed_expert_bytes, "expert_read_error", at="chat"),
    BadModel("wrong-model-type", dense_model_type, "corrupt_model"),
    BadModel("unknown-model-type", unknown_model_type, "unsupported_model"),
    BadModel("config-disagrees-with-shapes", config_disagrees_with_shapes, "corrupt_model"),
    BadModel("config-not-json", config_not_json, "corrupt_model"),
    BadModel("empty-tokenizer", empty_tokenizer, "tokenizer_error"),
    BadModel("no-tokenizer-files", no_tokenizer_files, "tokenizer_error"),
]
