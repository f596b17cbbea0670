"""A rank's share (``pack MODEL --rank R --ranks N``): self-contained, each expert once, refused where wrong.

Two loopback ranks, each on its own share with the original model deleted, give mlx-lm's greedy
tokens; the shares together hold every expert exactly once and the dense tensors once each;
a share run alone, as another rank, or beside another model is refused at start-up by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import CorruptModelError, MissingFileError, ModelError
from engine.storage.packed_layout import aligned
from engine.storage.rank_folder import RANK_MANIFEST, read_rank_share
from engine.storage.rank_pack import pack_rank
from engine.storage.safetensors_index import read_header
from exactness import mlx_lm_reference
from test_expert_parallel import HERE, PROMPT, TOKENS, _logs, run_ranks


def _run(models: list[Path], tmp: Path, timeout: float = 300, **env: str) -> list[tuple[int, dict[str, Any] | None, str]]:
    """One rank per folder in ``models`` (rank r on models[r]); (exit code, result, log) per rank."""
    return run_ranks(models, tmp, len(models), timeout=timeout, **env)  # type: ignore[arg-type]


def _expert_bytes(model: Path) -> dict[tuple[int, int], bytes]:
    """Every expert's payload in the original model, by (layer, expert)."""
    from engine.model.loader import inspect_experts
    from engine.storage.expert_store import ExpertStore

    layers = inspect_experts(model).layers
    store = ExpertStore(layers)
    out = {}
    try:
        for layer in layers:
            for e in range(layer.num_experts):
                bufs = [np.empty(p.nbytes, dtype=np.uint8) for p in layer.params]
                store.read_into(layer.layer, e, bufs)
                out[(layer.layer, e)] = b"".join(b.tobytes() for b in bufs)
    finally:
        store.close()
    return out


def _dense_tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of a folder's safetensors files (name -> bytes)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        for name, loc in read_header(f).items():
            assert name not in out, f"{name} twice in {folder}"
            out[name] = raw[loc.offset : loc.offset + loc.nbytes]
    return out


def _expert_paths(model: Path) -> list[str]:
    from engine.model.loader import inspect_experts

    return [layer.module_path + "." for layer in inspect_experts(model).layers]


