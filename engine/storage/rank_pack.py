"""``moebar-engine pack MODEL --rank R --ranks N``: write one rank's self-contained share of a model.

The share (engine/storage/rank_folder.py) holds config.json, the tokenizer files, the dense
tensors copied byte for byte into their own safetensors file(s), and the packed experts of rank
``R`` only, so each Mac needs the dense part plus ``1/N`` of the experts on its disk. It is
written into a temporary folder beside ``--out`` and renamed into place when complete; at most
one layer's experts are held in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import DiskFullError, ModelError
from engine.model.loader import inspect_experts
from engine.storage.expert_layout import LayerExperts
from engine.storage.expert_store import ExpertStore
from engine.storage.pack import _gib, _replace_dir, _write_file
from engine.storage.packed_layout import aligned, open_packed_layout
from engine.storage.rank_folder import (EXPERTS_DIRNAME, RANK_FORMAT_VERSION, RANK_MANIFEST, read_rank_share,
                                        source_identity)
from engine.storage.safetensors_index import TensorLocation, read_model_index

PackProgress = Callable[[int, int, int], None]  # (steps done, steps total, bytes written)
DENSE_SHARD_BYTES = 4 << 30  # dense tensors per safetensors file, at most (one larger tensor gets its own)
COPY_CHUNK = 64 << 20
RESERVE_BYTES = 1 << 20  # manifest, headers, small files and file-system rounding
# weights in other formats are not copied into a share (only safetensors are read)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".h5", ".ckpt", ".msgpack", ".onnx")


def default_share_dir(model_dir: Path, rank: int, ranks: int) -> Path:
    """Where a share is written without ``--out``: beside the model, ``<name>-rank<R>of<N>``."""
    return model_dir.parent / f"{model_dir.name}-rank{rank}of{ranks}"


def _check_rank(rank: int, ranks: int) -> None:
    if ranks < 2:
        raise ModelError(f"--ranks {ranks}: a share is for one of 2 or more ranks")
    if not 0 <= rank < ranks:
        raise ModelError(f"--rank {rank}: expected 0 to {ranks - 1} for --ranks {ranks}")


def _dense_tensors(model_dir: Path, layers: list[LayerExperts]) -> list[TensorLocation]:
    """Every tensor that is not a streamed expert, in file and offset order (sequential reads)."""
    experts = {s.name for layer in layers for s in layer.sources}
    dense = [loc for name, loc in read_model_index(model_dir).items() if name not in experts]
    return sorted(dense, key=lambda loc: (str(loc.file), loc.offset))


def _shards(dense: list[TensorLocation], max_bytes: int) -> list[list[TensorLocation]]:
    shards: list[list[TensorLocation]] = [[]]
    size = 0
    for loc in dense:
        if shards[-1] and size + loc.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(loc)
        size += loc.nbytes
    return shards


def _header(tensors: list[TensorLocation]) -> bytes:
    """A safetensors header for ``tensors`` back to back, padded to 8 bytes (the format's rule)."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    pos = 0
    for loc in tensors:
        header[loc.name] = {"dtype": loc.dtype, "shape": list(loc.shape), "data_offsets": [pos, pos + loc.nbytes]}
        pos += loc.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def share_sizes(model_dir: Path, rank: int, ranks: int) -> tuple[int, int]:
    """(dense bytes, expert bytes) of rank ``rank``'s share, as written (expert blobs page-aligned)."""
    layers = inspect_experts(Path(model_dir)).layers
    dense = sum(loc.nbytes for loc in _dense_tensors(Path(model_dir), layers))
    experts = sum(aligned(l.expert_bytes) * len(range(rank, l.num_experts, ranks)) for l in layers)
    return dense, experts


def pack_rank(model_dir: str | Path, rank: int, ranks: int, out: str | Path | None = None, *, io_threads: int = 4,
              progress: PackProgress | None = None, max_shard_bytes: int = DENSE_SHARD_BYTES) -> Path:
    """Write rank ``rank`` of ``ranks``'s share of ``model_dir`` to ``out`` (default beside it); return it."""
    model_dir = Path(model_dir).expanduser().resolve()
    _check_rank(rank, ranks)
    if read_rank_share(model_dir) is not None:
        raise ModelError(f"{model_dir}: this is already a rank's share ({RANK_MANIFEST}); pack the original model")
    final = Path(out).expanduser().resolve() if out else default_share_dir(model_dir, rank, ranks)
    if final == model_dir or model_dir in final.parents:
        raise ModelError(f"--out {final}: choose a folder outside the model folder {model_dir}")
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / RANK_MANIFEST).is_file())):
        raise ModelError(f"--out {final}: exists and is not a rank's share; choose another folder or remove it")
    inspected = inspect_experts(model_dir)
    layers = inspected.layers
    fewest = min(l.num_experts for l in layers)
    if ranks > fewest:
        raise ModelError(f"--ranks {ranks}: {model_dir} has {fewest} experts in its smallest expert layer; "
                         f"every rank must own at least one, so use --ranks {fewest} or fewer")
    dense = _dense_tensors(model_dir, layers)
    shards = _shards(dense, max_shard_bytes)
    owned = [list(range(rank, l.num_experts, ranks)) for l in layers]
    need = sum(loc.nbytes for loc in dense) + sum(aligned(l.expert_bytes) * len(o) for l, o in zip(layers, owned))
    need += RESERVE_BYTES
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    if free < need:
        raise DiskFullError(f"{final.parent}: the share of rank {rank} of {ranks} needs {_gib(need)}, "
                            f"only {_gib(free)} is free")
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EXPERTS_DIRNAME).mkdir(parents=True)
    steps = len(shards) + len(layers)
    written = 0
    try:
        _copy_small_files(model_dir, tmp)
        names = _shard_names(len(shards))
        for i, (name, tensors) in enumerate(zip(names, shards)):
            written += _write_dense(tmp / name, tensors, need - written)
            if progress:
                progress(i + 1, steps, written)
        if len(shards) > 1:
            weight_map = {loc.name: name for name, tensors in zip(names, shards) for loc in tensors}
            index = {"metadata": {"total_size": sum(loc.nbytes for loc in dense)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        entries = []
        store = ExpertStore(layers, io_threads=io_threads, packed=open_packed_layout(model_dir, layers))
        try:
            for layer, ids in zip(layers, owned):
                entry, n = _write_experts(store, layer, ids, tmp / EXPERTS_DIRNAME, need - written)
                entries.append(entry)
                written += n
                if progress:
                    progress(len(shards) + layer.layer + 1, steps, written)
        finally:
            store.close()
        manifest = {
            "moebar_rank_share": RANK_FORMAT_VERSION,
            "rank": rank,
            "ranks": ranks,
            "model": {"fingerprint": source_identity(model_dir), "source": model_dir.name,
                      "model_type": inspected.config.get("model_type")},
            "dense": {"files": names, "bytes": sum(loc.nbytes for loc in dense)},
            "experts": {"dir": EXPERTS_DIRNAME, "layers": entries},
        }
        data = np.frombuffer(json.dumps(manifest, indent=1).encode(), dtype=np.uint8)
        _write_file(tmp / RANK_MANIFEST, data, data.nbytes)  # last: a share without it is not used
        _replace_dir(tmp, final)
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"{final}: the disk filled up writing the share of rank {rank} of {ranks} ({e}); it "
                            f"needs {_gib(need)}. Nothing was changed: free space and pack again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model-dense.safetensors"]  # model*.safetensors: the name mlx-lm looks for
    return [f"model-dense-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _copy_small_files(model_dir: Path, dest: Path) -> None:
    """config.json, tokenizer files and the like: every top-level file but weights and indexes."""
    for f in sorted(model_dir.iterdir()):
        if (not f.is_file() or f.name.startswith(".") or f.name.endswith(_WEIGHT_SUFFIXES)
                or f.name in ("model.safetensors.index.json", RANK_MANIFEST)):
            continue
        shutil.copy2(f, dest / f.name)


def _write_dense(path: Path, tensors: list[TensorLocation], still_needed: int) -> int:
    """One safetensors file of ``tensors``, their bytes copied from the model's shards; return its size."""
    head = _header(tensors)
    fds: dict[Path, int] = {}
    try:
        with open(path, "wb") as f:
            f.write(head)
            for loc in tensors:
                fd = fds.get(loc.file)
                if fd is None:
                    fd = fds[loc.file] = os.open(loc.file, os.O_RDONLY)
                done = 0
                while done < loc.nbytes:
                    chunk = os.pread(fd, min(COPY_CHUNK, loc.nbytes - done), loc.offset + done)
                    if not chunk:
                        raise ModelError(f"{loc.file}: short read of tensor {loc.name!r} at byte {loc.offset + done}")
                    f.write(chunk)
                    done += len(chunk)
            f.flush()
            os.fsync(f.fileno())
            return f.tell()
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path.name} could not be written, {_gib(still_needed)} still to write") from e
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_experts(store: ExpertStore, layer: LayerExperts, ids: list[int], dest: Path,
                   still_needed: int) -> tuple[dict[str, object], int]:
    """The layer file of the experts ``ids`` (in id order) and its manifest entry; return both and the bytes."""
    stride = aligned(layer.expert_bytes)
    buf = np.zeros(stride * len(ids), dtype=np.uint8)
    futures = []
    for slot, e in enumerate(ids):
        pos, dests = slot * stride, []
        for p in layer.params:
            dests.append(buf[pos : pos + p.nbytes])
            pos += p.nbytes
        futures.append(store.submit(layer.layer, e, dests))
    for fut in futures:
        fut.result()
    checksums = [zlib.crc32(buf[i * stride : i * stride + layer.expert_bytes].data) for i in range(len(ids))]
    name = f"layer-{layer.layer:04d}.experts"
    _write_file(dest / name, buf, still_needed)
    entry = {
        "module_path": layer.module_path,
        "file": name,
        "num_experts": layer.num_experts,
        "stride": stride,
        "params": [{"key": p.key, "dtype": p.dtype, "shape": list(p.shape), "nbytes": p.nbytes} for p in layer.params],
        "checksums": checksums,
    }
    return entry, buf.nbytes
