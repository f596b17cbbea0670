"""Packing onto a full disk, on a real small tmpfs: no partial store is ever used, and the error
says how much space packing needs and how much is free.

Nothing is faked: the tmpfs is too small from the start (the CLI refuses before writing), or
another writer fills it while the pack is under way (the writes hit ENOSPC, the partial pack is
removed, the model keeps reading its safetensors files, and a later pack with room succeeds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import DiskFullError
from engine.model.loader import inspect_experts
from engine.storage.pack import INDEX_RESERVE_BYTES, pack_model, packed_size
from engine.storage.packed_layout import PACKED_DIRNAME, open_packed_layout

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (the tiny model is about 12 MiB), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave: int) -> int:
    """Write a file at `path` that leaves `leave` bytes free on its file system; return its size."""
    size = shutil.disk_usage(path.parent).free - leave
    assert size >= 0 and size % PAGE == 0 == leave % PAGE
    with open(path, "wb") as f:
        f.truncate(0)
        for _ in range(size // (1 << 20)):
            f.write(b"\0" * (1 << 20))
        f.write(b"\0" * (size % (1 << 20)))
    assert shutil.disk_usage(path.parent).free == leave
    return size


def leftovers(model: Path) -> list[str]:
    """Anything a pack may have left in the model folder: the store or a temporary folder."""
    return sorted(p.name for p in model.iterdir() if p.name == PACKED_DIRNAME or p.name.startswith("."))


def need_of(model: Path) -> int:
    """What pack_model checks for: the packed experts plus room for the index."""
    return packed_size(model) + INDEX_RESERVE_BYTES


def test_cli_pack_on_a_too_small_disk_says_what_is_needed(tiny_model: Any, tmpfs: Path) -> None:
    model = Path(shutil.copytree(tiny_model("qwen3_moe", 4), tmpfs / "model"))
    need = need_of(model)
    fill(tmpfs / "filler", leave=need - 4 * PAGE)  # 16 KiB short
    free = shutil.disk_usage(tmpfs).free
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "pack", str(model)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"packing needs {need / 2**30:.2f} GiB ({need} bytes) of free space" in errors[0]
    assert f"only {free / 2**30:.2f} GiB ({free} bytes) is free" in errors[0]
    assert leftovers(model) == [] and shutil.disk_usage(tmpfs).free == free  # nothing was written


def test_disk_filled_by_another_writer_mid_pack_leaves_no_store(tiny_model: Any, tmpfs: Path) -> None:
    model = Path(shutil.copytree(tiny_model("qwen3_moe", 4), tmpfs / "model"))
    need = need_of(model)
    layers = inspect_experts(model).layers
    assert len(layers) > 1
    filler = tmpfs / "filler"

    def another_writer(done: int, total: int, written: int) -> None:
        if done == 1:  # after the first layer file, something else takes all but one page
            fill(filler, leave=PAGE)

    with pytest.raises(DiskFullError) as caught:
        pack_model(model, progress=another_writer)
    message = str(caught.value)
    free_now = shutil.disk_usage(tmpfs).free  # the partial pack is gone again
    assert free_now > PAGE
    assert re.search(rf"^{re.escape(str(model))}: the disk filled up while packing \(layer-0001\.experts could "
                     r"not be written, .* still to write\)", message), message  # fmt: skip
    assert f"packing needs {need / 2**30:.2f} GiB ({need} bytes) of free space" in message
    assert f"{free_now / 2**30:.2f} GiB ({free_now} bytes) is free now" in message
    assert "Nothing was changed" in message
    assert leftovers(model) == []
    assert open_packed_layout(model, layers) is None  # the model keeps reading its safetensors files

    filler.unlink()  # with room again, the pack succeeds and is used
    pack_model(model)
    assert leftovers(model) == [PACKED_DIRNAME]
    packed = open_packed_layout(model, layers)
    assert packed is not None and len(packed) == len(layers)


def test_temporary_folder_of_an_interrupted_pack_is_never_used(model_copy_small: Path) -> None:
    """A pack killed before its final rename leaves `.moebar-packed.tmp-PID`; the loader ignores it."""
    model = model_copy_small
    pack_model(model)
    (model / PACKED_DIRNAME).rename(model / f".{PACKED_DIRNAME}.tmp-999999")
    layers = inspect_experts(model).layers
    assert open_packed_layout(model, layers) is None
    index = json.loads((model / f".{PACKED_DIRNAME}.tmp-999999" / "index.json").read_text())
    assert len(index["layers"]) == len(layers)  # a complete store, yet not used: only the final name counts


@pytest.fixture
def model_copy_small(tiny_model: Any, tmp_path: Path) -> Path:
    """A private copy of the tiny model."""
    return Path(shutil.copytree(tiny_model("qwen3_moe", 4), tmp_path / "model"))
