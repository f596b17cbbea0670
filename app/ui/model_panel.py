"""The right-hand column: the loaded model, its memory plan, and the live gauges."""

from __future__ import annotations

from typing import Any

from app.qt import Qt, QtWidgets, Signal
from app.ui.format import human_bytes, human_rate
from app.ui.gauges import GaugesPanel
from app.ui.theme import LIGHT, Theme
from engine.serving.protocol import LoadedEvent


def plan_lines(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows describing a memory plan from `moebar-engine plan --json` or `loaded`."""
    rows: list[tuple[str, str]] = []
    if "dense_bytes" in plan:
        rows.append(("Resident (dense weights)", human_bytes(plan["dense_bytes"])))
    if "expert_bytes_total" in plan:
        rows.append(("Streamed from disk (experts)", human_bytes(plan["expert_bytes_total"])))
    if plan.get("expert_bytes_per_token"):
        rows.append(("Expert bytes per token", human_bytes(plan["expert_bytes_per_token"])))
    if "cache_budget_bytes" in plan:
        rows.append(("Expert cache", cache_text(plan)))
    if plan.get("memory_limit_bytes"):
        rows.append(("Memory limit", f"{human_bytes(plan['memory_limit_bytes'])} "
                                     f"(planned use {human_bytes(plan.get('footprint_bytes', 0))})"))
    if plan.get("page_cache_reserve_bytes"):
        rows.append(("Left to the OS page cache", human_bytes(plan["page_cache_reserve_bytes"])))
    if plan.get("ram_available_bytes"):
        rows.append(("RAM available", human_bytes(plan["ram_available_bytes"])))
    if plan.get("disk_read_bytes_per_s"):
        rows.append(("Disk read speed", human_rate(plan["disk_read_bytes_per_s"])))
    if plan.get("tps_bound_cold"):
        rows.append(("Disk-bound speed", f"up to {plan['tps_bound_cold']:.1f} tok/s (with no expert cached)"))
    k, trained = plan.get("experts_per_token"), plan.get("trained_experts_per_token")
    if k and trained and k < trained:
        rows.append(("Quality warning", f"K={k} is below the trained {trained}: answers may degrade"))
    if plan.get("fits_in_ram"):
        rows.append(("Note", "the whole model fits in RAM; streaming is optional"))
    if plan.get("family_support"):
        family, sep, support = str(plan["family_support"]).partition(": ")
        rows.append(("Model family", f"{family} ({support})" if sep else family))
    return rows


def cache_text(plan: dict[str, Any]) -> str:
    """The expert cache as shown everywhere (Model dialog and side panel): its size and why."""
    size = human_bytes(plan["cache_budget_bytes"])
    mode = {"auto": "automatic", "user": "set in Settings", "limit": "under the memory limit"}.get(
        str(plan.get("cache_mode", "")), "")
    reason = str(plan.get("cache_reason", "")).strip()
    if mode and reason:
        return f"{size} ({mode}: {reason})"
    return f"{size} ({mode})" if mode else size


def split_detail(value: str) -> tuple[str, str]:
    """A plan value's figure and its explanation: "20.0 GB (automatic: ...)" -> ("20.0 GB", "automatic: ...").

    The side panel's value column is narrow; the figure stays beside its label and the
    explanation gets the panel's whole width beneath it.
    """
    head, sep, tail = value.partition(" (")
    if not sep or not tail.endswith(")") or not head:
        return value, ""
    return head, tail[:-1]


class ModelPanel(QtWidgets.QFrame):
    """Shows what is loaded and how it streams, above the gauges."""

    change_model_requested = Signal()

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("modelPanel")
        self.name_label = QtWidgets.QLabel("No model loaded", self)
        self.name_label.setObjectName("modelName")
        self.name_label.setWordWrap(True)
        self.facts_label = QtWidgets.QLabel(self)
        self.facts_label.setObjectName("modelFacts")
        self.facts_label.setWordWrap(True)
        self.note_label = QtWidgets.QLabel(self)
        self.note_label.setObjectName("statusLabel")
        self.note_label.setProperty("status", "stopped")
        self.note_label.setWordWrap(True)
        self.note_label.hide()
        self.plan_form = QtWidgets.QFormLayout()
        self.plan_form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft)
        self.plan_form.setHorizontalSpacing(10)
        self.plan_form.setVerticalSpacing(2)
        self.change_button = QtWidgets.QPushButton("Change model…", self)
        self.change_button.clicked.connect(self.change_model_requested)
        self.load_progress = QtWidgets.QProgressBar(self)
        self.load_progress.setRange(0, 100)
        self.load_progress.setTextVisible(True)
        self.load_progress.hide()
        self.gauges = GaugesPanel(theme, self)
        gauges_title = QtWidgets.QLabel("Live", self)
        gauges_title.setObjectName("sectionTitle")
        plan_title = QtWidgets.QLabel("Memory plan", self)
        plan_title.setObjectName("sectionTitle")
        # The rows live in a scroll area: a full plan, the gauges and the MLX memory line are
        # taller than a small window, and cut-off rows would hide the figures the user came for.
        self.scroll = QtWidgets.QScrollArea(self)
        self.scroll.setObjectName("modelPanelScroll")
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = QtWidgets.QWidget(self.scroll)
        content.setObjectName("modelPanelContent")
        self.scroll.setWidget(content)
        self.scroll.viewport().setAutoFillBackground(False)
        content.setAutoFillBackground(False)
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        layout = QtWidgets.QVBoxLayout(content)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.setSpacing(6)
        layout.addWidget(self.name_label)
        layout.addWidget(self.facts_label)
        layout.addWidget(self.note_label)
        layout.addWidget(self.load_progress)
        layout.addWidget(plan_title)
        layout.addLayout(self.plan_form)
        layout.addWidget(self.change_button)
        layout.addSpacing(8)
        layout.addWidget(gauges_title)
        layout.addWidget(self.gauges)
        layout.addStretch(1)

    def show_model(self, event: LoadedEvent) -> None:
        """Show a freshly loaded model and its plan."""
        self.load_progress.hide()
        self.name_label.setText(event.name)
        self.name_label.setToolTip(event.model_dir)
        facts = [event.model_type]
        if event.num_layers:
            facts.append(f"{event.num_layers} layers")
        if event.num_experts:
            facts.append(f"{event.num_experts} experts, {event.experts_per_token} per token")
        if event.load_s:
            facts.append(f"loaded in {event.load_s:.1f} s")
        self.facts_label.setText(" · ".join(facts))
        self.show_plan(event.plan)

    def set_note(self, text: str) -> None:
        """A remark about the model (e.g. that the demo model has random weights); "" hides it."""
        self.note_label.setText(text)
        self.note_label.setVisible(bool(text))

    def show_plan(self, plan: dict[str, Any]) -> None:
        """Fill the memory plan rows."""
        while self.plan_form.rowCount():
            self.plan_form.removeRow(0)
        for label, value in plan_lines(plan):
            figure, detail = split_detail(value)
            value_label = QtWidgets.QLabel(figure, self)
            value_label.setWordWrap(True)
            self.plan_form.addRow(f"{label}:", value_label)
            if detail:
                detail_label = QtWidgets.QLabel(detail, self)
                detail_label.setObjectName("planDetail")
                detail_label.setWordWrap(True)
                self.plan_form.addRow(detail_label)

    def show_loading(self, stage: str, fraction: float) -> None:
        """Show load progress."""
        self.load_progress.show()
        self.load_progress.setValue(int(fraction * 100))
        self.load_progress.setFormat(f"{stage} %p%")

    def show_unloaded(self, text: str) -> None:
        """No model: say why (e.g. 'Restarting the engine…')."""
        self.load_progress.hide()
        self.set_note("")  # a note belonged to the model that is gone
        self.name_label.setText(text)
        self.name_label.setToolTip("")
        self.facts_label.setText("")
        self.show_plan({})
