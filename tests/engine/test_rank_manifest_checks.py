"""A rank share's manifest (moebar-rank.json) is checked field by field before anything is built from it.

Each malformed entry is refused with a CorruptModelError naming ``<folder>/moebar-rank.json``, the
field and its value; ``pack --ranks N`` is refused where some layer has fewer than N experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine.errors import CorruptModelError, ModelError
from engine.model.loader import _check_shapes
from engine.storage.expert_layout import ExpertParam, LayerExperts
from engine.storage.packed_layout import ALIGNMENT
from engine.storage.rank_folder import RANK_MANIFEST, read_rank_share
from engine.storage.rank_pack import pack_rank


def _manifest(rank: int = 1, ranks: int = 2, experts: int = 4) -> dict[str, Any]:
    """A well-formed manifest of one layer (read_rank_share reads nothing else)."""
    layer = {"module_path": "model.layers.0.mlp.switch_mlp", "file": "layer-0000.experts", "num_experts": experts,
             "stride": ALIGNMENT,
             "params": [{"key": "gate_proj.weight", "dtype": "U32", "shape": [8, 4], "nbytes": 128},
                        {"key": "gate_proj.scales", "dtype": "BF16", "shape": [8, 1], "nbytes": 16}],
             "checksums": [0] * len(range(rank, experts, ranks))}
    return {"moebar_rank_share": 1, "rank": rank, "ranks": ranks,
            "model": {"fingerprint": "0" * 64, "source": "m", "model_type": "qwen3_moe"},
            "dense": {"files": ["model-dense.safetensors"], "bytes": 0},
            "experts": {"dir": "experts", "layers": [layer]}}


def _write(folder: Path, manifest: dict[str, Any]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / RANK_MANIFEST).write_text(json.dumps(manifest))
    return folder


def _param(m: dict[str, Any]) -> dict[str, Any]:
    return m["experts"]["layers"][0]["params"][0]


def test_the_well_formed_manifest_is_read(tmp_path: Path) -> None:
    share = read_rank_share(_write(tmp_path, _manifest()))
    assert share is not None and (share.rank, share.ranks) == (1, 2) and len(share.layers) == 1


EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("fp8", lambda m: _param(m).update(dtype="F8_E4M3"), "field 'dtype' is 'F8_E4M3'"),
    ("unknown dtype", lambda m: _param(m).update(dtype="Q4"), "field 'dtype' is 'Q4'"),
    ("shape of text", lambda m: _param(m).update(shape=["x", 4]), "field 'shape' is ['x', 4]"),
    ("negative shape", lambda m: _param(m).update(shape=[-8, -4]), "field 'shape' is [-8, -4]"),
    ("nbytes", lambda m: _param(m).update(nbytes=100), "field 'nbytes' is 100, but shape [8, 4] of U32 is 128 bytes"),
    ("no experts", lambda m: m["experts"]["layers"][0].update(num_experts=0), "field 'num_experts' is 0"),
    ("stride", lambda m: m["experts"]["layers"][0].update(stride=ALIGNMENT + 512),
     f"field 'stride' is {ALIGNMENT + 512}, not a multiple of {ALIGNMENT}"),
]


@pytest.mark.parametrize(("edit", "problem"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_a_malformed_layer_entry_is_refused_naming_the_manifest_field_and_value(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], problem: str
) -> None:
    manifest = _manifest()
    edit(manifest)
    folder = _write(tmp_path / "share", manifest)
    with pytest.raises(CorruptModelError) as err:
        read_rank_share(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / RANK_MANIFEST}: field 'experts.layers[0]'"), message
    assert problem in message, message


def test_a_share_for_more_ranks_than_experts_is_refused(tmp_path: Path) -> None:
    folder = _write(tmp_path / "share", _manifest(rank=0, ranks=5, experts=4))
    with pytest.raises(CorruptModelError) as err:
        read_rank_share(folder)
    message = str(err.value)
    assert f"{folder / RANK_MANIFEST}: field 'ranks' is 5, more than the 4 experts of layer 0" in message


def test_pack_refuses_more_ranks_than_experts(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)  # 16 experts a layer
    with pytest.raises(ModelError) as err:
        pack_rank(model, 0, 17, tmp_path / "x")
    assert "--ranks 17:" in str(err.value) and "16 experts" in str(err.value) and "--ranks 16 or fewer" in str(err.value)
    assert not (tmp_path / "x").exists()


class _Bank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = mx.zeros((3, 8, 4))


def test_a_share_shape_mismatch_names_the_manifest_by_its_full_path(tmp_path: Path) -> None:
    """A share's layers have no source files: the error names <folder>/moebar-rank.json."""
    layer = LayerExperts(0, "model.layers.0.mlp.switch_mlp", 3, [ExpertParam("weight", "F32", (8, 5), 160)])
    with pytest.raises(CorruptModelError) as err:
        _check_shapes([("model.layers.0.mlp.switch_mlp", _Bank(), ["weight"])], [layer], tmp_path)
    assert str(err.value).startswith(f"{tmp_path / RANK_MANIFEST}: tensor 'model.layers.0.mlp.switch_mlp.weight'")
