"""Polish seen on screen: headers wrap, the side panel keeps its width, gauges say what they
measure, dark radio buttons show, download errors are one sentence, demo answers are short."""

from __future__ import annotations

from pathlib import Path

from app.bridge import READY
from app.main import DEMO_ANSWER_TOKENS, MoeBarApp
from app.qt import QtGui, QtWidgets
from app.settings import SettingsStore
from app.ui.conversation import ChatEntry
from app.ui.download_panel import download_failure_text
from app.ui.gauges import GAUGE_TIPS
from app.ui.model_download import DownloadError, download_dir_for
from app.ui.model_panel import split_detail
from app.ui.theme import DARK, LIGHT, apply_theme
from engine.serving.protocol import LiveFigures


def test_a_long_header_note_wraps_instead_of_widening_the_message(qtbot, main_window) -> None:
    entry = ChatEntry(role="assistant", content="partial answer", status="interrupted",
                      note="The engine exited unexpectedly (exit code 1): " + "a long reason " * 60)
    main_window.chat_view.add_entry(entry)
    widget = main_window.chat_view.widget_for(entry.key)
    assert widget.minimumSizeHint().width() < 400
    assert widget.status_label.wordWrap()


def test_the_side_panel_keeps_its_width_while_figures_change(qtbot, main_window) -> None:
    main_window.resize(1180, 760)
    qtbot.wait(50)
    before = main_window.splitter.sizes()
    panel = main_window.model_panel
    panel.gauges.set_figures(LiveFigures(decode_tps=123456.7, prompt_tps=9876543.2, ttft_s=12345.6,
                                         engine_read_bps=9.9e12, disk_read_bps=8.8e12, cache_hit_rate=0.999,
                                         rss_bytes=9 * 10**12, resident_bytes=8 * 10**12, cache_saved_bytes=7 * 10**12, pressure_level="critical",
                                         pressure_raw="some avg10=99.00 " * 10))
    panel.gauges._refresh()  # noqa: SLF001 - the timer's tick, without waiting for it
    qtbot.wait(50)  # the layout settles (without the fix the panel grew from 290 to 404 px here)
    assert main_window.splitter.sizes() == before


def test_every_gauge_says_what_it_measures(qtbot, main_window) -> None:
    gauges = main_window.model_panel.gauges
    for key, tip in GAUGE_TIPS.items():
        assert tip and gauges._labels[key].toolTip().startswith(tip)  # noqa: SLF001
    names = [w for w in gauges.findChildren(QtWidgets.QLabel) if w.objectName() == "gaugeName"]
    assert len(names) == len(GAUGE_TIPS) and all(w.toolTip() for w in names)


def indicator_pixels(button: QtWidgets.QAbstractButton, background: str = "#0d1117") -> int:
    """Pixels in the left 20 px of the button (its indicator) that stand out from the dark background."""
    image = button.grab().toImage()
    bg = QtGui.QColor(background)
    count = 0
    for x in range(min(20, image.width())):
        for y in range(image.height()):
            c = image.pixelColor(x, y)
            if abs(c.red() - bg.red()) + abs(c.green() - bg.green()) + abs(c.blue() - bg.blue()) > 90:
                count += 1
    return count


def test_dark_radio_buttons_are_visible(qtbot, qapp) -> None:
    apply_theme(qapp, DARK)
    try:
        box = QtWidgets.QDialog()
        qtbot.addWidget(box)
        off, on = QtWidgets.QRadioButton("Demo model", box), QtWidgets.QRadioButton("A folder", box)
        layout = QtWidgets.QVBoxLayout(box)
        layout.addWidget(off)
        layout.addWidget(on)
        on.setChecked(True)
        box.show()
        qtbot.waitExposed(box)
        # Measured: 62 and 113 with the dark style sheet's indicators, 0 and 32 without them.
        assert indicator_pixels(off) > 40  # the ring of an unchecked button
        assert indicator_pixels(on) > 80  # ring and dot of the checked one
    finally:
        apply_theme(qapp, LIGHT)


def test_download_errors_are_one_clean_sentence(isolated_moebar_home: Path) -> None:
    text = download_failure_text(DownloadError("Could not reach Hugging Face: connection refused."), "o/m")
    assert text == "Could not reach Hugging Face: connection refused."  # nothing downloaded: no "resume"
    folder = download_dir_for("o/m")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    text = download_failure_text(OSError("No space left on device\nmore detail"), "o/m")
    assert text == "Download of o/m failed: No space left on device. Press Download to resume."


def test_demo_answers_stop_at_a_short_length(qtbot, isolated_moebar_home: Path, fake_engine_command: list[str],
                                             tmp_path: Path, monkeypatch) -> None:
    built = tmp_path / "demo-model"
    monkeypatch.setattr("app.ui.model_manager.build_demo_model", lambda: built)
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False)
    try:
        app.start()
        qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
        assert app.controller._sampling().max_tokens == DEMO_ANSWER_TOKENS  # noqa: SLF001
        app.settings.set("max_tokens", 50)  # a shorter setting still wins
        assert app.controller._sampling().max_tokens == 50  # noqa: SLF001
        SettingsStore().set("model_dir", str(tmp_path / "real-model"))
        app.settings.set("model_dir", str(tmp_path / "real-model"))
        qtbot.waitUntil(lambda: app.bridge.model is not None and app.bridge.model.name == "real-model", timeout=10_000)
        app.settings.set("max_tokens", 4096)
        assert app.controller._sampling().max_tokens == 4096  # noqa: SLF001
    finally:
        app.shutdown()
        app.qt_app.setQuitOnLastWindowClosed(False)


