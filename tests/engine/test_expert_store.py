"""ExpertStore reads the exact bytes of each expert, from safetensors and from the packed layout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.errors import CorruptModelError, DiskFullError, ExpertReadError
from engine.storage.expert_store import ExpertStore
from engine.model.loader import inspect_experts
from engine.storage.pack import pack_model
from engine.storage.packed_layout import PACKED_DIRNAME, open_packed_layout
from engine.storage.safetensors_index import read_model_index


def _expected_bytes(model_dir: Path, layer, expert: int) -> list[bytes]:
    """The expert's bytes as MLX itself loads them from the stacked tensors."""
    out = []
    for src in layer.sources:
        arr = mx.load(str(src.file))[src.name][expert]
        out.append(np.array(mx.view(arr, mx.uint8)).tobytes())
    return out


def _read(store: ExpertStore, layer, expert: int) -> list[bytes]:
    bufs = [np.zeros(p.nbytes, dtype=np.uint8) for p in layer.params]
    store.read_into(layer.layer, expert, bufs)
    return [b.tobytes() for b in bufs]


@pytest.fixture()
def model_copy(tiny_model, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), dst)
    return dst


def test_unpacked_reads_match_mlx(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    layers = inspect_experts(path).layers
    store = ExpertStore(layers, io_threads=2)
    try:
        for layer in (layers[0], layers[-1]):
            for e in (0, layer.num_experts - 1):
                assert _read(store, layer, e) == _expected_bytes(path, layer, e)
        assert store.layout == "safetensors"
    finally:
        store.close()


@pytest.mark.parametrize("cold", [False, True])
def test_packed_reads_match_unpacked(model_copy: Path, cold: bool) -> None:
    layers = inspect_experts(model_copy).layers
    pack_model(model_copy, io_threads=2)
    packed = open_packed_layout(model_copy, layers)
    assert packed is not None
    plain = ExpertStore(layers)
    store = ExpertStore(layers, packed=packed, cold=cold, verify="always")
    try:
        for layer in layers:
            for e in range(layer.num_experts):
                assert _read(store, layer, e) == _read(plain, layer, e)
        assert store.reads == sum(l.num_experts for l in layers)
    finally:
        store.close()
        plain.close()
    for pl in packed:
        assert pl.stride % 4096 == 0


def test_pack_writes_atomically_and_replaces_old_pack(model_copy: Path) -> None:
    pack_model(model_copy)
    first = (model_copy / PACKED_DIRNAME / "index.json").read_text()
    pack_model(model_copy)
    assert (model_copy / PACKED_DIRNAME / "index.json").read_text() == first
    leftovers = [p.name for p in model_copy.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_flipped_byte_in_packed_expert_is_named(model_copy: Path) -> None:
    layers = inspect_experts(model_copy).layers
    pack_model(model_copy)
    packed = open_packed_layout(model_copy, layers)
    assert packed is not None
    target = packed[1]
    with open(target.file, "r+b") as f:
        f.seek(target.blob_offset(3) + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    store = ExpertStore(layers, packed=packed)
    try:
        with pytest.raises(ExpertReadError, match=r"layer 1 expert 3.*corrupt"):
            _read(store, layers[1], 3)
        _read(store, layers[1], 2)  # the neighbours are fine
    finally:
        store.close()


def test_truncated_packed_layer_file_is_named(model_copy: Path) -> None:
    layers = inspect_experts(model_copy).layers
    pack_model(model_copy)
    victim = model_copy / PACKED_DIRNAME / "layer-0002.experts"
    with open(victim, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptModelError, match="layer-0002.experts"):
        open_packed_layout(model_copy, layers)


def test_stale_pack_is_ignored(model_copy: Path) -> None:
    layers = inspect_experts(model_copy).layers
    pack_model(model_copy)
    index_path = model_copy / PACKED_DIRNAME / "index.json"
    index = json.loads(index_path.read_text())
    index["source"] = {"model.safetensors": [1, 1]}
    index_path.write_text(json.dumps(index))
    assert open_packed_layout(model_copy, layers) is None


def test_short_read_is_an_expert_read_error(model_copy: Path) -> None:
    layers = inspect_experts(model_copy).layers
    store = ExpertStore(layers)
    try:
        # cut the file inside the last expert of the expert tensor stored last
        layer, src = max(((l, s) for l in layers for s in l.sources), key=lambda ls: ls[1].offset)
        with open(src.file, "r+b") as f:
            f.truncate(src.offset + src.nbytes - 64)
        with pytest.raises(ExpertReadError, match="short read"):
            _read(store, layer, layer.num_experts - 1)
    finally:
        store.close()


def test_pack_refuses_when_space_is_short(model_copy: Path, monkeypatch) -> None:
    import engine.storage.pack as pack

    monkeypatch.setattr(pack.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))  # type: ignore[attr-defined]
    with pytest.raises(DiskFullError, match=r"needs .* bytes"):
        pack_model(model_copy)
    assert not (model_copy / PACKED_DIRNAME).exists()


def test_disk_filling_up_mid_pack_leaves_no_partial_store(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """A real small tmpfs; the free-space pre-check is told there is room so the writes hit ENOSPC."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    src = tiny_model("qwen3_moe", 4)
    model_bytes = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    size_kb = model_bytes // 1024 + 300  # the model fits; its packed experts (~1 MiB) do not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        dst = mnt / "model"
        shutil.copytree(src, dst)
        import engine.storage.pack as pack

        monkeypatch.setattr(pack.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))  # type: ignore[attr-defined]
        with pytest.raises(DiskFullError, match=r"disk filled up while packing .* packing needs .* bytes\) of free space"):
            pack_model(dst)
        assert not (dst / PACKED_DIRNAME).exists()
        assert [p.name for p in dst.iterdir() if p.name.startswith(".")] == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_index_reports_truncated_shard(model_copy: Path) -> None:
    shard = model_copy / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CorruptModelError, match="truncated"):
        read_model_index(model_copy)


def test_pack_removes_folders_left_by_a_killed_pack(model_copy: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = model_copy / f".{PACKED_DIRNAME}.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "layer-0000.experts").write_bytes(b"\0" * 1000)
    live = model_copy / f".{PACKED_DIRNAME}.tmp-{os.getpid()}-other"  # not a pid suffix: kept
    live.mkdir()
    pack_model(model_copy)
    assert not stale.exists()
    assert live.exists()
