"""`moebar-engine` commands' output paths the other tests do not take: the plan as text, pack's
progress bar, and generate on a follower rank (silent but for its last JSON line) and with the
end-of-sequence token (never printed as text)."""

from __future__ import annotations

import json
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scripted_engine import NO_TOKEN, ScriptedEngine, load_tokenizer

from engine.cli import main
from engine.types import GenerationStats, StepFigures, TokenEvent


def test_plan_as_text_names_the_family_first(tiny_model: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny_model("qwen3_moe", 4)), "--samples", "4", "--memory-limit-mb", "4096"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("family: ") and rest.strip()
    assert not rest.lstrip().startswith("{")  # the description, not JSON


def test_pack_shows_its_progress_on_stderr_and_prints_the_layout(tiny_model: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from engine.model.loader import inspect_experts

    model = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), model)
    layers = len(inspect_experts(model).layers)
    assert main(["pack", str(model)]) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()).exists() and Path(out.strip()).is_relative_to(model)
    assert f"] {layers}/{layers} layers, " in err and "GB/s" in err  # the bar reached the end
    assert err.endswith("\n")  # the progress line is ended, so what follows starts a line of its own


class _RankEngine(ScriptedEngine):
    """A scripted engine as Engine.load returns it, on rank `rank` of 2; its generation ends with
    the end-of-sequence token, or (``cancelled``) with rank 0's agreed stop."""

    def __init__(self, rank: int, cancelled: bool) -> None:
        super().__init__(load_tokenizer("qwen3"), ["four words of answer"])
        self.parallel = types.SimpleNamespace(rank=rank, size=2, collectives=7) if rank >= 0 else None
        self.cancelled = cancelled

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def generate(self, prompt_tokens: Any, sampling: Any, *args: Any, **kwargs: Any) -> Iterator[TokenEvent]:
        for ev in super().generate(prompt_tokens, sampling):
            if self.cancelled and ev.token in self.eos_token_ids:
                yield TokenEvent(NO_TOKEN, StepFigures(), ev.stats, "cancelled")
                return
            yield ev


def _generate(monkeypatch: pytest.MonkeyPatch, engine: _RankEngine, *extra: str) -> int:
    from engine.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: engine))
    return main(["generate", "/scripted", "--prompt", "hi", *extra])


def test_a_follower_rank_prints_only_its_last_json_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    engine = _RankEngine(rank=1, cancelled=False)
    assert _generate(monkeypatch, engine, "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    final = json.loads(line)
    assert (final["rank"], final["ranks"], final["collectives"]) == (1, 2, 7)
    eos = next(iter(engine.eos_token_ids))
    answer = engine.tokenizer.encode("four words of answer", add_special_tokens=False)
    assert final["tokens"] == [*answer, eos] and final["stats"]["generated_tokens"] == len(answer) + 1
    assert engine.closed


def test_rank_0_prints_the_text_without_the_end_token_and_stops_where_it_was_stopped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _generate(monkeypatch, _RankEngine(rank=0, cancelled=False)) == 0
    out = capsys.readouterr().out
    assert out == "four words of answer\n"  # the end-of-sequence token is not text
    assert _generate(monkeypatch, _RankEngine(rank=0, cancelled=True), "--json") == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert "".join(l["text"] for l in lines[:-1]) == "four words of answer"
    assert lines[-1]["rank"] == 0 and len(lines[-1]["tokens"]) == len(lines) - 1  # the stop event is no token


def test_one_process_has_no_rank_fields(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert _generate(monkeypatch, _RankEngine(rank=-1, cancelled=False), "--json") == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(final) == {"stats"} and GenerationStats().to_dict().keys() <= final["stats"].keys()