@pytest.fixture(scope="module")
def shares(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shares of the tiny qwen3_moe packed from a copy that is then deleted: 'r0of2', 'r1of2' (several
    dense files), 'r0of3', and 'other' (rank 1 of 2 of a model with the same shapes, other weights)."""
    root = tmp_path_factory.mktemp("shares")
    source = root / "source"
    shutil.copytree(tiny_model("qwen3_moe", 4), source)
    out = {"r0of2": pack_rank(source, 0, 2, root / "r0of2"),
           "r1of2": pack_rank(source, 1, 2, root / "r1of2", max_shard_bytes=1 << 20),
           "r0of3": pack_rank(source, 0, 3, root / "r0of3"),
           "other": pack_rank(tiny_model("qwen3_moe", 4, seed=7), 1, 2, root / "other")}
    shutil.rmtree(source)  # the shares need nothing of the model they were packed from
    return out


def test_the_shares_hold_each_expert_once_and_the_dense_part_each(tiny_model: Any, shares: dict[str, Path]) -> None:
    model = tiny_model("qwen3_moe", 4)
    experts = _expert_bytes(model)
    dense = {k: v for k, v in _dense_tensors(model).items() if not any(k.startswith(p) for p in _expert_paths(model))}
    seen: dict[tuple[int, int], int] = {}
    for r, share_dir in enumerate([shares["r0of2"], shares["r1of2"]]):
        share = read_rank_share(share_dir)
        assert share is not None and (share.rank, share.ranks) == (r, 2)
        assert _dense_tensors(share_dir) == dense  # byte for byte, once in each share
        for i, entry in enumerate(share.layers):
            blob = (share_dir / "experts" / entry["file"]).read_bytes()
            for slot, e in enumerate(share.owned(entry["num_experts"])):
                payload = experts[(i, e)]
                assert blob[slot * entry["stride"] : slot * entry["stride"] + len(payload)] == payload
                seen[(i, e)] = seen.get((i, e), 0) + 1
    assert seen == {key: 1 for key in experts}  # each expert exactly once across the shares
    assert len(list(shares["r1of2"].glob("model-dense-*.safetensors"))) > 1
    assert (shares["r1of2"] / "model.safetensors.index.json").is_file()

    # disk per rank: the dense tensors + this rank's half of the experts (each blob page-aligned)
    dense_bytes, expert_total = sum(map(len, dense.values())), sum(map(len, experts.values()))
    one = len(next(iter(experts.values())))
    for share_dir in (shares["r0of2"], shares["r1of2"]):
        weights = sum(f.stat().st_size for f in share_dir.glob("*.safetensors"))
        expert_files = sum(f.stat().st_size for f in (share_dir / "experts").iterdir())
        assert dense_bytes <= weights < dense_bytes + 64 * 1024  # + the headers
        assert expert_files == aligned(one) * len(experts) // 2
        assert expert_total // 2 <= expert_files <= expert_total // 2 * aligned(one) / one


def test_two_ranks_on_their_own_shares_give_mlx_lm_tokens(tiny_model: Any, shares: dict[str, Path],
                                                          tmp_path: Path) -> None:
    reference = mlx_lm_reference(tiny_model("qwen3_moe", 4), PROMPT, TOKENS)
    results = _run([shares["r0of2"], shares["r1of2"]], tmp_path)
    assert all(code == 0 for code, _, _ in results), _logs(results)
    for r, (_, res, _) in enumerate(results):
        assert res is not None and res["tokens"] == reference, f"rank {r}: {res} != mlx-lm {reference}"


def test_a_share_alone_is_refused_naming_what_is_missing(shares: dict[str, Path]) -> None:
    from engine.engine import Engine
    from engine.types import EngineOptions

    with pytest.raises(MissingFileError) as err:
        Engine.load(shares["r1of2"], EngineOptions(cache_mb=0), measure_disk=False)
    message = str(err.value)
    assert str(shares["r1of2"]) in message and "rank 1 of 2" in message and "'rank' and 'ranks'" in message
    assert "holds 8 of the 16 experts of each layer" in message and "missing" in message


def test_shares_of_another_rank_or_size_are_refused_by_name(shares: dict[str, Path], tmp_path: Path) -> None:
    """Rank 0 on a share made for 3 ranks, rank 1 on rank 0's share: each names its folder and field."""
    results = _run([shares["r0of3"], shares["r0of2"]], tmp_path)
    assert [code for code, _, _ in results] == [2, 2], _logs(results)
    log0, log1 = results[0][2], results[1][2]
    assert f"{shares['r0of3']}: this folder is the share of rank 0 of 3" in log0 and "field 'ranks' is 3" in log0
    assert "this process is rank 0 of 2" in log0
    assert f"{shares['r0of2']}: this folder is the share of rank 0 of 2" in log1 and "field 'rank' is 0" in log1
    assert "this process is rank 1 of 2" in log1


@pytest.mark.slow  # the same check as test_ranks_on_different_options_are_refused_by_name, which CI runs
def test_a_share_of_another_model_is_refused_by_name(shares: dict[str, Path], tmp_path: Path) -> None:
    results = _run([shares["r0of2"], shares["other"]], tmp_path)
    assert [code for code, _, _ in results] == [2, 2], _logs(results)
    assert "rank 1 was started on another model or other options than rank 0" in results[0][2]
    log1 = results[1][2]
    assert "this rank was started on another model or other options than rank 0" in log1
    assert f"its model folder {shares['other']} is a share of" in log1 and "field 'model'" in log1


@pytest.mark.slow
def test_a_share_beside_the_whole_model_gives_mlx_lm_tokens(tiny_model: Any, shares: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Rank 0 on the original folder (every expert), rank 1 on its share: the same model, so they run."""
    model = tiny_model("qwen3_moe", 4)
    results = _run([model, shares["r1of2"]], tmp_path)
    assert all(code == 0 for code, _, _ in results), _logs(results)
    reference = mlx_lm_reference(model, PROMPT, TOKENS)
    assert all(res is not None and res["tokens"] == reference for _, res, _ in results)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda m: m.update(rank=5), "field 'rank' is 5, expected 0 to 1"),
    (lambda m: m.update(ranks="two"), "field 'ranks' is missing or not int"),
    (lambda m: m["model"].update(fingerprint="abc"), "field 'model.fingerprint' is not a sha256 hex digest"),
    (lambda m: m["experts"]["layers"][0]["checksums"].pop(), "field 'checksums' has 7 entries, rank 1 of 2 owns 8"),
    (lambda m: m.update(moebar_rank_share=9), "field 'moebar_rank_share' is 9, expected 1"),
])
def test_a_bad_manifest_is_refused_naming_the_field(shares: dict[str, Path], tmp_path: Path, edit: Any,
                                                    problem: str) -> None:
    folder = tmp_path / "share"
    shutil.copytree(shares["r1of2"], folder)
    manifest = json.loads((folder / RANK_MANIFEST).read_text())
    edit(manifest)
    (folder / RANK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptModelError) as err:
        read_rank_share(folder)
    assert str(folder / RANK_MANIFEST) in str(err.value) and problem in str(err.value)


def test_a_missing_expert_file_is_named(shares: dict[str, Path], tmp_path: Path) -> None:
    from engine.model.loader import inspect_experts

    folder = tmp_path / "share"
    shutil.copytree(shares["r1of2"], folder)
    (folder / "experts" / "layer-0002.experts").unlink()
    share = read_rank_share(folder)
    assert share is not None
    with pytest.raises(CorruptModelError) as err:
        share.packed_layers(inspect_experts(folder).layers)
    assert str(folder / "experts" / "layer-0002.experts") in str(err.value) and "missing" in str(err.value)


def test_pack_refuses_bad_ranks_and_folders(tiny_model: Any, shares: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)
    with pytest.raises(ModelError, match="--rank 2: expected 0 to 1 for --ranks 2"):
        pack_rank(model, 2, 2, tmp_path / "x")
    with pytest.raises(ModelError, match="--ranks 1: a share is for one of 2 or more ranks"):
        pack_rank(model, 0, 1, tmp_path / "x")
    with pytest.raises(ModelError, match="already a rank's share"):
        pack_rank(shares["r0of2"], 0, 2, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="exists and is not a rank's share"):
        pack_rank(model, 0, 2, tmp_path / "busy")


def test_the_cli_packs_a_share(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "pack", str(model), "--rank", "1", "--ranks", "2",
                           "--out", str(tmp_path / "s"), "--quiet"], capture_output=True, text=True, timeout=120,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "s")
    share = read_rank_share(tmp_path / "s")
    assert share is not None and (share.rank, share.ranks) == (1, 2)
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "pack", str(model), "--rank", "1"], capture_output=True,
                         text=True, timeout=120, cwd=HERE.parents[1])
    assert bad.returncode == 2 and "give --rank and --ranks together" in bad.stderr


def test_plan_on_a_share_sizes_the_cache_as_a_load_of_it_does(tiny_model: Any, shares: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from engine.cli import main

    assert main(["plan", str(tiny_model("qwen3_moe", 4)), "--json", "--samples", "2", "--device", "cpu"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(["plan", str(shares["r1of2"]), "--json", "--samples", "2", "--device", "cpu"]) == 0
    share = json.loads(capsys.readouterr().out)
    # the tiny model's experts all fit: "every expert" is the whole model's there, half of them on a share of 2
    assert "every expert" in whole["cache_reason"] and "every expert" in share["cache_reason"]
    assert share["cache_budget_bytes"] * 2 == whole["cache_budget_bytes"]
