"""Choosing the model: the demo model, a local folder, or a Hugging Face download; with the
memory plan shown before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.ops import BackgroundOp, OpContext, Progress
from app.qt import QtGui, QtWidgets, Slot
from app.settings import HF_TOKEN_SECRET, SecretStoreError, SettingsStore, delete_secret, get_secret, set_secret
from app.ui.format import human_bytes
from app.ui.model_download import DownloadCancelled, check_repo_id, download_model
from app.ui.model_manager import ModelManager, plan_op
from app.ui.model_panel import plan_lines


class ModelDialog(QtWidgets.QDialog):
    """Pick a model folder (or download one), see its memory plan, then load it."""

    def __init__(self, settings: SettingsStore, manager: ModelManager, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Model")
        self.setObjectName("modelDialog")
        self.resize(620, 520)
        self.settings = settings
        self.manager = manager
        self._plan_op: BackgroundOp[dict[str, Any]] | None = None
        self._download: BackgroundOp[Path] | None = None
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

        download_box = QtWidgets.QGroupBox("Download from Hugging Face", self)
        self.repo_edit = QtWidgets.QLineEdit(str(settings.get("hf_repo_last_used")), download_box)
        self.repo_edit.setPlaceholderText("owner/name, e.g. mlx-community/Qwen3-30B-A3B-4bit")
        self.token_edit = QtWidgets.QLineEdit(download_box)
        self.token_edit.setEchoMode(QtWidgets.QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("Access token (only for gated or private models)")
        self.forget_token_button = QtWidgets.QPushButton("Forget token", download_box)
        self.forget_token_button.clicked.connect(self._forget_token)
        self.token_note = QtWidgets.QLabel(download_box)
        self.token_note.setObjectName("figuresLabel")
        self.token_note.setWordWrap(True)
        self.save_token_box = QtWidgets.QCheckBox("Save the token in the system keychain", download_box)
        self.save_token_box.setChecked(True)
        self.download_button = QtWidgets.QPushButton("Download", download_box)
        self.download_button.clicked.connect(self._start_or_cancel_download)
        self.download_progress = QtWidgets.QProgressBar(download_box)
        self.download_progress.hide()
        form = QtWidgets.QFormLayout(download_box)
        form.addRow("Model id:", self.repo_edit)
        token_row = QtWidgets.QHBoxLayout()
        token_row.addWidget(self.token_edit, 1)
        token_row.addWidget(self.forget_token_button)
        form.addRow("Token:", token_row)
        form.addRow("", self.save_token_box)
        form.addRow("", self.token_note)
        form.addRow(self.download_button, self.download_progress)
        self._show_token_state()

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
        layout.addWidget(download_box)
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
        self.plan_view.setText(f"Reading the plan of {folder.name} (measures the disk)…")
        self._plan_op = plan_op(self, folder, self.manager.engine_options(),
                                lambda plan: self._show_plan(folder, plan), self._plan_failed)

    def _show_plan(self, folder: Path, plan: dict[str, Any]) -> None:
        self._plan_op = None
        self._plan_ok, self._plan_error = folder, ""
        self.load_button.setEnabled(True)
        rows = plan_lines(plan)
        self.plan_view.setText("<br>".join(f"{label}: <b>{value}</b>" for label, value in rows))

    def _plan_failed(self, error: BaseException) -> None:
        self._plan_op = None
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

    # ------------------------------------------------------------ download

    def _show_token_state(self) -> None:
        try:
            stored = get_secret(HF_TOKEN_SECRET) is not None
        except SecretStoreError as exc:
            self.token_note.setText(str(exc))
            self.forget_token_button.setEnabled(False)
            return
        self.token_note.setText("A token is stored in the system keychain." if stored
                                else "Tokens are kept in the system keychain, never in a file.")
        self.forget_token_button.setEnabled(stored)

    @Slot()
    def _forget_token(self) -> None:
        try:
            delete_secret(HF_TOKEN_SECRET)
        except SecretStoreError as exc:
            self.error_label.setText(str(exc))
        self._show_token_state()

    @Slot()
    def _start_or_cancel_download(self) -> None:
        if self._download is not None:
            self._download.cancel()
            self._download_finished("Download cancelled; press Download again to resume.")
            return
        try:
            repo_id = check_repo_id(self.repo_edit.text())
            token = self.token_edit.text().strip()
            if token:
                set_secret(HF_TOKEN_SECRET, token)
                self.token_edit.clear()
            token = get_secret(HF_TOKEN_SECRET) or ""
        except (ValueError, SecretStoreError) as exc:
            self.error_label.setText(str(exc))
            return
        self._show_token_state()
        self.settings.set("hf_repo_last_used", repo_id)
        self.error_label.clear()
        self.download_button.setText("Cancel")
        self.download_progress.setRange(0, 0)
        self.download_progress.show()

        def work(ctx: OpContext) -> Path:
            return download_model(ctx, repo_id, token)

        self._download = BackgroundOp(self, work, self._downloaded, self._download_failed)
        self._download.with_progress(self._download_progress).run()

    def _download_progress(self, progress: Progress) -> None:
        if progress.total:
            self.download_progress.setRange(0, 1000)
            self.download_progress.setValue(int(1000 * progress.done / progress.total))
            unit = f"{human_bytes(progress.done)} of {human_bytes(progress.total)}" if progress.total > 10_000 \
                else f"{progress.done} of {progress.total}"
            self.download_progress.setFormat(f"{progress.label}: {unit}")

    def _downloaded(self, folder: Path) -> None:
        self._download_finished(f"Downloaded to {folder}.")
        self.folder_edit.setText(str(folder))
        self.folder_radio.setChecked(True)
        self._on_choice_changed()

    def _download_failed(self, error: BaseException) -> None:
        if isinstance(error, DownloadCancelled):
            return
        self._download_finished("")
        self.error_label.setText(f"Download failed: {error}. Press Download to resume.")

    def _download_finished(self, note: str) -> None:
        self._download = None
        self.download_button.setText("Download")
        self.download_progress.hide()
        self.token_note.setText(note or self.token_note.text())

    def showEvent(self, event: QtGui.QShowEvent) -> None:  # noqa: N802 (Qt override)
        """Never wider than the screen, whatever a message says (labels wrap instead)."""
        screen = self.screen() or QtGui.QGuiApplication.primaryScreen()
        if screen is not None:
            self.setMaximumWidth(screen.availableGeometry().width())
        super().showEvent(event)

    def reject(self) -> None:
        """Closing cancels a running download (its partial files stay for a resume)."""
        if self._download is not None:
            self._download.cancel()
        super().reject()