def test_search_snippets_are_not_clipped_at_any_width(qtbot, tmp_path: Path) -> None:
    from app.history import HistoryStore
    from app.ui.history_sidebar import HistorySidebar

    store = HistoryStore(tmp_path / "h.sqlite3")
    try:
        conversation = store.create_conversation("Trip planning with a rather long title for the sidebar")
        store.append_message(conversation, "user", "We should pack the umbrella because the forecast in the "
                          "mountains says rain every afternoon, and the umbrella is light enough to carry.")
        apply_theme(QtWidgets.QApplication.instance(), LIGHT)  # its row padding counts
        sidebar = HistorySidebar(store)
        qtbot.addWidget(sidebar)
        sidebar.resize(230, 600)
        sidebar.show()
        sidebar.search_box.setText("umbrella")
        sidebar.refresh()
        for width in (230, 170, 320):
            sidebar.resize(width, 600)
            qtbot.wait(30)
            assert sidebar.list.count() == 1
            item = sidebar.list.item(0)
            label = sidebar.list.itemWidget(item)
            shown = sidebar.list.visualItemRect(item)
            assert shown.right() < sidebar.list.viewport().width(), width  # no text cut off at the right
            assert label.heightForWidth(label.width()) <= label.height(), width  # nor at the bottom
    finally:
        store.close()


def test_action_icons_sit_below_the_text_at_any_width(qtbot, main_window) -> None:
    entry = ChatEntry(role="assistant", content="A reply long enough to wrap over several lines. " * 12,
                      status="interrupted", note="the engine stopped: " + "reason " * 30)
    main_window.chat_view.add_entry(entry)
    widget = main_window.chat_view.widget_for(entry.key)
    for width in (1180, 800, 640):
        main_window.resize(width, 760)
        qtbot.wait(50)
        texts = [w.geometry() for w in (widget.text_view, widget.status_label, widget.figures_label) if w.isVisible()]
        buttons = [b.geometry() for b in (widget.copy_button, widget.regenerate_button, widget.delete_button)
                   if b.isVisible()]
        assert buttons and texts
        assert not any(b.intersects(t) for b in buttons for t in texts), width


FULL_PLAN = {"dense_bytes": 11 * 10**9, "expert_bytes_total": 217 * 10**9, "expert_bytes_per_token": 4 * 10**9,
             "cache_budget_bytes": 20 * 10**9, "cache_mode": "auto",
             "cache_reason": "75% of the spare RAM after the dense weights, KV cache and page-cache reserve",
             "memory_limit_bytes": 40 * 10**9, "footprint_bytes": 36 * 10**9,
             "page_cache_reserve_bytes": 6 * 10**9, "ram_available_bytes": 44 * 10**9,
             "disk_read_bytes_per_s": 5.5e9, "tps_bound_cold": 1.4, "experts_per_token": 10,
             "trained_experts_per_token": 10, "family_support": "qwen3_5_moe: exact against mlx-lm"}


def test_the_side_panel_scrolls_instead_of_squeezing_a_full_plan(qtbot, main_window) -> None:
    panel = main_window.model_panel
    panel.show_plan(FULL_PLAN)
    main_window.resize(1100, 520)  # a small window: the plan and the gauges do not fit its height
    qtbot.wait(100)
    bar = panel.scroll.verticalScrollBar()
    assert bar.maximum() > 0
    gauges = panel.gauges
    assert gauges.height() >= gauges.minimumSizeHint().height()  # rows keep their height, none overlap
    bar.setValue(bar.maximum())
    qtbot.wait(50)
    bottom = gauges.mapTo(panel.scroll.viewport(), gauges.rect().bottomLeft()).y()
    assert bottom <= panel.scroll.viewport().height()  # scrolled down, the last gauge is in view
    main_window.resize(1100, 2000)
    qtbot.wait(100)
    assert bar.maximum() == 0  # room enough: no scrolling


def test_plan_explanations_take_the_panel_width_not_the_value_column(qtbot, main_window) -> None:
    panel = main_window.model_panel
    panel.show_plan(FULL_PLAN)
    main_window.resize(1100, 900)
    qtbot.wait(100)
    form = panel.plan_form
    values = {form.itemAt(row, QtWidgets.QFormLayout.ItemRole.LabelRole).widget().text():
              form.itemAt(row, QtWidgets.QFormLayout.ItemRole.FieldRole).widget()
              for row in range(form.rowCount()) if form.itemAt(row, QtWidgets.QFormLayout.ItemRole.LabelRole)}
    cache = values["Expert cache:"]
    assert cache.text() == "20.0 GB"  # the figure alone beside its label: one line
    assert cache.height() <= cache.fontMetrics().lineSpacing() * 1.5
    details = [form.itemAt(row, QtWidgets.QFormLayout.ItemRole.SpanningRole).widget()
               for row in range(form.rowCount()) if form.itemAt(row, QtWidgets.QFormLayout.ItemRole.SpanningRole)]
    reason = next(label for label in details if label.text().startswith("automatic: "))
    assert reason.width() > cache.width()  # the explanation spans the panel
    assert reason.objectName() == "planDetail"


def test_split_detail_keeps_values_without_an_explanation_whole() -> None:
    assert split_detail("20.0 GB (automatic: 75% of the spare RAM)") == ("20.0 GB", "automatic: 75% of the spare RAM")
    assert split_detail("5.5 GB/s") == ("5.5 GB/s", "")
    assert split_detail("a (b) c") == ("a (b) c", "")  # only a trailing explanation is split off
    assert split_detail(" (x)") == (" (x)", "")
