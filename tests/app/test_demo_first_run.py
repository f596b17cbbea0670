"""The first run's demo model, built for real by the app's child process (other app tests fake it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import app.ui.model_manager as model_manager
from engine.demo.demo_model import DEMO_BUILD_VERSION, is_random_weight_model


def test_first_run_builds_a_demo_model_that_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEBAR_HOME", str(tmp_path))
    path = model_manager.build_demo_model()
    assert path == tmp_path / "data" / "models" / f"demo-tiny-v{DEMO_BUILD_VERSION}"
    assert is_random_weight_model(path)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert model_manager.build_demo_model() == path  # the second run finds it
    assert (path / "config.json").stat().st_mtime_ns == stamp

    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        prompt = engine.tokenizer.encode("Hello", add_special_tokens=False)
        events = list(engine.generate(prompt, SamplingParams(max_tokens=4)))
    finally:
        engine.close()
    assert events and all(e.token >= 0 for e in events)


def test_a_failed_demo_build_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = [sys.executable, "-c", "import sys; print('building', file=sys.stderr); sys.exit('No space left on device')"]
    monkeypatch.setattr(model_manager, "engine_python_command", lambda *args: failing)
    with pytest.raises(RuntimeError, match="^The demo model could not be built: No space left on device$"):
        model_manager.build_demo_model()
