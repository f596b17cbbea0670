"""The Model dialog's list of catalogue models: size, what each would do on this machine, and
whether it is already downloaded (all offline)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from app.catalogue import CatalogueError, CatalogueModel, Verdict, download_state, load_catalogue, verdict
from app.ops import BackgroundOp, OpContext
from app.qt import Qt, QtWidgets, Signal, Slot
from app.ui.format import human_bytes
from app.ui.model_download import download_dir_for, free_bytes

log = logging.getLogger(__name__)

STATE_TEXT = {"downloaded": "downloaded", "partial": "partly downloaded", "none": ""}
DISK_PROBE_BYTES = 256 * 2**20  # written once per session and read back cold, in 4 MiB blocks
_session_disk_rate: float | None = None  # the last measurement, kept while the app runs


def session_disk_rate() -> float | None:
    """The disk read rate measured earlier in this session (None before the first measurement)."""
    return _session_disk_rate


def measure_disk_rate(folder: Path, size: int = DISK_PROBE_BYTES) -> float:
    """Write a scratch file of `size` bytes in `folder` and read it back bypassing the page cache (bytes/s).

    Expert reads of the catalogue's models are 1.7-10.6 MB each, so the rate is measured with
    4 MiB blocks (a small model's own expert reads would understate the disk).
    """
    from engine.platform_info import measure_cold_read_speed

    global _session_disk_rate
    folder.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(4 * 2**20)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".disk-probe-", delete=False) as handle:
        probe = Path(handle.name)
        try:
            for _ in range(max(1, size // len(chunk))):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError:
            probe.unlink(missing_ok=True)
            raise
    try:
        rate = measure_cold_read_speed(probe, block_bytes=4 * 2**20, threads=4, total_bytes=size)
    finally:
        probe.unlink(missing_ok=True)
    _session_disk_rate = rate
    return rate


@dataclass(frozen=True)
class MachineFacts:
    """What the verdicts are computed from."""

    ram_available: int
    free_disk: int
    disk_read_bytes_per_s: float | None


def machine_facts(download_root: Path, disk_read_bytes_per_s: float | None) -> MachineFacts:
    """RAM available now, free disk where downloads go, and the disk rate last measured."""
    return MachineFacts(int(psutil.virtual_memory().available), free_bytes(download_root), disk_read_bytes_per_s)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (what a partial download already has)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


class CatalogueView(QtWidgets.QWidget):
    """The catalogue as a table with one button: get (download if needed) and load the chosen model."""

    get_requested = Signal(object)  # CatalogueModel

    def __init__(self, facts: MachineFacts, models: list[CatalogueModel] | None = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.facts = facts
        self.problem = ""
        if models is None:
            try:
                models = load_catalogue()
            except CatalogueError as exc:
                models, self.problem = [], str(exc)
        self.models = models
        self.verdicts: dict[str, Verdict] = {}
        self.table = QtWidgets.QTreeWidget(self)
        self.table.setObjectName("catalogueTable")
        self.table.setRootIsDecorated(False)
        self.table.setHeaderLabels(["Model", "Download", "On this computer", ""])
        self.table.setWordWrap(True)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.table.itemDoubleClicked.connect(lambda *_: self._on_get())
        self.get_button = QtWidgets.QPushButton("Download and load", self)
        self.get_button.setEnabled(False)
        self.get_button.clicked.connect(self._on_get)
        self.detail = QtWidgets.QLabel(self)
        self.detail.setObjectName("figuresLabel")
        self.detail.setWordWrap(True)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.detail, 1)
        row.addWidget(self.get_button, 0, Qt.AlignmentFlag.AlignTop)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        layout.addLayout(row)
        layout.addStretch(1)
        self.refresh()

    def refresh(self) -> None:
        """Recompute each model's verdict and download state and redraw the table."""
        selected = self.selected()
        self.table.clear()
        for model in self.models:
            folder = download_dir_for(model.repo)
            state = download_state(folder)
            have = model.download_bytes if state == "downloaded" else folder_bytes(folder)
            v = verdict(model, self.facts.ram_available, self.facts.free_disk, have, self.facts.disk_read_bytes_per_s)
            self.verdicts[model.repo] = v
            item = QtWidgets.QTreeWidgetItem([model.name, human_bytes(model.download_bytes), v.text, STATE_TEXT[state]])
            item.setData(0, Qt.ItemDataRole.UserRole, model.repo)
            item.setToolTip(0, f"{model.repo}: {model.summary}")
            item.setToolTip(2, v.text)
            self.table.addTopLevelItem(item)
            if selected is not None and selected.repo == model.repo:
                item.setSelected(True)
        header = self.table.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QtWidgets.QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(3, QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        rows = max(1, self.table.topLevelItemCount())
        row_height = self.table.sizeHintForRow(0) if self.table.topLevelItemCount() else 20
        self.table.setMaximumHeight(header.sizeHint().height() + rows * max(18, row_height) + 8)
        if self.problem:
            self.detail.setText(self.problem)
        self._on_selection()

    def measure_disk_if_unknown(self, folder: Path) -> None:
        """Measure the disk in the background when no rate is known yet, then redraw the verdicts."""
        if self.facts.disk_read_bytes_per_s is not None or self.facts.free_disk < 2 * DISK_PROBE_BYTES:
            return

        def work(ctx: OpContext) -> float:
            return measure_disk_rate(folder)

        def measured(rate: float) -> None:
            self.facts = replace(self.facts, disk_read_bytes_per_s=rate)
            self.refresh()

        def failed(error: BaseException) -> None:
            log.warning("could not measure the disk for the catalogue: %s", error)

        BackgroundOp(self, work, measured, failed).run()

    def selected(self) -> CatalogueModel | None:
        """The model chosen in the table."""
        items = self.table.selectedItems()
        if not items:
            return None
        repo = items[0].data(0, Qt.ItemDataRole.UserRole)
        return next((m for m in self.models if m.repo == repo), None)

    def select(self, repo: str) -> None:
        """Select the row of `repo`."""
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            if item is not None and item.data(0, Qt.ItemDataRole.UserRole) == repo:
                self.table.setCurrentItem(item)

    def set_busy(self, busy: bool) -> None:
        """While a download runs the button is off (the dialog's Cancel stops it)."""
        self.table.setEnabled(not busy)
        self._on_selection(busy)

    @Slot()
    def _on_selection(self, busy: bool = False) -> None:
        model = self.selected()
        if model is None:
            self.get_button.setEnabled(False)
            if not self.problem:
                self.detail.setText("Choose a model: its size and what it would do on this computer are shown.")
            return
        v = self.verdicts[model.repo]
        state = download_state(download_dir_for(model.repo))
        self.get_button.setText("Load" if state == "downloaded" else "Download and load")
        self.get_button.setEnabled(not busy and (v.kind != "needs_disk" or state == "downloaded"))
        self.detail.setText(f"{model.repo} — {model.summary} {human_bytes(model.dense_bytes)} stays in RAM, "
                            f"{human_bytes(model.expert_bytes_total)} of experts; {v.text}.")

    @Slot()
    def _on_get(self) -> None:
        model = self.selected()
        if model is not None and self.get_button.isEnabled():
            self.get_requested.emit(model)
