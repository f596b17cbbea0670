"""The packed expert layout: one contiguous, page-aligned blob per expert, one file per layer.

Directory ``<model>/moebar-packed/`` holds ``index.json`` and ``layer-NNNN.experts`` files.
Expert ``e`` of a layer starts at ``e * stride`` in its layer file; its parameters lie back to
back (in the order of ``params``) so one ``preadv`` fills every slot buffer; the blob is padded
to ``ALIGNMENT`` so ``O_DIRECT`` reads work. ``checksums[e]`` is the CRC-32 of the payload.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CorruptModelError, ExpertReadError
from engine.storage.expert_layout import LayerExperts

PACKED_DIRNAME = "moebar-packed"
PACKED_FORMAT_VERSION = 1
ALIGNMENT = 16384  # covers 4 KiB (x86) and 16 KiB (Apple Silicon) pages


def aligned(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class PackedLayer:
    """One packed layer file: where expert blobs start and their checksums."""

    file: Path
    stride: int
    payload_bytes: int
    checksums: tuple[int, ...]  # one per expert in the file, in file order
    rank: int = 0  # a rank's share (rank_folder) holds only the experts e with e % ranks == rank
    ranks: int = 1

    def holds(self, expert: int) -> bool:
        """Whether ``expert`` is in this file."""
        return expert % self.ranks == self.rank

    def blob_offset(self, expert: int) -> int:
        """Byte offset of ``expert``'s blob in the layer file."""
        if not self.holds(expert):
            raise ExpertReadError(
                f"{self.file}: expert {expert} is not in this rank's share (it holds the experts e with "
                f"e % {self.ranks} == {self.rank})"
            )
        return expert // self.ranks * self.stride

    def checksum(self, expert: int) -> int:
        """CRC-32 of ``expert``'s payload."""
        return self.checksums[expert // self.ranks]


def source_fingerprint(layers: list[LayerExperts]) -> dict[str, Any]:
    """Identify the unpacked source files (name, size, mtime) so a stale pack is detected."""
    files = sorted({s.file for layer in layers for s in layer.sources})
    out = {}
    for f in files:
        st = os.stat(f)
        out[f.name] = [st.st_size, int(st.st_mtime)]
    return out


def layer_entry(layer: LayerExperts, file_name: str, checksums: list[int]) -> dict[str, Any]:
    """The index.json entry describing one packed layer."""
    return {
        "module_path": layer.module_path,
        "file": file_name,
        "num_experts": layer.num_experts,
        "stride": aligned(layer.expert_bytes),
        "params": [{"key": p.key, "dtype": p.dtype, "shape": list(p.shape), "nbytes": p.nbytes} for p in layer.params],
        "checksums": checksums,
    }


def open_packed_layout(model_dir: Path, layers: list[LayerExperts]) -> list[PackedLayer] | None:
    """Return the packed layers when a complete pack matching this model exists, else None.

    A pack whose source files changed since packing is ignored (the unpacked tensors are read).
    A pack that is present but inconsistent (bad JSON, missing or short layer file) is an error.
    """
    pack_dir = model_dir / PACKED_DIRNAME
    index_path = pack_dir / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") != PACKED_FORMAT_VERSION:
            raise CorruptModelError(
                f"{index_path}: packed format version {index.get('version')!r}, expected "
                f"{PACKED_FORMAT_VERSION}; delete {pack_dir} and run `moebar-engine pack` again"
            )
        if index.get("source") != source_fingerprint(layers):
            return None
        entries = index["layers"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CorruptModelError(f"{index_path}: not a valid packed index ({e})") from e
    if len(entries) != len(layers):
        raise CorruptModelError(f"{index_path}: lists {len(entries)} layers, the model has {len(layers)}")
    out: list[PackedLayer] = []
    for layer, entry in zip(layers, entries):
        params = [(p["key"], p["dtype"], tuple(p["shape"]), p["nbytes"]) for p in entry["params"]]
        want = [(p.key, p.dtype, p.shape, p.nbytes) for p in layer.params]
        if entry["module_path"] != layer.module_path or params != want:
            raise CorruptModelError(
                f"{index_path}: layer {layer.layer} ({layer.module_path}) does not match the model's "
                f"expert shapes; delete {pack_dir} and pack again"
            )
        path = pack_dir / entry["file"]
        stride = int(entry["stride"])
        checksums = tuple(int(c) for c in entry["checksums"])
        if len(checksums) != layer.num_experts:
            raise CorruptModelError(f"{index_path}: layer {layer.layer} has {len(checksums)} checksums")
        need = stride * layer.num_experts
        size = path.stat().st_size if path.is_file() else -1
        if size < need:
            what = "missing" if size < 0 else f"truncated ({size} of {need} bytes)"
            raise CorruptModelError(f"{path}: packed layer file {what}; run `moebar-engine pack` again")
        out.append(PackedLayer(path, stride, layer.expert_bytes, checksums))
    return out
