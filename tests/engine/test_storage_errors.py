"""Error paths of engine/storage: a packed index that does not fit the model, expert tensors that
cannot be streamed, reads the OS cuts short or fails, and the cold-read fallbacks.

Every refusal names the file (or tensor) and what is wrong; a read the OS returns in pieces still
gives the exact bytes; a failed read names the layer, the expert and the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

from engine.errors import CorruptModelError, ExpertReadError, UnsupportedModelError
from engine.model.loader import inspect_experts
from engine.storage import expert_store
from engine.storage.expert_layout import LayerExperts, layer_experts_from_index
from engine.storage.expert_store import ExpertStore
from engine.storage.packed_layout import PACKED_DIRNAME, PackedLayer, open_packed_layout
from engine.storage.safetensors_index import TensorLocation


@pytest.fixture
def model(packed_model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(packed_model, dst)
    return dst


def _edit_index(model: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = model / PACKED_DIRNAME / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return path


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda index: index.__setitem__(key, value)


def _layer0(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda index: index["layers"][0].__setitem__(field, value)


BAD_INDEX = {
    "other-version": (_set("version", 99), "index.json: packed format version 99, expected"),
    "no-layers": (lambda index: index.pop("layers"), "index.json: not a valid packed index ('layers')"),
    "layer-count": (lambda index: index["layers"].pop(), "index.json: lists 3 layers, the model has 4"),
    "module-path": (_layer0("module_path", "model.layers.0.mlp.other"), "index.json: layer 0 (model.layers.0.mlp.switch_mlp) does not match the model's expert shapes"),
    "param-shape": (lambda index: index["layers"][0]["params"][0].__setitem__("shape", [1]), "layer 0 (model.layers.0.mlp.switch_mlp) does not match"),
    "checksum-count": (_layer0("checksums", [0, 1]), "index.json: layer 0 has 2 checksums"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INDEX, ids=list(BAD_INDEX))
def test_packed_index_that_does_not_fit_the_model_is_refused(model: Path, case: str) -> None:
    edit, message = BAD_INDEX[case]
    layers = inspect_experts(model).layers
    _edit_index(model, edit)
    with pytest.raises(CorruptModelError) as refused:
        open_packed_layout(model, layers)
    assert str(refused.value).startswith(str(model / PACKED_DIRNAME)) and message in str(refused.value)


def test_packed_index_that_is_not_json_or_misses_a_layer_file(model: Path) -> None:
    layers = inspect_experts(model).layers
    index = model / PACKED_DIRNAME / "index.json"
    good = index.read_text()
    index.write_text(good[:-20])
    with pytest.raises(CorruptModelError, match=f"{index}: not a valid packed index"):
        open_packed_layout(model, layers)
    index.write_text(good)
    (model / PACKED_DIRNAME / "layer-0001.experts").unlink()
    with pytest.raises(CorruptModelError, match=r"layer-0001.experts: packed layer file missing; run `moebar-engine pack` again"):
        open_packed_layout(model, layers)


def test_an_expert_outside_a_ranks_share_is_named() -> None:
    share = PackedLayer(Path("/models/m/moebar-packed/layer-0000.experts"), 4096, 100, (1, 2), rank=1, ranks=2)
    assert share.holds(3) and not share.holds(2)
    assert share.blob_offset(3) == 4096
    with pytest.raises(ExpertReadError, match=r"layer-0000.experts: expert 2 is not in this rank's share \(it holds the experts e with e % 2 == 1\)"):
        share.blob_offset(2)


def _loc(name: str, shape: tuple[int, ...], dtype: str = "U32") -> TensorLocation:
    return TensorLocation(name, Path("/m/model.safetensors"), 64, 4 * int(np.prod(shape)), dtype, shape)


def test_expert_tensors_that_cannot_be_streamed_are_refused_by_name() -> None:
    path = "model.layers.0.mlp.switch_mlp"
    keys = ["gate_proj.weight", "up_proj.weight"]
    index = {f"{path}.gate_proj.weight": _loc(f"{path}.gate_proj.weight", (8, 4, 2))}
    with pytest.raises(UnsupportedModelError, match=r"expert tensor 'model.layers.0.mlp.switch_mlp.up_proj.weight' is not in the model's safetensors files"):
        layer_experts_from_index(0, path, keys, index)
    index[f"{path}.up_proj.weight"] = _loc(f"{path}.up_proj.weight", ())
    with pytest.raises(UnsupportedModelError, match=r"'model.layers.0.mlp.switch_mlp.up_proj.weight' has no expert axis"):
        layer_experts_from_index(0, path, keys, index)
    index[f"{path}.up_proj.weight"] = _loc(f"{path}.up_proj.weight", (6, 4, 2))
    with pytest.raises(UnsupportedModelError, match=r"/m/model.safetensors: tensor '.*up_proj.weight' stacks 6 experts but its siblings stack 8"):
        layer_experts_from_index(0, path, keys, index)
    with pytest.raises(UnsupportedModelError, match=f"{path}: expert module has no parameters"):
        layer_experts_from_index(0, path, [], index)
    index[f"{path}.up_proj.weight"] = _loc(f"{path}.up_proj.weight", (8, 4, 2))
    layer = layer_experts_from_index(0, path, keys, index)
    with pytest.raises(IndexError, match=r"layer 0: expert 8 out of range 0..7"):
        layer.source_ranges(8)


def _read(store: ExpertStore, layer: LayerExperts, expert: int) -> list[bytes]:
    bufs = [np.zeros(p.nbytes, dtype=np.uint8) for p in layer.params]
    store.read_into(layer.layer, expert, bufs)
    return [b.tobytes() for b in bufs]


def test_a_verify_mode_that_does_not_exist_is_refused(tiny_model) -> None:
    layers = inspect_experts(tiny_model("qwen3_moe", 4)).layers
    with pytest.raises(ValueError, match="verify must be 'first', 'always' or 'never', not 'sometimes'"):
        ExpertStore(layers, verify="sometimes")


@pytest.mark.parametrize("packed", [False, True], ids=["safetensors", "packed"])
def test_reads_the_os_returns_in_pieces_are_completed_exactly(model: Path, monkeypatch: pytest.MonkeyPatch, packed: bool) -> None:
    layers = inspect_experts(model).layers
    layout = open_packed_layout(model, layers) if packed else None
    plain = ExpertStore(layers)
    expected = {(l.layer, e): _read(plain, l, e) for l in layers[:2] for e in (0, 5)}
    plain.close()
    real = os.preadv
    calls = []

    def piecewise(fd: int, buffers: list[memoryview], offset: int) -> int:
        """At most 100 bytes a call, as a read interrupted by a signal may return."""
        calls.append(len(buffers))
        first = buffers[0][:100]
        return real(fd, [first], offset)

    monkeypatch.setattr(expert_store.os, "preadv", piecewise)
    store = ExpertStore(layers, packed=layout)
    try:
        for (layer, e), want in expected.items():
            assert _read(store, layers[layer], e) == want
    finally:
        store.close()
    reads = len(expected) * (1 if packed else len(layers[0].params))  # preadv calls of whole reads
    assert len(calls) > reads  # the reads did come back in pieces
    if packed:  # one call for all of an expert's buffers, then calls that skip the filled ones
        assert max(calls) == len(layers[0].params) and min(calls) < max(calls)


def test_a_failed_read_names_the_layer_the_expert_and_the_file(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = inspect_experts(model).layers

    def eio(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    for layout in (None, open_packed_layout(model, layers)):
        store = ExpertStore(layers, packed=layout)
        monkeypatch.setattr(expert_store.os, "preadv", eio)
        try:
            with pytest.raises(ExpertReadError) as failed:
                _read(store, layers[2], 7)
        finally:
            monkeypatch.undo()
            store.close()
        file = layout[2].file if layout else layers[2].sources[0].file
        message = str(failed.value)
        assert message.startswith("layer 2 expert 7: read failed") and str(file) in message and "Input/output error" in message


def test_cold_packed_reads_fall_back_where_o_direct_is_refused(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS")  # (macOS: F_NOCACHE instead, tested below)
    layers = inspect_experts(model).layers
    layout = open_packed_layout(model, layers)
    plain = ExpertStore(layers)
    want = _read(plain, layers[3], 9)
    plain.close()
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported by this filesystem", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(expert_store.os, "open", no_direct)
    store = ExpertStore(layers, packed=layout, cold=True)
    try:
        assert store._use_direct is False and store._direct_fds == {}
        assert _read(store, layers[3], 9) == want
    finally:
        store.close()


def test_cold_reads_on_macos_stop_caching_and_drop_cached_pages(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = inspect_experts(model).layers
    nocache: list[int] = []
    dropped: list[tuple[int, ...]] = []
    monkeypatch.setattr(expert_store, "sys", SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(expert_store, "set_macos_nocache", lambda fd: nocache.append(fd))
    monkeypatch.setattr(expert_store, "drop_file_cache", lambda fd, *a: dropped.append((fd, *a)))
    store = ExpertStore(layers, cold=True)
    try:
        fds = sorted(store._fds.values())
        assert sorted(nocache) == fds  # F_NOCACHE on every file, then its cached pages dropped
        assert sorted(d[0] for d in dropped) == fds
        dropped.clear()
        _read(store, layers[0], 1)
        assert [d[1:] for d in dropped] == [(off, n) for _, off, n in layers[0].source_ranges(1)]
    finally:
        store.close()


def test_closing_never_fails_on_a_file_already_closed(tiny_model) -> None:
    layers = inspect_experts(tiny_model("qwen3_moe", 4)).layers
    store = ExpertStore(layers)
    os.close(next(iter(store._fds.values())))
    store.close()  # does not raise
    assert store._fds == {}


def test_verify_never_skips_the_checksum_and_first_checks_each_expert_once(model: Path) -> None:
    layers = inspect_experts(model).layers
    layout = open_packed_layout(model, layers)
    assert layout is not None
    target = layout[0]
    with open(target.file, "r+b") as f:  # corrupt expert 4 of layer 0
        f.seek(target.blob_offset(4) + 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    unchecked = ExpertStore(layers, packed=layout, verify="never")
    checked = ExpertStore(layers, packed=layout, verify="first")
    try:
        assert store_bytes(unchecked, layers[0], 4) != store_bytes(ExpertStore(layers), layers[0], 4)
        with pytest.raises(ExpertReadError, match="checksum mismatch for layer 0 expert 4"):
            _read(checked, layers[0], 4)
        assert checked.holds(0, 4) and unchecked.layout == "packed"
    finally:
        unchecked.close()
        checked.close()


def store_bytes(store: ExpertStore, layer: LayerExperts, expert: int) -> list[bytes]:
    try:
        return _read(store, layer, expert)
    finally:
        if store.packed is None:
            store.close()


def test_drop_page_cache_evicts_every_file_of_the_store(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = inspect_experts(model).layers
    store = ExpertStore(layers, packed=open_packed_layout(model, layers))
    dropped: list[int] = []
    monkeypatch.setattr(expert_store, "drop_file_cache", lambda fd, *a: dropped.append(fd))
    try:
        store.drop_page_cache()
        assert sorted(dropped) == sorted(store._fds.values()) and len(dropped) == len(layers)
    finally:
        store.close()
