"""Choosing the model: the demo model, a local folder, or one from the catalogue or Hugging Face
(downloaded, checked, optionally packed, then loaded); the memory plan is shown before anything
is loaded, and a folder whose plan fails is never loaded."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from app.catalogue import CatalogueModel, packing_pays
from app.ops import BackgroundOp, OpContext
from app.qt import QtGui, QtWidgets, Slot
from app.settings import SettingsStore
from app.ui.catalogue_view import machine_facts, session_disk_rate
from app.ui.download_panel import DownloadPanel
from app.ui.format import human_bytes
from app.ui.model_download import DownloadError, download_dir_for, pack_downloaded_model
from app.ui.model_manager import ModelManager, plan_op
from app.ui.model_panel import plan_lines
from engine.model.family_support import folder_support
from engine.storage.packed_layout import PACKED_DIRNAME


class ModelDialog(QtWidgets.QDialog):
    """Pick a model folder (or download one), see its memory plan, then load it."""

    def __init__(self, settings: SettingsStore, manager: ModelManager, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Model")
        self.setObjectName("modelDialog")
        self.resize(720, 720)
        self.settings = settings
        self.manager = manager
        self._plan_op: BackgroundOp[dict[str, Any]] | None = None
        self._plan_ok: Path | None = None  # the folder whose memory plan was read without error
        self._plan_error = ""

        self.demo_radio = QtWidgets.QRadioButton("Demo model (random weights, for trying the app)", self)
        self.folder_radio = QtWidgets.QRadioButton("A model folder on this computer", self)
        self.folder_edit = QtWidgets.QLineEdit(str(settings.get("model_dir")), self)
        self.folder_edit.setPlaceholderText("Folder with config.json and *.safetensors (an mlx-lm model)")
        self.browse_button = QtWidgets.QPushButton("Choose…", self)
        self.browse_button.clicked.connect(self._browse)
        folder_row = QtWidgets.QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.browse_button)
        (self.folder_radio if settings.get("model_dir") else self.demo_radio).setChecked(True)
        self.demo_radio.toggled.connect(self._on_choice_changed)
        self.folder_edit.editingFinished.connect(self._on_choice_changed)

        download_root = download_dir_for("x/x").parent
        self.downloads = DownloadPanel(settings, machine_facts(download_root, session_disk_rate()), self)
        self.downloads.catalogue.measure_disk_if_unknown(download_root)
        self.downloads.downloaded.connect(self._on_downloaded)
        self.downloads.failed.connect(self.error_label_text)
        self.downloads.busy_changed.connect(self._on_download_busy)
        self._load_when_checked: Path | None = None  # a downloaded folder to load once its plan is read
        self._pack: BackgroundOp[Path] | None = None

        self.plan_title = QtWidgets.QLabel("Memory plan", self)
        self.plan_title.setObjectName("sectionTitle")
        self.plan_view = QtWidgets.QLabel(self)
        self.plan_view.setWordWrap(True)
        self.plan_view.setMinimumHeight(110)
        self.error_label = QtWidgets.QLabel(self)
        self.error_label.setObjectName("statusLabel")
        self.error_label.setProperty("status", "error")
        self.error_label.setWordWrap(True)
        buttons = QtWidgets.QDialogButtonBox(self)
        self.load_button = buttons.addButton("Load", QtWidgets.QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(QtWidgets.QDialogButtonBox.StandardButton.Close)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)

        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.demo_radio)
        layout.addWidget(self.folder_radio)
        layout.addLayout(folder_row)
        layout.addWidget(self.downloads)
        layout.addWidget(self.plan_title)
        layout.addWidget(self.plan_view)
        layout.addWidget(self.error_label)
        layout.addStretch(1)
        layout.addWidget(buttons)
        for button in self.findChildren(QtWidgets.QPushButton):
            button.setAutoDefault(False)  # Enter in a text field never presses Load
            button.setDefault(False)
        self._on_choice_changed()

    # ------------------------------------------------------------ choice and plan

    def chosen_dir(self) -> Path | None:
        """The folder to load, or None for the demo model."""
        if self.demo_radio.isChecked():
            return None
        text = self.folder_edit.text().strip()
        return Path(text).expanduser() if text else None

    @Slot()
    def _browse(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Model folder", self.folder_edit.text() or str(Path.home()))
        if folder:
            self.folder_edit.setText(folder)
            self.folder_radio.setChecked(True)
            self._on_choice_changed()

    @Slot()
    def _on_choice_changed(self) -> None:
        folder = self.chosen_dir()
        self.error_label.clear()
        if folder is None or folder != self._plan_ok:
            self._plan_ok, self._plan_error = None, ""
        if folder is None:
            demo = self.manager.demo_dir
            if self.folder_radio.isChecked():
                self.plan_view.setText("Choose a folder to see its memory plan.")
                self.load_button.setEnabled(False)
                return
            if demo is None:
                self.plan_view.setText("The demo model is built on first use (a few MB of random weights).")
                self.load_button.setEnabled(True)
                return
            folder = demo
        if folder == self._plan_ok:
            return  # checked already (editingFinished fires again on focus changes)
        self.load_button.setEnabled(False)  # until the plan says the folder can be loaded
        self.show_plan_for(folder)

    def show_plan_for(self, folder: Path) -> None:
        """Measure and show the plan of `folder` (in the background)."""
        if self._plan_op is not None:
            self._plan_op.cancel()
        # From config.json alone, before anything loads: whether this folder's family streams.
        family = html.escape(folder_support(folder))
        self.plan_view.setText(f"Model family: <b>{family}</b><br>Reading the plan of {html.escape(folder.name)} "
                               "(measures the disk)…")
        self._plan_op = plan_op(self, folder, self.manager.engine_options(),
                                lambda plan: self._show_plan(folder, plan), self._plan_failed)

    def _show_plan(self, folder: Path, plan: dict[str, Any]) -> None:
        self._plan_op = None
        self._plan_ok, self._plan_error = folder, ""
        self.load_button.setEnabled(True)
        rows = plan_lines(plan)
        self.plan_view.setText("<br>".join(f"{label}: <b>{value}</b>" for label, value in rows))
        if self._load_when_checked is not None and folder == self._load_when_checked:
            self._load_when_checked = None
            self.accept()  # the one click of the catalogue: downloaded, checked, now loaded

    def _plan_failed(self, error: BaseException) -> None:
        self._plan_op = None
        self._load_when_checked = None
        self._plan_ok, self._plan_error = None, f"{error} This folder cannot be loaded."
        self.plan_view.setText("")
        self.error_label.setText(self._plan_error)
        self.load_button.setEnabled(False)

    @Slot()
    def accept(self) -> None:
        """Save the choice; the model manager reloads the engine."""
        folder = self.chosen_dir()
        if folder is not None and not (folder / "config.json").is_file():
            self.error_label.setText(f"{folder} has no config.json; choose the folder of an mlx-lm model.")
            return
        if folder is not None and folder != self._plan_ok:
            # A folder is loaded only after its checks passed: a failed load would drop the working model.
            self.error_label.setText(self._plan_error or f"{folder.name} is still being checked; Load turns on "
                                     "when its memory plan is shown.")
            return
        self.settings.set("model_dir", str(folder) if folder else "")
        super().accept()

    # ------------------------------------------------------------ download, pack, load

    @Slot(str)
    def error_label_text(self, text: str) -> None:
        """Show a problem under the plan (one sentence, wrapped)."""
        self.error_label.setText(text)

    @Slot(bool)
    def _on_download_busy(self, busy: bool) -> None:
        if busy:
            self.error_label.clear()

    @Slot(object, object)
    def _on_downloaded(self, folder: Path, model: CatalogueModel | None) -> None:
        if model is not None and packing_pays(self.downloads.catalogue.verdicts[model.repo]) \
                and not (folder / PACKED_DIRNAME).exists() and self.ask_to_pack(model):
            self._start_pack(folder, model)
            return
        self._check_then_load(folder)

    def ask_to_pack(self, model: CatalogueModel) -> bool:
        """Ask whether to pack the experts of a model that streams (its own disk check follows)."""
        answer = QtWidgets.QMessageBox.question(
            self, "Pack the experts?",
            f"{model.name} streams its experts from the disk. Packing writes each expert as one block "
            f"(one read per expert instead of several), which makes streaming faster. It needs "
            f"{human_bytes(model.expert_bytes_total)} more disk and takes a while. Pack now?")
        return answer == QtWidgets.QMessageBox.StandardButton.Yes

    def _start_pack(self, folder: Path, model: CatalogueModel) -> None:
        self.plan_view.setText(f"Packing the experts of {model.name}…")
        self.downloads.setEnabled(False)

        def work(ctx: OpContext) -> Path:
            return pack_downloaded_model(folder, model.expert_bytes_total)

        def failed(error: BaseException) -> None:
            self._pack = None
            self.downloads.setEnabled(True)
            text = str(error) if isinstance(error, DownloadError) else f"Packing failed: {error}"
            self.error_label.setText(f"{text.rstrip('.')}.")
            self._check_then_load(folder)

        def packed(result: Path) -> None:
            self._pack = None
            self.downloads.setEnabled(True)
            self._check_then_load(result)

        self._pack = BackgroundOp(self, work, packed, failed).run()

    def _check_then_load(self, folder: Path) -> None:
        self._load_when_checked = folder
        self.folder_edit.setText(str(folder))
        self.folder_radio.setChecked(True)
        self._on_choice_changed()

    def showEvent(self, event: QtGui.QShowEvent) -> None:  # noqa: N802 (Qt override)
        """Never wider than the screen, whatever a message says (labels wrap instead)."""
        screen = self.screen() or QtGui.QGuiApplication.primaryScreen()
        if screen is not None:
            self.setMaximumWidth(screen.availableGeometry().width())
        super().showEvent(event)

    def reject(self) -> None:
        """Closing cancels a running download (its partial files stay for a resume)."""
        self.downloads.cancel()
        super().reject()
