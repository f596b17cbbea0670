"""The family table's rows for families that do not stream, and its writer (engine/diagnostics/
family_table.py): why each is refused or untested, in one line, and ``--check`` / write on files of
the test's own (never the repository's README)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import engine.demo.family_configs as family_configs
import engine.model.discovery as discovery
import engine.model.family_support as family_support
from engine.diagnostics import family_table
from engine.diagnostics.family_table import END, START, classify, replace_section
from engine.errors import UnsupportedModelError


def _family(monkeypatch: pytest.MonkeyPatch, *, missing: list[str] | None = None, banks: Any = None) -> None:
    monkeypatch.setattr(family_configs, "tiny_config", lambda family: {"model_type": family})
    monkeypatch.setattr(family_configs, "missing_fields", lambda config: missing or [])

    def banks_of_config(config: dict[str, Any]) -> Any:
        if isinstance(banks, BaseException):
            raise banks
        return banks

    monkeypatch.setattr(discovery, "banks_of_config", banks_of_config)


def test_a_family_without_a_tiny_config_is_untested_naming_the_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    _family(monkeypatch, missing=["num_experts", "moe_topk"])
    assert classify("odd") == {"status": "untested", "detail": "no tiny config: fields num_experts, moe_topk unset"}


def test_a_family_the_loader_refuses_is_refused_with_the_loaders_words(monkeypatch: pytest.MonkeyPatch) -> None:
    _family(monkeypatch, banks=UnsupportedModelError("experts are not stacked per layer " + "x" * 300))
    row = classify("odd")
    assert row["status"] == "refused" and row["detail"].startswith("experts are not stacked per layer")
    assert len(row["detail"]) == 160 and row["detail"].endswith("...")  # one line for the table


def test_a_family_that_cannot_run_here_is_untested_with_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    _family(monkeypatch, banks=UnsupportedModelError("cannot trace the model (RuntimeError: [metal_kernel] No Metal back-end.)"))
    assert classify("odd") == {
        "status": "untested", "detail": "mlx-lm cannot run its tiny model here: RuntimeError: [metal_kernel] No Metal back-end.",
    }  # fmt: skip
    _family(monkeypatch, banks=ValueError("hidden_size must divide\nby heads"))
    assert classify("odd") == {"status": "untested", "detail": "tiny model not buildable: ValueError: hidden_size must divide by heads"}
    _family(monkeypatch, banks=[])
    assert classify("odd") == {"status": "untested", "detail": "the tiny config builds no routed expert bank"}


def test_a_streaming_row_names_its_banks_and_k(monkeypatch: pytest.MonkeyPatch) -> None:
    class SwitchGLU:
        pass

    _family(monkeypatch, banks=[SimpleNamespace(module=SwitchGLU(), k=8)] * 3)
    assert classify("odd") == {"status": "streams", "detail": "3 routed banks (SwitchGLU), K=8"}


def test_a_readme_without_the_section_gets_it_appended() -> None:
    section = f"{START}\n| table |\n{END}"
    assert replace_section("# MoeBar\n\ntext\n", section) == f"# MoeBar\n\ntext\n\n## Model families\n\n{section}\n"
    assert replace_section(f"a\n{START}\nold\n{END}\nb\n", section) == f"a\n{section}\nb\n"


TABLE = {"mlx_lm": "0.0.1", "families": {"qwen3_moe": {"status": "streams", "detail": "4 routed banks"},
                                         "odd": {"status": "refused", "detail": "a | b"}}, "aliases": {}}  # fmt: skip


def test_main_writes_then_checks_the_table_and_the_readme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme, table_path = tmp_path / "README.md", tmp_path / "family_support.json"
    readme.write_text("# MoeBar\n")
    monkeypatch.setattr(family_table, "README", readme)
    monkeypatch.setattr(family_support, "TABLE_PATH", table_path)
    monkeypatch.setattr(family_table, "build_table", lambda: json.loads(json.dumps(TABLE)))
    assert family_table.main(["--check"]) == 1
    assert "family table is stale" in capsys.readouterr().out
    assert family_table.main([]) == 0
    assert "{'streams': 1, 'refused': 1, 'untested': 0}" in capsys.readouterr().out
    assert json.loads(table_path.read_text()) == TABLE
    text = readme.read_text()
    assert "| `odd` | refused | a / b |" in text and "1 stream token-exactly" in text
    assert family_table.main(["--check"]) == 0
    assert capsys.readouterr().out.strip() == "family table is current"
