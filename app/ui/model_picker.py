"""The tray's model menu: the demo model and the recent models, the loaded one checked; choosing one loads it.

Loading goes through the settings (model_dir) and the ModelManager, so progress and errors show
where they always do. The list of recent models is kept in the settings, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.bridge import EngineBridge
from app.qt import QObject, QtGui, QtWidgets, Signal, Slot
from app.settings import SettingsError, SettingsStore
from app.ui.model_manager import ModelManager
from engine.serving.protocol import LoadedEvent

MAX_RECENT = 10
DEMO_LABEL = "Demo model (random weights)"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the menu: what it shows, the folder ('' for the demo), checked, usable."""

    label: str
    model_dir: str
    checked: bool
    available: bool = True


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return str(a) == str(b)


class ModelPicker(QObject):
    """Keeps the recent models and loads the one the user picks."""

    failed = Signal(str)

    def __init__(self, bridge: EngineBridge, settings: SettingsStore, models: ModelManager,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.models = models
        bridge.loaded.connect(self._on_loaded)

    def choices(self) -> list[ModelChoice]:
        """The demo model, then the recent models; the loaded one is checked."""
        loaded = self.bridge.model.model_dir if self.bridge.model is not None else None
        demo_dir = self.models.demo_dir
        demo_loaded = loaded is not None and demo_dir is not None and _same_folder(loaded, demo_dir)
        result = [ModelChoice(DEMO_LABEL, "", demo_loaded)]
        for folder in self.settings.get("recent_models"):
            exists = Path(folder).expanduser().is_dir()
            label = Path(folder).name + ("" if exists else " (folder missing)")
            checked = loaded is not None and not demo_loaded and _same_folder(loaded, folder)
            result.append(ModelChoice(label, folder, checked, exists))
        return result

    def choose(self, model_dir: str) -> None:
        """Load `model_dir` ('' for the demo model) the usual way (status line, progress, errors)."""
        try:
            if str(self.settings.get("model_dir")) == model_dir:
                self.models.load_configured()  # the same choice again: load it again (e.g. after a failure)
            else:
                self.settings.set("model_dir", model_dir)  # the ModelManager loads it
        except SettingsError as exc:
            self.failed.emit(str(exc))

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        demo_dir = self.models.demo_dir
        if demo_dir is not None and _same_folder(event.model_dir, demo_dir):
            return
        recent = [event.model_dir] + [f for f in self.settings.get("recent_models")
                                      if not _same_folder(f, event.model_dir)]
        try:
            self.settings.set("recent_models", recent[:MAX_RECENT])
        except SettingsError:
            pass  # the menu then lacks this entry; the model itself is loaded


class ModelMenu(QtWidgets.QMenu):
    """A submenu listing the picker's choices, rebuilt each time it opens."""

    def __init__(self, picker: ModelPicker, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__("Choose Model", parent)
        self.setObjectName("modelMenu")
        self.picker = picker
        self._group = QtGui.QActionGroup(self)
        self.aboutToShow.connect(self.rebuild)
        self.rebuild()

    @Slot()
    def rebuild(self) -> None:
        """List the choices now."""
        self.clear()
        for action in self._group.actions():
            self._group.removeAction(action)
        for choice in self.picker.choices():
            action = self.addAction(choice.label)
            action.setCheckable(True)
            action.setChecked(choice.checked)
            action.setEnabled(choice.available)
            action.setToolTip(choice.model_dir or "the built-in demo model")
            action.setData(choice.model_dir)
            self._group.addAction(action)
            action.triggered.connect(lambda _checked=False, folder=choice.model_dir: self.picker.choose(folder))
