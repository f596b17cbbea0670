"""The Model dialog's "Get a model" box: the catalogue, any other Hugging Face id, an optional
access token, and one download at a time with progress, speed, time left, cancel and resume.

Public models are downloaded without touching the keychain. A typed token is used for the
download it was typed for; it is saved in the keychain only when asked and when the keychain
works (if it does not, one short sentence says so and the token is still used).
"""

from __future__ import annotations

from pathlib import Path

from app.catalogue import CatalogueModel
from app.ops import BackgroundOp, OpContext, Progress
from app.qt import QtWidgets, Signal, Slot
from app.settings import HF_TOKEN_SECRET, SecretStoreError, SettingsStore, delete_secret, get_secret, set_secret
from app.ui.catalogue_view import CatalogueView, MachineFacts
from app.ui.model_download import (
    DownloadCancelled,
    DownloadError,
    check_repo_id,
    download_dir_for,
    download_model,
)

KEYCHAIN_UNAVAILABLE = "The system keychain is not available here, so tokens cannot be saved"
TOKEN_NOTE = "Public models need no token. A saved token is kept in the system keychain, never in a file."


def download_failure_text(error: BaseException, repo_id: str) -> str:
    """One clean sentence for a failed download; "resume" only when something was downloaded."""
    if isinstance(error, SecretStoreError):
        return (f"{repo_id} needs an access token and the system keychain cannot be read: paste a token above; "
                "it is used for this download without being saved.")
    text = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    if not isinstance(error, DownloadError):
        text = f"Download of {repo_id} failed: {text}"
    folder = download_dir_for(repo_id)
    started = folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))
    return f"{text}. Press Download to resume." if started else f"{text}."


class DownloadPanel(QtWidgets.QGroupBox):
    """Catalogue and download controls; `downloaded` carries the folder when a download is checked."""

    downloaded = Signal(object, object)  # folder (Path), the catalogue model or None
    failed = Signal(str)
    busy_changed = Signal(bool)

    def __init__(self, settings: SettingsStore, facts: MachineFacts, parent: QtWidgets.QWidget | None = None,
                 catalogue: list[CatalogueModel] | None = None, endpoint: str | None = None) -> None:
        super().__init__("Get a model from Hugging Face", parent)
        self.settings = settings
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT or huggingface.co)
        self._download: BackgroundOp[Path] | None = None
        self._model: CatalogueModel | None = None
        self._repo = ""
        self.catalogue = CatalogueView(facts, catalogue, self)
        self.catalogue.get_requested.connect(self.start_catalogue)
        self.repo_edit = QtWidgets.QLineEdit(str(settings.get("hf_repo_last_used")), self)
        self.repo_edit.setPlaceholderText("Another model: owner/name, e.g. mlx-community/Qwen3-30B-A3B-4bit")
        self.download_button = QtWidgets.QPushButton("Download", self)
        self.download_button.clicked.connect(self._on_download_clicked)
        self.token_edit = QtWidgets.QLineEdit(self)
        self.token_edit.setEchoMode(QtWidgets.QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText("Access token (only for gated or private models)")
        self.save_token_box = QtWidgets.QCheckBox("Save in the keychain", self)
        self.forget_token_button = QtWidgets.QPushButton("Forget saved token", self)
        self.forget_token_button.clicked.connect(self._forget_token)
        self.note = QtWidgets.QLabel(TOKEN_NOTE, self)
        self.note.setObjectName("figuresLabel")
        self.note.setWordWrap(True)
        self.progress = QtWidgets.QProgressBar(self)
        self.progress.hide()
        repo_row = QtWidgets.QHBoxLayout()
        repo_row.addWidget(self.repo_edit, 1)
        repo_row.addWidget(self.download_button)
        token_row = QtWidgets.QHBoxLayout()
        token_row.addWidget(self.token_edit, 1)
        token_row.addWidget(self.save_token_box)
        token_row.addWidget(self.forget_token_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.catalogue)
        layout.addLayout(repo_row)
        layout.addLayout(token_row)
        layout.addWidget(self.note)
        layout.addWidget(self.progress)
        layout.addStretch(1)

    def is_busy(self) -> bool:
        """Whether a download runs."""
        return self._download is not None

    # ------------------------------------------------------------ starting

    @Slot(object)
    def start_catalogue(self, model: CatalogueModel) -> None:
        """Download (or resume, or just check) a catalogue model."""
        self.start(model.repo, model)

    @Slot()
    def _on_download_clicked(self) -> None:
        if self._download is not None:
            self.cancel()
            return
        try:
            repo_id = check_repo_id(self.repo_edit.text())
        except ValueError as exc:
            self.failed.emit(str(exc))
            return
        self.settings.set("hf_repo_last_used", repo_id)
        model = next((m for m in self.catalogue.models if m.repo == repo_id), None)
        self.start(repo_id, model)

    def start(self, repo_id: str, model: CatalogueModel | None = None) -> None:
        """Start downloading `repo_id` (one at a time)."""
        if self._download is not None:
            return
        token = self._token_for_this_download()
        self._repo, self._model = repo_id, model
        endpoint = self.endpoint

        def work(ctx: OpContext) -> Path:
            return download_model(ctx, repo_id, token=token, stored_token=lambda: get_secret(HF_TOKEN_SECRET),
                                  endpoint=endpoint)

        self._set_busy(True)
        self.progress.setRange(0, 0)
        self.progress.setFormat(f"{repo_id}: starting…")
        self._download = BackgroundOp(self, work, self._on_done, self._on_failed)
        self._download.with_progress(self._on_progress).run()

    def _token_for_this_download(self) -> str | None:
        token = self.token_edit.text().strip()
        if not token:
            return None
        if self.save_token_box.isChecked():
            try:
                set_secret(HF_TOKEN_SECRET, token)
                self.token_edit.clear()
                self.note.setText("The token is saved in the system keychain.")
            except SecretStoreError:
                self.note.setText(f"{KEYCHAIN_UNAVAILABLE}; the token is used for this download only.")
        return token

    # ------------------------------------------------------------ running

    def cancel(self) -> None:
        """Stop the download; its partial files stay for a resume."""
        if self._download is None:
            return
        self._download.cancel()
        folder = download_dir_for(self._repo)
        self._finish()
        started = folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))
        self.note.setText(f"Download of {self._repo} cancelled" + ("; press Download to resume." if started else "."))

    def _on_progress(self, progress: Progress) -> None:
        if progress.total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * progress.done / progress.total))
        self.progress.setFormat(f"{self._repo}: {progress.label}")

    def _on_done(self, folder: Path) -> None:
        self._finish()
        self.note.setText(f"{self._repo} is downloaded and checked ({folder}).")
        self.catalogue.refresh()
        self.downloaded.emit(folder, self._model)

    def _on_failed(self, error: BaseException) -> None:
        if isinstance(error, DownloadCancelled):
            return
        self._finish()
        self.catalogue.refresh()
        self.failed.emit(download_failure_text(error, self._repo))

    def _finish(self) -> None:
        self._download = None
        self.progress.hide()
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.progress.setVisible(busy)
        self.download_button.setText("Cancel" if busy else "Download")
        self.catalogue.set_busy(busy)
        self.busy_changed.emit(busy)

    @Slot()
    def _forget_token(self) -> None:
        try:
            removed = delete_secret(HF_TOKEN_SECRET)
        except SecretStoreError:
            self.note.setText(f"{KEYCHAIN_UNAVAILABLE}.")
            return
        self.note.setText("The saved token was removed from the keychain." if removed else "No token was saved.")
