"""A long prompt shows how far it has been read (instead of a silent "writing…"), and Stop works then."""

from __future__ import annotations

from app.ui.format import prefill_note, time_left
from engine.serving.protocol import PrefillEvent


def _answer(controller):
    return [e for e in controller.entries if e.role == "assistant"][-1]


def test_prefill_note_names_share_tokens_layer_bytes_and_time_left() -> None:
    ev = PrefillEvent(id="r", tokens_total=4096, layers_total=60, layers_done=12, fraction=0.2,
                      bytes_read=840_000_000, elapsed_s=10.0, seconds_left=40.0)
    assert prefill_note(ev) == "reading the prompt 20% · 4,096 tokens · layer 13/60 · 840.0 MB read · about 40 s left"
    two = PrefillEvent(id="r", tokens_total=9000, layers_total=4, layers_done=4, passes_total=3, pass_index=2,
                       fraction=1.0, seconds_left=0.0)
    assert prefill_note(two) == "reading the prompt 100% · 9,000 tokens · layer 4/4 of pass 3/3"
    assert time_left(130) == "about 2 min 10 s" and time_left(120) == "about 2 min" and time_left(0.2) == "about 1 s"


def test_progress_shows_until_the_first_words_then_goes(qtbot, main_window) -> None:
    controller = main_window.controller
    seen: list[str] = []
    controller.bridge.prefill.connect(lambda ev: seen.append(
        main_window.chat_view.widget_for(_answer(controller).key).status_label.text()))
    controller.send("longprompt")
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    answer = _answer(controller)
    assert answer.content == "Read it." and answer.status == "complete" and answer.note == ""
    shown = [s for s in seen if s.startswith("reading the prompt")]
    assert shown, seen  # the label showed the progress while the prompt was read
    widget = main_window.chat_view.widget_for(answer.key)
    assert "reading the prompt" not in widget.status_label.text()


def test_stop_during_the_prefill_ends_the_answer_as_stopped(qtbot, app_parts) -> None:
    controller = app_parts
    controller.send("longprompt")
    qtbot.waitUntil(lambda: _answer(controller).note.startswith("reading the prompt"), timeout=10_000)
    controller.stop()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    answer = _answer(controller)
    assert answer.status == "stopped" and answer.content == "" and answer.note == "you pressed Stop"
