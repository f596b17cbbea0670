"""An inline card for one tool call: full arguments, approval, running, then the result."""

from __future__ import annotations

import html
import json

from app.mcp.names import split_public_name
from app.qt import Qt, QtWidgets, Signal, Slot
from app.ui.conversation import ToolState
from app.ui.safe_text import button_text, plain_label
from engine.serving.protocol import ToolCall

STATE_TEXT: dict[ToolState, str] = {
    "awaiting": "Waiting for your approval",
    "running": "Running…",
    "done": "Done",
    "error": "Failed",
    "denied": "Denied",
}


class ToolCallCard(QtWidgets.QFrame):
    """Shows what a tool call will do and asks before it runs; the result stays collapsed."""

    approved = Signal(str)  # call_id
    always_approved = Signal(str, str)  # call_id, tool name
    denied = Signal(str)  # call_id

    def __init__(self, call: ToolCall, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.call = call
        self._state: ToolState = "awaiting"
        self.setObjectName("toolCard")
        self.setFrameShape(QtWidgets.QFrame.Shape.StyledPanel)

        # The name is the model's: escaped, so a name like <img src=...> is shown, not loaded.
        mcp = split_public_name(call.name)  # an MCP server's tool: say which server it belongs to
        shown_name = f"<b>{html.escape(mcp[1])}</b> from the MCP server <b>{html.escape(mcp[0])}</b>" if mcp \
            else f"<b>{html.escape(call.name)}</b>"
        title = QtWidgets.QLabel(f"Tool call: {shown_name}", self)
        title.setTextFormat(Qt.TextFormat.RichText)
        title.setObjectName("toolTitle")
        self.state_label = plain_label(QtWidgets.QLabel(self))
        self.state_label.setObjectName("toolState")
        header = QtWidgets.QHBoxLayout()
        header.addWidget(title)
        header.addStretch(1)
        header.addWidget(self.state_label)

        self.arguments_view = QtWidgets.QPlainTextEdit(self)
        self.arguments_view.setObjectName("toolArguments")
        self.arguments_view.setReadOnly(True)
        self.arguments_view.setPlainText(json.dumps(call.arguments, indent=2, ensure_ascii=False))
        lines = self.arguments_view.toPlainText().count("\n") + 1
        metrics = self.arguments_view.fontMetrics()
        # Every argument visible without scrolling up to 12 lines; longer ones scroll.
        self.arguments_view.setFixedHeight((min(12, lines) + 1) * metrics.lineSpacing() + 16)

        self.approve_button = QtWidgets.QPushButton("Approve", self)
        self.approve_button.setObjectName("approveButton")
        always = f"Always allow {mcp[1]} from {mcp[0]}" if mcp else f"Always allow {call.name}"
        self.always_button = QtWidgets.QPushButton(button_text(always), self)
        self.deny_button = QtWidgets.QPushButton("Deny", self)
        self.approve_button.clicked.connect(self._on_approve)
        self.always_button.clicked.connect(self._on_always)
        self.deny_button.clicked.connect(self._on_deny)
        self._buttons = QtWidgets.QWidget(self)
        buttons = QtWidgets.QHBoxLayout(self._buttons)
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.approve_button)
        buttons.addWidget(self.always_button)
        buttons.addWidget(self.deny_button)
        buttons.addStretch(1)

        self.result_toggle = QtWidgets.QToolButton(self)
        self.result_toggle.setObjectName("resultToggle")
        self.result_toggle.setCheckable(True)
        self.result_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.result_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.result_toggle.toggled.connect(self._on_toggle_result)
        self.result_view = QtWidgets.QPlainTextEdit(self)
        self.result_view.setObjectName("toolResult")
        self.result_view.setReadOnly(True)
        self.result_view.setMaximumHeight(220)

        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(6)
        layout.addLayout(header)
        layout.addWidget(self.arguments_view)
        layout.addWidget(self._buttons)
        layout.addWidget(self.result_toggle)
        layout.addWidget(self.result_view)
        self._show_state()

    def state(self) -> ToolState:
        """The state shown now."""
        return self._state

    def result_text(self) -> str:
        """The result (or error) text held by the card, shown or not."""
        return self.result_view.toPlainText()

    def is_result_expanded(self) -> bool:
        """Whether the result is unfolded."""
        return self.result_toggle.isChecked()

    def set_state(self, state: ToolState, result: str = "") -> None:
        """Show `state`; `result` is the tool's output or the error message."""
        self._state = state
        if state in ("done", "error", "denied"):
            self.result_view.setPlainText(result)
        self._show_state()

    def _show_state(self) -> None:
        state = self._state
        self.state_label.setText(STATE_TEXT[state])
        self.state_label.setProperty("state", state)
        self.state_label.style().unpolish(self.state_label)
        self.state_label.style().polish(self.state_label)
        self._buttons.setVisible(state == "awaiting")
        finished = state in ("done", "error", "denied")
        has_result = finished and bool(self.result_view.toPlainText())
        self.result_toggle.setVisible(has_result)
        size = len(self.result_view.toPlainText())
        self.result_toggle.setText(("Error" if state == "error" else "Result") + f" ({size} characters)")
        self.result_view.setVisible(has_result and self.result_toggle.isChecked())

    @Slot(bool)
    def _on_toggle_result(self, expanded: bool) -> None:
        self.result_toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.result_view.setVisible(expanded)

    @Slot()
    def _on_approve(self) -> None:
        self.approved.emit(self.call.id)

    @Slot()
    def _on_always(self) -> None:
        self.always_approved.emit(self.call.id, self.call.name)

    @Slot()
    def _on_deny(self) -> None:
        self.denied.emit(self.call.id)
