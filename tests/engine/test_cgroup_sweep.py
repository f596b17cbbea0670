"""``bench --cache-sweep SHARES --cgroup-limit-mb L``: the cgroup plumbing through fake cgroup files
(no root needed), the projection that picks the share, and one real sweep of the tiny model whose
rows run in a fake cgroup (the process is not limited: only the sweep's logic is tested here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from engine.cli import main as cli_main
from engine.diagnostics import bench as bench_module
from engine.diagnostics.cgroup_sweep import (
    choose_share,
    format_cgroup_sweep,
    major_faults,
    proc_read_bytes,
    projected_ms_per_token,
    run_cgroup_sweep,
)
from engine.platform import cgroup as cgroup_module
from engine.platform.cgroup import CgroupUnavailable, MemoryCgroup, memory_cgroup_root, parse_memory_stat


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "memory"
    root.mkdir()
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return root


def test_root_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CgroupUnavailable, match="Linux-only"):
        memory_cgroup_root(tmp_path, platform="darwin")
    with pytest.raises(CgroupUnavailable, match="cgroup v2 is not supported"):
        memory_cgroup_root(tmp_path, platform="linux")
    root = _fake_root(tmp_path)
    assert memory_cgroup_root(root, platform="linux") == root
    monkeypatch.setattr(cgroup_module.os, "access", lambda path, mode: False)
    with pytest.raises(CgroupUnavailable, match="needs root"):
        memory_cgroup_root(root, platform="linux")


def test_cgroup_files(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    cg = MemoryCgroup.create(root, "row", 512 * 2**20)
    assert (root / "row" / "memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert cg.limit_bytes() == 512 * 2**20
    assert cg.max_usage_bytes() == 0 and cg.stat() == {} and cg.oom_kills() == 0  # files not there yet
    (cg.path / "memory.stat").write_text("cache 1000\nrss 2000\npgmajfault 7\ntotal_cache 1000\n")
    (cg.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cg.path / "memory.max_usage_in_bytes").write_text("4096\n")
    assert cg.stat()["rss"] == 2000 and cg.stat()["pgmajfault"] == 7
    assert cg.oom_kills() == 2 and cg.max_usage_bytes() == 4096
    cg.add_process(1234)
    assert cg.procs_file.read_text() == "1234"
    with pytest.raises(CgroupUnavailable, match="cannot make"):
        MemoryCgroup.create(root, "row", 512 * 2**20)  # exists already
    with pytest.raises(ValueError):
        MemoryCgroup.create(root, "other", 0)
    for f in cg.path.iterdir():
        f.unlink()  # a real cgroup's files go with it; a fake's must go first
    cg.remove()
    cg.remove()  # already gone: quiet
    assert not cg.path.exists()
    assert parse_memory_stat("a 1\nbad line here\nb -2\n") == {"a": 1, "b": -2}


def test_process_counters_from_proc_files(tmp_path: Path) -> None:
    io = tmp_path / "io"
    io.write_text("rchar: 10\nwchar: 0\nread_bytes: 8192\nwrite_bytes: 0\n")
    assert proc_read_bytes(io) == 8192
    stat = tmp_path / "stat"
    # comm may hold spaces and parentheses: fields are counted after the last ')'
    stat.write_text("42 (py (x) y) S 1 42 42 0 -1 4194304 100 0 17 0 5 3\n")
    assert major_faults(stat) == 17
    assert proc_read_bytes() >= 0 and major_faults() >= 0  # this process's own files parse


def test_projection_picks_the_cheapest_row() -> None:
    assert projected_ms_per_token(5.5e9, 0) == pytest.approx(1000.0)
    assert projected_ms_per_token(0, 20e9) == pytest.approx(1000.0)
    assert projected_ms_per_token(0, 10e9, copy_rate=10e9) == pytest.approx(1000.0)
    rows = [
        {"share": 0.0, "ok": True, "disk_bytes_per_token": 10e6, "page_cache_bytes_per_token": 20e6},
        {"share": 0.3, "ok": True, "disk_bytes_per_token": 9e6, "page_cache_bytes_per_token": 5e6},
        {"share": 0.5, "ok": True, "disk_bytes_per_token": 9e6, "page_cache_bytes_per_token": 5e6},  # tie: smaller
        {"share": 0.75, "ok": False},  # OOM-killed rows never win
    ]
    assert choose_share(rows) == 0.3
    # page-cache hits nearly free: only disk bytes count, still 0.3 (the tie goes to the smaller share)
    assert choose_share(rows, copy_rate=1e15) == 0.3
    assert choose_share([{"share": 0.5, "ok": False}]) is None


class FakeCgroup(MemoryCgroup):
    """A cgroup directory in tmp_path: its files are plain files, removed before the directory."""

    joined: dict[str, str] = {}

    def remove(self) -> None:
        self.joined[self.path.name] = self.procs_file.read_text() if self.procs_file.exists() else ""
        for f in self.path.iterdir():
            f.unlink()
        super().remove()


def _sweep_args(**kw: object) -> argparse.Namespace:
    base = dict(cgroup_limit_mb=4096.0, context_tokens=256, warmup_tokens=4, decode_tokens=3, repeats=2,
                device="cpu", io_threads=2, cache_policy="lru-layer", temperature=1.0)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_sweep_rows_run_in_their_cgroups(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), model)
    root = _fake_root(tmp_path)
    made: list[MemoryCgroup] = []
    joined: dict[str, str] = {}

    def make(r: Path, name: str, limit: int) -> MemoryCgroup:
        cg = FakeCgroup.create(r, name, limit)
        cg.joined = joined
        (cg.path / "memory.oom_control").write_text("oom_kill 0\n")
        (cg.path / "memory.max_usage_in_bytes").write_text(str(limit))
        made.append(cg)
        return cg

    r = run_cgroup_sweep(_sweep_args(), model, [0.0, 1.0], root=root, make_cgroup=make)
    none, everything = r["rows"]
    assert none["ok"] and everything["ok"], (none.get("stderr_tail"), everything.get("stderr_tail"))
    assert len(made) == 2 and len(set(joined.values())) == 2  # one cgroup per row, each joined by its own process
    for cg in made:
        assert joined[cg.path.name].isdigit() and not cg.path.exists()
    assert none["cache_bytes"] == 0 and none["hit_rate"] == 0.0
    assert everything["cache_bytes"] > 0 and everything["hit_rate"] > 0.5
    assert 0 < everything["cache_bytes"] <= everything["spare_bytes"]
    # the spare is the limit less the fixed part, whose runtime share each process measures itself
    assert none["spare_bytes"] == pytest.approx(everything["spare_bytes"], rel=0.05) and none["spare_bytes"] > 0
    assert everything["fixed_bytes"] + everything["spare_bytes"] == 4096 * 2**20
    for row in r["rows"]:
        assert row["tokens"] == 2 * 3  # 2 prompts x 3 tokens (the first comes with the prefill)
        assert row["requested_bytes_per_token"] >= 0 and row["disk_bytes_per_token"] >= 0
        assert row["peak_rss_bytes"] > 0 and row["cgroup_max_usage_bytes"] == 4096 * 2**20
    assert none["requested_bytes_per_token"] > everything["requested_bytes_per_token"]
    assert r["chosen_share"] in (0.0, 1.0)
    table = format_cgroup_sweep(r)
    assert "cgroup sweep:" in table and "Mac ms" in table and "lowest at share" in table
    json.dumps(r)  # the bench writes it as JSON


def test_failed_row_is_reported_not_raised(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("qwen3_moe", 4)
    root = _fake_root(tmp_path)
    # a limit below the model's fixed part: the row's load refuses it (as the OOM killer would end it)
    r = run_cgroup_sweep(_sweep_args(cgroup_limit_mb=8.0), model, [0.5], root=root, make_cgroup=FakeCgroup.create)
    (row,) = r["rows"]
    assert not row["ok"] and row["returncode"] != 0 and "memory-limit-mb" in row["stderr_tail"]
    assert "failed" in format_cgroup_sweep(r) and r["chosen_share"] is None


def test_bench_refuses_without_cgroups_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(bench_module, "memory_cgroup_root", lambda: memory_cgroup_root(platform="darwin"))
    rc = cli_main(["bench", "--preset", "tiny", "--work-dir", str(tmp_path), "--cache-sweep", "0,0.5",
                   "--cgroup-limit-mb", "1024"])  # fmt: skip
    assert rc == 2
    assert "Linux-only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was built
