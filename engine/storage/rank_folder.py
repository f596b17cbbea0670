"""A rank's share of a model: a self-contained folder for one machine of several (expert parallelism).

``moebar-engine pack MODEL --rank R --ranks N`` (engine/storage/rank_pack.py) writes it:
config.json and the tokenizer files, the dense (non-expert) tensors in their own safetensors
file(s), the packed experts that rank ``R`` owns (ids ``e`` with ``e % N == R``, the ownership of
engine/model/expert_parallel.py) under ``experts/``, and ``moebar-rank.json``, the manifest::

    {"moebar_rank_share": 1, "rank": R, "ranks": N,
     "model": {"fingerprint": "<hex>", "source": "<name>", "model_type": "..."},
     "dense": {"files": [...], "bytes": D},
     "experts": {"dir": "experts", "layers": [{"module_path", "file", "num_experts", "stride",
                                              "params": [...], "checksums": [one per owned expert]}]}}

A layer file holds the owned experts in id order: expert ``e`` at ``(e // N) * stride``.
``model.fingerprint`` is the original model's identity (``model_identity``), so ranks on shares
of one model, or on the model itself, pass the start-up check that they run the same model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CorruptModelError
from engine.storage.expert_layout import ExpertParam, LayerExperts
from engine.storage.packed_layout import ALIGNMENT, PackedLayer
from engine.storage.safetensors_index import DTYPE_BYTES

RANK_MANIFEST = "moebar-rank.json"
RANK_FORMAT_VERSION = 1
EXPERTS_DIRNAME = "experts"

# the safetensors dtypes an expert param of a share may have -> the mlx dtype its stand-in is built as
SHARE_DTYPES = {"BOOL": "bool_", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
                "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64",
                "I64": "int64"}


SAMPLE_BYTES = 65536  # read from each end of each weight file for the identity


def source_identity(model_dir: Path) -> str:
    """A digest of a model folder's config.json and weight files: names, sizes, and the first and last
    64 KiB of each (so a fine-tune with the same shapes is another model; the rest is not read)."""
    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(0, size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def model_identity(model_dir: Path) -> str:
    """Which model a folder holds: a share's recorded original, else the folder's own digest."""
    path = model_dir / RANK_MANIFEST
    if path.is_file():
        share = read_rank_share(model_dir)
        assert share is not None
        return share.fingerprint
    return source_identity(model_dir)


@dataclass(frozen=True)
class RankShare:
    """A rank folder's manifest, checked: which rank of how many, which model, which experts."""

    folder: Path
    rank: int
    ranks: int
    fingerprint: str
    source: str
    layers: tuple[dict[str, Any], ...]  # the manifest's layer entries

    @property
    def manifest(self) -> Path:
        """The manifest file (named in errors)."""
        return self.folder / RANK_MANIFEST

    def owned(self, num_experts: int) -> range:
        """The expert ids of a layer of ``num_experts`` that this share holds."""
        return range(self.rank, num_experts, self.ranks)

    def describe(self) -> str:
        """``rank R of N`` with the ids it holds."""
        return f"rank {self.rank} of {self.ranks} (expert ids e with e % {self.ranks} == {self.rank})"

    def placeholders(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every stacked expert tensor the original model has: name -> (shape, safetensors dtype).

        The model is built as if they were there (never read: the streamed layers replace them).
        """
        out = {}
        for entry in self.layers:
            for p in entry["params"]:
                out[f"{entry['module_path']}.{p['key']}"] = ((entry["num_experts"], *p["shape"]), p["dtype"])
        return out

    def layer_experts(self, found: list[tuple[str, Any, list[str]]]) -> list[LayerExperts]:
        """The streamed layers, checked against the banks found in the model built from config.json."""
        if len(found) != len(self.layers):
            raise CorruptModelError(
                f"{self.manifest}: field 'experts' lists {len(self.layers)} expert layers, the model built from "
                f"config.json has {len(found)}"
            )
        out = []
        for i, ((path, _, keys), entry) in enumerate(zip(found, self.layers)):
            params = [ExpertParam(p["key"], p["dtype"], tuple(p["shape"]), p["nbytes"]) for p in entry["params"]]
            if entry["module_path"] != path or [p.key for p in params] != list(keys):
                raise CorruptModelError(
                    f"{self.manifest}: field 'experts' layer {i} is {entry['module_path']!r} "
                    f"({', '.join(p.key for p in params)}), the model has {path!r} ({', '.join(keys)})"
                )
            out.append(LayerExperts(i, path, entry["num_experts"], params))
        return out

    def packed_layers(self, layers: list[LayerExperts]) -> list[PackedLayer]:
        """The layer files of the owned experts; a missing or short file is an error naming it."""
        out = []
        for layer, entry in zip(layers, self.layers):
            path = self.folder / EXPERTS_DIRNAME / entry["file"]
            owned = len(self.owned(layer.num_experts))
            need = entry["stride"] * owned
            size = path.stat().st_size if path.is_file() else -1
            if size < need:
                what = "missing" if size < 0 else f"truncated ({size} of {need} bytes)"
                raise CorruptModelError(f"{path}: expert file of {self.describe()} {what}; pack this rank's share again")
            out.append(PackedLayer(path, entry["stride"], layer.expert_bytes, tuple(entry["checksums"]),
                                   rank=self.rank, ranks=self.ranks))
        return out

    def problem_for(self, rank: int, ranks: int) -> str | None:
        """Why this share cannot serve as rank ``rank`` of ``ranks`` (naming the folder and field), or None."""
        if ranks == self.ranks and rank == self.rank:
            return None
        field = "ranks" if ranks != self.ranks else "rank"
        value = self.ranks if field == "ranks" else self.rank
        return (
            f"{self.folder}: this folder is the share of {self.describe()} ({RANK_MANIFEST} field {field!r} is "
            f"{value}), but this process is rank {rank} of {ranks}; give it its own share "
            f"(`moebar-engine pack MODEL --rank {rank} --ranks {ranks}`)"
        )

    def alone_problem(self) -> str:
        """Why one process cannot run on this share: the other ranks' experts are missing."""
        entry = self.layers[0]
        total = entry["num_experts"]
        return (
            f"{self.folder}: this folder is the share of {self.describe()} ({RANK_MANIFEST} fields 'rank' and "
            f"'ranks'): it holds {len(self.owned(total))} of the {total} experts of each layer; the experts of the "
            f"other {self.ranks - 1} rank(s) are missing. Start it as rank {self.rank} of {self.ranks} "
            "(mlx.launch, or MLX_RANK + MLX_HOSTFILE), or load the original model"
        )


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptModelError(f"{path}: field {name!r} is missing or not {getattr(kind, '__name__', kind)}: {value!r}")
    return value


def read_rank_share(folder: Path) -> RankShare | None:
    """The share described by ``folder/moebar-rank.json``; None where the folder has no manifest."""
    path = Path(folder) / RANK_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptModelError(f"{path}: not a readable JSON manifest ({e})") from None
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path}: expected a JSON object")
    if data.get("moebar_rank_share") != RANK_FORMAT_VERSION:
        raise CorruptModelError(
            f"{path}: field 'moebar_rank_share' is {data.get('moebar_rank_share')!r}, expected {RANK_FORMAT_VERSION}"
        )
    ranks = _field(data, "ranks", int, path)
    rank = _field(data, "rank", int, path)
    if ranks < 2:
        raise CorruptModelError(f"{path}: field 'ranks' is {ranks}, expected 2 or more")
    if not 0 <= rank < ranks:
        raise CorruptModelError(f"{path}: field 'rank' is {rank}, expected 0 to {ranks - 1}")
    model = _field(data, "model", dict, path)
    fingerprint = model.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 64:
        raise CorruptModelError(f"{path}: field 'model.fingerprint' is not a sha256 hex digest: {fingerprint!r}")
    experts = _field(data, "experts", dict, path)
    layers = experts.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CorruptModelError(f"{path}: field 'experts.layers' is missing or empty")
    for i, entry in enumerate(layers):
        _check_layer_entry(entry, i, rank, ranks, path)
    return RankShare(Path(folder), rank, ranks, fingerprint, str(model.get("source", "")), tuple(layers))


