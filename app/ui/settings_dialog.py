"""Settings: system prompt, sampling, thinking, theme, expert cache and K, approved tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.qt import Qt, QtGui, QtWidgets, Slot
from app.settings import SettingsError, SettingsStore

K_WARNING = (
    "Fewer experts per token than the model was trained with is faster but changes the answers; "
    "below about half the trained value quality collapses."
)


class SettingsDialog(QtWidgets.QDialog):
    """Edits the settings; OK validates and saves them all at once."""

    def __init__(self, settings: SettingsStore, trained_k: int = 0, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("MoeBar Settings")
        self.setObjectName("settingsDialog")
        self.settings = settings
        self._trained_k = trained_k
        self._section_checks: list[Callable[[], str | None]] = []
        s = settings.settings

        self.system_prompt = QtWidgets.QPlainTextEdit(s.system_prompt, self)
        self.system_prompt.setPlaceholderText("Optional instructions sent at the start of every chat")
        self.system_prompt.setFixedHeight(90)
        self.temperature = QtWidgets.QDoubleSpinBox(self)
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.05)
        self.temperature.setValue(s.temperature)
        self.top_p = QtWidgets.QDoubleSpinBox(self)
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(s.top_p)
        self.max_tokens = QtWidgets.QSpinBox(self)
        self.max_tokens.setRange(1, 1_000_000)
        self.max_tokens.setValue(s.max_tokens)
        self.thinking = QtWidgets.QCheckBox("Let the model think before answering (shown collapsed)", self)
        self.thinking.setChecked(s.thinking)
        self.theme = QtWidgets.QComboBox(self)
        for label, value in (("Follow the system", "system"), ("Light", "light"), ("Dark", "dark")):
            self.theme.addItem(label, value)
        self.theme.setCurrentIndex(max(0, self.theme.findData(s.theme)))
        self.quick_ask_shortcut = QtWidgets.QKeySequenceEdit(QtGui.QKeySequence(s.quick_ask_shortcut), self)
        self.quick_ask_shortcut.setObjectName("quickAskShortcut")
        self.quick_ask_shortcut.setMaximumSequenceLength(1)
        self.quick_ask_shortcut.setClearButtonEnabled(True)
        self.quick_ask_shortcut.setToolTip("Press the keys that open Quick Ask from any app; clear to turn it off.")
        self.cache_mb = QtWidgets.QSpinBox(self)
        self.cache_mb.setRange(0, 1 << 22)
        self.cache_mb.setSuffix(" MB")
        self.cache_mb.setSpecialValueText("automatic")
        self.cache_mb.setValue(s.cache_mb)
        self.memory_limit_mb = QtWidgets.QSpinBox(self)
        self.memory_limit_mb.setRange(0, 1 << 22)
        self.memory_limit_mb.setSuffix(" MB")
        self.memory_limit_mb.setSpecialValueText("no limit")
        self.memory_limit_mb.setValue(s.memory_limit_mb)
        self.experts_per_token = QtWidgets.QSpinBox(self)
        self.experts_per_token.setRange(0, 256)
        self.experts_per_token.setSpecialValueText("as trained")
        self.experts_per_token.setValue(s.experts_per_token or 0)
        self.k_warning = QtWidgets.QLabel(K_WARNING, self)
        self.k_warning.setWordWrap(True)
        self.k_warning.setObjectName("statusLabel")
        self.k_warning.setProperty("status", "stopped")
        self.experts_per_token.valueChanged.connect(self._update_k_warning)
        self.cold_mode = QtWidgets.QCheckBox("Cold mode: keep no experts resident (least memory, slowest)", self)
        self.cold_mode.setChecked(s.cold_mode)
        self.record_traces = QtWidgets.QCheckBox(
            "Save each answer's expert routing as a trace (for cache-sim; from the next model load)", self
        )
        self.record_traces.setChecked(s.record_routing_traces)
        self.approved_tools = QtWidgets.QListWidget(self)
        self.approved_tools.addItems(sorted(s.always_approved_tools))
        self.approved_tools.setFixedHeight(70)
        self.forget_tool = QtWidgets.QPushButton("Ask again for the selected tool", self)
        self.forget_tool.clicked.connect(self._forget_selected_tool)
        self.error_label = QtWidgets.QLabel(self)
        self.error_label.setObjectName("statusLabel")
        self.error_label.setProperty("status", "error")
        self.error_label.setWordWrap(True)
        self.error_label.hide()

        form = QtWidgets.QFormLayout()
        form.addRow("System prompt:", self.system_prompt)
        form.addRow("Temperature:", self.temperature)
        form.addRow("Top p:", self.top_p)
        form.addRow("Longest answer:", self.max_tokens)
        form.addRow("", self.thinking)
        form.addRow("Theme:", self.theme)
        form.addRow("Quick Ask shortcut:", self.quick_ask_shortcut)
        form.addRow("Expert cache:", self.cache_mb)
        form.addRow("Memory limit:", self.memory_limit_mb)
        form.addRow("Experts per token:", self.experts_per_token)
        form.addRow("", self.k_warning)
        form.addRow("", self.cold_mode)
        form.addRow("", self.record_traces)
        form.addRow("Always allowed tools:", self.approved_tools)
        form.addRow("", self.forget_tool)
        buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok | QtWidgets.QDialogButtonBox.StandardButton.Cancel, self
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error_label)
        layout.addWidget(buttons, 0, Qt.AlignmentFlag.AlignRight)
        self._update_k_warning()

    def add_section(self, title: str, widget: QtWidgets.QWidget,
                    check: Callable[[], str | None] | None = None) -> QtWidgets.QGroupBox:
        """Add a titled section (a feature's own panel, e.g. MCP servers) above the error line and buttons.

        `check`, if given, says why the section's values cannot be saved (None when they can): OK then
        keeps the dialog open with that reason.
        """
        if check is not None:
            self._section_checks.append(check)
        box = QtWidgets.QGroupBox(title, self)
        QtWidgets.QVBoxLayout(box).addWidget(widget)
        layout = self.layout()
        assert isinstance(layout, QtWidgets.QVBoxLayout)
        layout.insertWidget(layout.indexOf(self.error_label), box)
        return box

    def values(self) -> dict[str, Any]:
        """The settings as edited in the dialog."""
        k = self.experts_per_token.value()
        return {
            "system_prompt": self.system_prompt.toPlainText(),
            "temperature": round(self.temperature.value(), 3),
            "top_p": round(self.top_p.value(), 3),
            "max_tokens": self.max_tokens.value(),
            "thinking": self.thinking.isChecked(),
            "theme": str(self.theme.currentData()),
            "quick_ask_shortcut": self.quick_ask_shortcut.keySequence().toString(
                QtGui.QKeySequence.SequenceFormat.PortableText),
            "cache_mb": self.cache_mb.value(),
            "memory_limit_mb": self.memory_limit_mb.value(),
            "experts_per_token": k or None,
            "cold_mode": self.cold_mode.isChecked(),
            "record_routing_traces": self.record_traces.isChecked(),
            "always_approved_tools": [self.approved_tools.item(i).text() for i in range(self.approved_tools.count())],
        }

    @Slot()
    def accept(self) -> None:
        """Validate and save; stay open with the reason if a value is refused."""
        problem = next((p for p in (check() for check in self._section_checks) if p), None)
        if problem is not None:
            self.error_label.setText(problem)
            self.error_label.show()
            return
        try:
            self.settings.update(self.values())
        except (SettingsError, OSError) as exc:
            self.error_label.setText(str(exc))
            self.error_label.show()
            return
        super().accept()

    @Slot()
    def _forget_selected_tool(self) -> None:
        for item in self.approved_tools.selectedItems():
            self.approved_tools.takeItem(self.approved_tools.row(item))

    @Slot()
    def _update_k_warning(self) -> None:
        k = self.experts_per_token.value()
        self.k_warning.setVisible(bool(k) and (not self._trained_k or k < self._trained_k))
