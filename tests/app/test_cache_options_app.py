"""The app's expert-cache options: the hot set kept in the cache folder, routing traces on request."""

from __future__ import annotations

from pathlib import Path

from app.settings import SettingsStore
from app.ui.model_manager import engine_options_from
from app.ui.settings_dialog import SettingsDialog


def test_hot_set_kept_in_the_cache_folder_and_traces_on_request(qtbot, isolated_moebar_home: Path) -> None:
    store = SettingsStore(isolated_moebar_home / "settings.json")
    options = engine_options_from(store.settings)
    assert options.hot_set_dir == str(isolated_moebar_home / "cache" / "hot-experts")
    assert options.trace_dir == ""  # no traces unless asked
    dialog = SettingsDialog(store)
    qtbot.addWidget(dialog)
    assert not dialog.record_traces.isChecked()
    dialog.record_traces.setChecked(True)
    dialog.accept()
    reread = SettingsStore(store.path).settings
    assert reread.record_routing_traces
    assert engine_options_from(reread).trace_dir == str(isolated_moebar_home / "cache" / "routing-traces")
