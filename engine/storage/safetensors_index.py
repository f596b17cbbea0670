"""Read safetensors headers: where each tensor's bytes lie in which file, without loading data."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CorruptModelError, MissingFileError

# Byte width of each safetensors dtype string.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

# safetensors dtype string -> numpy dtype name used for buffer views (bf16 is viewed as uint16).
NUMPY_VIEW_DTYPE = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "F16": "float16", "BF16": "uint16", "U32": "uint32", "I32": "int32", "F32": "float32",
    "U64": "uint64", "I64": "int64", "F64": "float64",
}  # fmt: skip

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorLocation:
    """One tensor's place on disk: the file, absolute byte offset and length, dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorLocation]:
    """Parse one safetensors file's header and check that the file holds every tensor's bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CorruptModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CorruptModelError(
                    f"{path}: truncated or corrupt safetensors header "
                    f"(header says {header_len} bytes, file has {size})"
                )
            header_bytes = f.read(header_len)
    except FileNotFoundError as e:
        raise MissingFileError(f"{path}: weight file not found") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptModelError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    out: dict[str, TensorLocation] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptModelError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPE_BYTES:
            raise CorruptModelError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        expected = DTYPE_BYTES[dtype]
        for s in shape:
            expected *= s
        if end - begin != expected or begin < 0:
            raise CorruptModelError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but dtype {dtype} "
                f"and shape {list(shape)} need {expected}"
            )
        if data_start + end > size:
            raise CorruptModelError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        out[name] = TensorLocation(name, Path(path), data_start + begin, end - begin, dtype, shape)
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """List the model's safetensors shards, checking that every shard the index names exists."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptModelError(f"{index_path}: not a valid safetensors index ({e})") from e
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise MissingFileError(
                f"{model_dir / missing[0]}: shard listed in model.safetensors.index.json is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise MissingFileError(f"{model_dir}: no model*.safetensors weight files")
    return files


def read_model_index(model_dir: Path) -> dict[str, TensorLocation]:
    """Return the location of every tensor across the model's shards."""
    out: dict[str, TensorLocation] = {}
    for path in weight_files(model_dir):
        out.update(read_header(path))
    return out
