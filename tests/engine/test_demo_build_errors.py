"""The demo and tiny-model builders when something is off (engine/demo/demo_model.py): an interrupted
first-run build is rebuilt rather than used, a lost race to the same folder uses the winner's model,
a rebuild over an older model leaves no stale shard behind, and bad arguments are refused by name."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from engine.demo import demo_model as dm
from engine.errors import ModelError, UnsupportedModelError
from engine.storage.safetensors_index import read_model_index, weight_files


def test_an_interrupted_first_run_build_is_rebuilt_not_used(tmp_path: Path) -> None:
    final = tmp_path / "demo"
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))  # the rest never written
    assert not dm.is_random_weight_model(final)
    path = dm.ensure_demo_model(final)
    assert path == final and dm._demo_is_complete(final)
    assert read_model_index(final)  # every shard's header reads
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


@pytest.mark.parametrize("winner_complete", [True, False], ids=["winner-complete", "winner-broken"])
def test_losing_the_race_to_build_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner_complete: bool) -> None:
    final = tmp_path / "demo"
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        # another app instance finished first: its folder is in place when ours is renamed
        shutil.copytree(src, dst)
        if not winner_complete:
            (Path(dst) / "tokenizer.json").unlink()
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))

    monkeypatch.setattr(dm.os, "rename", rename)
    if winner_complete:
        assert dm.ensure_demo_model(final) == final and dm._demo_is_complete(final)
    else:
        with pytest.raises(OSError, match="Directory not empty"):
            dm.ensure_demo_model(final)
    monkeypatch.setattr(dm.os, "rename", real_rename)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # our temporary folder is gone either way


def test_a_rebuild_over_an_older_model_leaves_no_stale_shard(tmp_path: Path) -> None:
    out = tmp_path / "m"
    dm.build_random_moe_model(out, "qwen3_moe", 4, max_shard_bytes=200_000)
    many = weight_files(out)
    assert len(many) > 1
    with pytest.raises(ModelError, match=f"{out}: directory is not empty"):
        dm.build_random_moe_model(out, "qwen3_moe", 4)
    dm.build_random_moe_model(out, "qwen3_moe", 4, overwrite=True)
    assert sorted(p.name for p in out.glob("model*.safetensors")) == [p.name for p in weight_files(out)]
    assert len(weight_files(out)) < len(many)
    assert read_model_index(out)


def test_bad_builder_arguments_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model_type 'no_such_moe' is not buildable: choose one of qwen3_moe"):
        dm.build_random_moe_model(tmp_path / "a", "no_such_moe", 4)
    with pytest.raises(UnsupportedModelError, match="mlx-lm has no model module for 'no_such_moe'"):
        dm._model_classes("no_such_moe")
    with pytest.raises(ModelError, match="num_layers must be at least 1, got 0"):
        dm.build_random_moe_model(tmp_path / "b", "qwen3_moe", 4, num_layers=0)
    with pytest.raises(ModelError, match="max_shard_bytes must be positive, got 0"):
        dm.plan_shards({"a": 10}, 0)


def test_a_folder_without_readable_config_is_not_a_demo_model(tmp_path: Path) -> None:
    assert dm.is_random_weight_model(tmp_path) is False
    (tmp_path / "config.json").write_text("{not json")
    assert dm.is_random_weight_model(tmp_path) is False
