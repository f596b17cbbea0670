"""Corrupt safetensors headers and indexes: each refused with an error naming the file and the fault."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from engine.errors import CorruptModelError, MissingFileError
from engine.storage.safetensors_index import read_header, read_model_index, weight_files

GOOD = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {"format": "mlx"}}


def write(path: Path, header: Any, data: bytes = bytes(24), *, raw: bytes | None = None,
          declared_len: int | None = None) -> Path:  # fmt: skip
    """A safetensors file: 8-byte little-endian header length, the header, then the data."""
    body = raw if raw is not None else json.dumps(header).encode()
    n = len(body) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_a_good_header_gives_absolute_offsets(tmp_path: Path) -> None:
    path = write(tmp_path / "model.safetensors", GOOD)
    (loc,) = read_header(path).values()
    header_len = len(json.dumps(GOOD).encode())
    assert (loc.name, loc.offset, loc.nbytes, loc.dtype, loc.shape) == ("a", 8 + header_len, 24, "F32", (2, 3))


CORRUPT = {
    "no-length": (lambda p: p.write_bytes(b"\x01\x02"), "truncated safetensors file (2 bytes, no header)"),
    "length-past-the-file": (lambda p: write(p, GOOD, declared_len=10_000), "header says 10000 bytes, file has"),
    "length-absurd": (lambda p: write(p, GOOD, declared_len=2**63), "truncated or corrupt safetensors header"),
    "not-json": (lambda p: write(p, None, raw=b"{not json"), "safetensors header is not valid JSON"),
    "not-utf8": (lambda p: write(p, None, raw=b"\xff\xfe{}"), "safetensors header is not valid JSON"),
    "not-an-object": (lambda p: write(p, [1, 2]), "safetensors header is not a JSON object"),
    "entry-without-dtype": (lambda p: write(p, {"a": {"shape": [6], "data_offsets": [0, 24]}}),
                            "tensor 'a' has a malformed header entry"),
    "entry-not-an-object": (lambda p: write(p, {"a": 7}), "tensor 'a' has a malformed header entry"),
    "shape-not-numbers": (lambda p: write(p, {"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 24]}}),
                          "tensor 'a' has a malformed header entry"),
    "offsets-not-a-pair": (lambda p: write(p, {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0]}}),
                           "tensor 'a' has a malformed header entry"),
    "unknown-dtype": (lambda p: write(p, {"a": {"dtype": "F4", "shape": [6], "data_offsets": [0, 24]}}),
                      "tensor 'a' has unknown dtype 'F4'"),
    "span-disagrees-with-shape": (lambda p: write(p, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}),
                                  "tensor 'a' spans 20 bytes but dtype F32 and shape [2, 3] need 24"),
    "negative-offset": (lambda p: write(p, {"a": {"dtype": "U8", "shape": [0], "data_offsets": [-4, -4]}}),
                        "tensor 'a' spans 0 bytes"),
    "data-past-the-end": (lambda p: write(p, {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, bytes(10)),
                          "truncated: tensor 'a' ends at byte"),
}  # fmt: skip


@pytest.mark.parametrize("case", CORRUPT, ids=list(CORRUPT))
def test_corrupt_header_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    make, message = CORRUPT[case]
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(CorruptModelError) as refused:
        read_header(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_missing_weight_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="weight file not found"):
        read_header(tmp_path / "model.safetensors")


def test_index_naming_missing_shards_and_bad_indexes(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    write(tmp_path / "model-00001-of-00003.safetensors", GOOD)
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00003.safetensors",
                                                "b": "model-00002-of-00003.safetensors",
                                                "c": "model-00003-of-00003.safetensors"}}))  # fmt: skip
    with pytest.raises(MissingFileError) as missing:
        weight_files(tmp_path)
    assert "model-00002-of-00003.safetensors: shard listed" in str(missing.value) and "(and 1 more)" in str(missing.value)
    for bad in ("{", "[]", '{"weight_map": 3}', '{"other": {}}'):
        index.write_text(bad)
        with pytest.raises(CorruptModelError, match="not a valid safetensors index"):
            weight_files(tmp_path)


def test_without_an_index_the_shards_are_found_by_name(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="no model\\*.safetensors weight files"):
        weight_files(tmp_path)
    write(tmp_path / "model-b.safetensors", {"b": GOOD["a"]})
    write(tmp_path / "model-a.safetensors", GOOD)
    assert [p.name for p in weight_files(tmp_path)] == ["model-a.safetensors", "model-b.safetensors"]
    assert sorted(read_model_index(tmp_path)) == ["a", "b"]
