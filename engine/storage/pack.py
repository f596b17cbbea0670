"""``moebar-engine pack``: rewrite a model's experts as one aligned blob per expert, atomically.

The pack is written into a temporary folder next to the model and renamed into place only when
complete, so an interrupted or failed pack (a full disk) never leaves a store that is used.
At most one layer's experts are held in memory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import DiskFullError
from engine.storage.expert_store import ExpertStore
from engine.model.loader import inspect_experts
from engine.storage.packed_layout import PACKED_DIRNAME, PACKED_FORMAT_VERSION, aligned, layer_entry, source_fingerprint

PackProgress = Callable[[int, int, int], None]  # (layers done, layers total, bytes written)
INDEX_RESERVE_BYTES = 1 << 20  # room for index.json and file-system rounding, beyond the expert blobs


def packed_size(model_dir: Path) -> int:
    """Bytes the packed layout of ``model_dir`` will take."""
    layers = inspect_experts(Path(model_dir)).layers
    return sum(aligned(l.expert_bytes) * l.num_experts for l in layers)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def remove_stale_pack_folders(model_dir: Path) -> list[Path]:
    """Delete temporary folders of packs whose process is gone (killed mid-pack); return them."""
    removed = []
    for path in model_dir.glob(f".{PACKED_DIRNAME}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pack_model(model_dir: str | Path, *, io_threads: int = 4, progress: PackProgress | None = None) -> Path:
    """Write ``<model_dir>/moebar-packed`` and return it; raises DiskFullError when space runs out."""
    from engine.errors import ModelError
    from engine.storage.rank_folder import RANK_MANIFEST

    model_dir = Path(model_dir)
    if (model_dir / RANK_MANIFEST).is_file():
        raise ModelError(f"{model_dir}: this is a rank's share ({RANK_MANIFEST}): its experts are packed already")
    remove_stale_pack_folders(model_dir)
    layers = inspect_experts(model_dir).layers
    need = sum(aligned(l.expert_bytes) * l.num_experts for l in layers) + INDEX_RESERVE_BYTES
    free = shutil.disk_usage(model_dir).free
    if free < need:
        raise DiskFullError(
            f"{model_dir}: packing needs {_gib(need)} of free space, only {_gib(free)} is free"
        )
    final = model_dir / PACKED_DIRNAME
    tmp = model_dir / f".{PACKED_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    store = ExpertStore(layers, io_threads=io_threads)
    written = 0
    entries = []
    try:
        for layer in layers:
            stride = aligned(layer.expert_bytes)
            buf = np.zeros(stride * layer.num_experts, dtype=np.uint8)  # one layer at a time
            futures = []
            for e in range(layer.num_experts):
                base = e * stride
                dests, pos = [], base
                for p in layer.params:
                    dests.append(buf[pos : pos + p.nbytes])
                    pos += p.nbytes
                futures.append(store.submit(layer.layer, e, dests))
            for f in futures:
                f.result()
            checksums = [
                zlib.crc32(buf[e * stride : e * stride + layer.expert_bytes].data) for e in range(layer.num_experts)
            ]
            name = f"layer-{layer.layer:04d}.experts"
            _write_file(tmp / name, buf, need - written)
            written += buf.nbytes
            entries.append(layer_entry(layer, name, checksums))
            if progress:
                progress(layer.layer + 1, len(layers), written)
        index = {"version": PACKED_FORMAT_VERSION, "source": source_fingerprint(layers), "layers": entries}
        index_bytes = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
        _write_file(tmp / "index.json", index_bytes, index_bytes.nbytes)
        _replace_dir(tmp, final)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Say what a second try needs: the partial pack is gone, so the whole amount must be free.
        free = shutil.disk_usage(model_dir).free
        raise DiskFullError(
            f"{model_dir}: the disk filled up while packing ({e}); packing needs {_gib(need)} of free "
            f"space and {_gib(free)} is free now. Nothing was changed: free space and run `moebar-engine pack` again"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store.close()
    return final


def _write_file(path: Path, data: np.ndarray, still_needed: int) -> None:
    """Write and fsync ``data``; a full disk becomes a DiskFullError that says what is needed."""
    try:
        with open(path, "wb") as f:
            f.write(data.data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path.name} could not be written, {_gib(still_needed)} still to write") from e
        raise


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; an older pack is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{int(time.time())}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