def _check_layer_entry(entry: Any, i: int, rank: int, ranks: int, path: Path) -> None:
    """One ``experts.layers`` entry: types, expert count, params (dtype, shape, bytes), stride, checksums."""
    where = f"{path}: field 'experts.layers[{i}]'"
    if not isinstance(entry, dict):
        raise CorruptModelError(f"{where} is not an object")
    for name, kind in (("module_path", str), ("file", str), ("num_experts", int), ("stride", int),
                       ("params", list), ("checksums", list)):
        if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
            raise CorruptModelError(f"{where}: field {name!r} is missing or not {kind.__name__}: {entry.get(name)!r}")
    if "/" in entry["file"] or entry["file"].startswith("."):
        raise CorruptModelError(f"{where}: field 'file' is not a file name: {entry['file']!r}")
    if entry["num_experts"] < 1:
        raise CorruptModelError(f"{where}: field 'num_experts' is {entry['num_experts']}, expected 1 or more")
    if ranks > entry["num_experts"]:
        raise CorruptModelError(
            f"{path}: field 'ranks' is {ranks}, more than the {entry['num_experts']} experts of layer {i} "
            f"(field 'experts.layers[{i}].num_experts'): some ranks would own none; pack with --ranks "
            f"{entry['num_experts']} or fewer"
        )
    owned = len(range(rank, entry["num_experts"], ranks))
    if len(entry["checksums"]) != owned:
        raise CorruptModelError(
            f"{where}: field 'checksums' has {len(entry['checksums'])} entries, rank {rank} of {ranks} owns {owned} "
            f"of {entry['num_experts']} experts"
        )
    if not entry["params"]:
        raise CorruptModelError(f"{where}: field 'params' is empty")
    for j, p in enumerate(entry["params"]):
        _check_param(p, f"{where}: field 'params[{j}]'")
    if entry["stride"] < sum(p["nbytes"] for p in entry["params"]):
        raise CorruptModelError(f"{where}: field 'stride' ({entry['stride']}) is smaller than one expert")
    if entry["stride"] % ALIGNMENT:
        raise CorruptModelError(
            f"{where}: field 'stride' is {entry['stride']}, not a multiple of {ALIGNMENT} (experts must start "
            "page-aligned for direct reads); pack this rank's share again"
        )


def _check_param(p: Any, where: str) -> None:
    """One param of a layer entry: key, a known dtype, a shape of non-negative ints, nbytes matching both."""
    if not (isinstance(p, dict) and isinstance(p.get("key"), str) and isinstance(p.get("dtype"), str)
            and isinstance(p.get("shape"), list) and isinstance(p.get("nbytes"), int)
            and not isinstance(p.get("nbytes"), bool)):
        raise CorruptModelError(f"{where} is malformed (expected key, dtype, shape, nbytes): {p!r}")
    if p["dtype"] not in SHARE_DTYPES:
        raise CorruptModelError(
            f"{where}: field 'dtype' is {p['dtype']!r}, expected one of {', '.join(SHARE_DTYPES)}"
        )
    shape = p["shape"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CorruptModelError(f"{where}: field 'shape' is {shape!r}, expected a list of non-negative integers")
    count = 1
    for n in shape:
        count *= n
    want = count * DTYPE_BYTES[p["dtype"]]
    if p["nbytes"] != want:
        raise CorruptModelError(
            f"{where}: field 'nbytes' is {p['nbytes']}, but shape {shape} of {p['dtype']} is {want} bytes"
        )
