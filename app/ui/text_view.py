"""A read-only rich-text view that grows to fit its content, for messages and thinking."""

from __future__ import annotations

import html

from app.qt import Qt, QtCore, QtGui, QtWidgets, Signal, Slot
from app.ui.markdown import MarkdownRenderer, copy_link_index

SAFE_LINK_SCHEMES = ("http", "https", "mailto")


class FittedTextView(QtWidgets.QTextBrowser):
    """A QTextBrowser without a vertical scroll bar whose height follows its document.

    Links: ``copy:N`` copies code block N to the clipboard; http(s) and mailto open in the
    system browser; anything else is ignored (model output must not open local files).
    Resources (images, style sheets) are never loaded from anywhere: the renderer emits no
    images, and `loadResource` answers every request with an empty resource, so even markup
    that slipped through could not make Qt read a file, a device or the network.
    """

    code_copied = Signal(int)

    def __init__(self, renderer: MarkdownRenderer, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._renderer = renderer
        self._code_blocks: list[str] = []
        self._source_text = ""
        self.setObjectName("messageText")
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Fixed)
        self.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextBrowserInteraction | Qt.TextInteractionFlag.TextSelectableByKeyboard
        )
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit_height)
        self.anchorClicked.connect(self._on_anchor)
        self.setFixedHeight(self._content_height())

    def source_text(self) -> str:
        """The text last shown (Markdown or plain)."""
        return self._source_text

    def code_blocks(self) -> list[str]:
        """The raw text of each code block of the last Markdown shown."""
        return list(self._code_blocks)

    def set_markdown_text(self, text: str) -> None:
        """Render `text` as Markdown with highlighted code."""
        self._source_text = text
        rendered = self._renderer.render(text)
        self._code_blocks = rendered.code_blocks
        self._set_html_keeping_scroll(rendered.html)

    def set_plain(self, text: str) -> None:
        """Show `text` as-is (user messages, tool output), keeping line breaks."""
        self._source_text = text
        self._code_blocks = []
        escaped = html.escape(text).replace("\n", "<br>")
        self._set_html_keeping_scroll(f'<p style="white-space:pre-wrap;">{escaped}</p>')

    def set_renderer(self, renderer: MarkdownRenderer) -> None:
        """Use another theme's renderer from the next render on."""
        self._renderer = renderer

    def _set_html_keeping_scroll(self, markup: str) -> None:
        bar = self.horizontalScrollBar()
        position = bar.value()
        self.setHtml(markup)
        bar.setValue(position)
        self._fit_height()

    def _content_height(self) -> int:
        margins = self.contentsMargins()
        bar = self.horizontalScrollBar()
        extra = bar.sizeHint().height() if bar.isVisible() else 0
        return int(self.document().size().height()) + margins.top() + margins.bottom() + extra + 2

    @Slot()
    def _fit_height(self, *_: object) -> None:
        height = self._content_height()
        if height != self.height():
            self.setFixedHeight(height)

    def resizeEvent(self, event: QtGui.QResizeEvent) -> None:  # noqa: N802 (Qt override)
        """Re-fit the height when the width (and so the wrapping) changes."""
        super().resizeEvent(event)
        self._fit_height()

    def loadResource(self, kind: int, name: QtCore.QUrl | str) -> object:  # noqa: N802 (Qt override)
        """Load nothing: a blank 1x1 image for images (a null one would make Qt read the path itself),
        empty bytes for anything else."""
        if kind == QtGui.QTextDocument.ResourceType.ImageResource.value:
            image = QtGui.QImage(1, 1, QtGui.QImage.Format.Format_ARGB32)
            image.fill(0)
            return image
        return QtCore.QByteArray()

    def wheelEvent(self, event: QtGui.QWheelEvent) -> None:  # noqa: N802 (Qt override)
        """Let vertical wheel scrolling reach the chat's scroll area."""
        event.ignore()

    @Slot(QtCore.QUrl)
    def _on_anchor(self, url: QtCore.QUrl) -> None:
        index = copy_link_index(url.toString())
        if index is not None:
            if 0 <= index < len(self._code_blocks):
                QtGui.QGuiApplication.clipboard().setText(self._code_blocks[index])
                self.code_copied.emit(index)
            return
        if url.scheme().lower() in SAFE_LINK_SCHEMES:
            QtGui.QDesktopServices.openUrl(url)
