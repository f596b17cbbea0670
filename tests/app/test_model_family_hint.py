"""The Model dialog says whether a folder's MoE family streams before any plan or load runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.main import MoeBarApp




@pytest.mark.parametrize(
    ("model_type", "shown"),
    [
        ("kimi_k2", "deepseek_v3: its MoE models stream"),  # mlx-lm loads kimi_k2 as deepseek_v3
        ("gpt_oss", "gpt_oss: its MoE models stream"),
        ("llama", "llama: not an MoE family of the installed mlx-lm"),
    ],
)
def test_the_family_line_comes_before_the_plan(qtbot: Any, moebar: MoeBarApp, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, model_type: str, shown: str) -> None:
    from app.ui.model_dialog import ModelDialog

    started: list[Path] = []
    monkeypatch.setattr("app.ui.model_dialog.plan_op", lambda parent, folder, *rest: started.append(folder))
    folder = tmp_path / "some-model"
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    dialog = ModelDialog(moebar.settings, moebar.models, moebar.window)
    qtbot.addWidget(dialog)
    dialog.folder_radio.setChecked(True)
    dialog.folder_edit.setText(str(folder))
    dialog.folder_edit.editingFinished.emit()
    assert started[-1] == folder  # the plan was only started: the line comes from config.json alone
    assert f"Model family: <b>{shown}" in dialog.plan_view.text()
