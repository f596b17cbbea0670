"""Which model the engine runs: the configured folder, or the demo model built on first use.

Building the demo model and reading a memory plan run in subprocesses inside background ops,
so MLX never loads into the app process and the window stays responsive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import paths
from app.bridge import LOADING, EngineBridge
from app.ops import BackgroundOp, OpContext
from app.qt import QObject, QTimer, Signal, Slot
from app.settings import Settings, SettingsStore
from engine.serving.protocol import ErrorEvent, LoadedEvent
from engine.types import EngineOptions

ENGINE_SETTINGS = ("model_dir", "cache_mb", "memory_limit_mb", "experts_per_token", "cold_mode")
DEMO_BUILD_TIMEOUT_S = 600
PLAN_TIMEOUT_S = 120


def engine_python_command(*args: str) -> list[str]:
    """A command running engine code with this interpreter (works from a venv and a bundle)."""
    return [sys.executable, *args]


def engine_options_from(s: Settings) -> EngineOptions:
    """Load options from the app's settings: a cache of 0 MB is automatic, a limit of 0 is none."""
    return EngineOptions(
        cache_mb=float(s.cache_mb) if s.cache_mb > 0 else None,
        memory_limit_mb=float(s.memory_limit_mb) if s.memory_limit_mb > 0 else None,
        experts_per_token=s.experts_per_token,
        cold=s.cold_mode,
        hot_set_dir=str(paths.cache_dir() / "hot-experts"),  # warm start after a restart
        trace_dir=str(paths.cache_dir() / "routing-traces") if s.record_routing_traces else "",
    )


def build_demo_model() -> Path:
    """Build (once) the random-weight demo model and return its folder."""
    script = "from engine.demo.demo_model import ensure_demo_model; print(ensure_demo_model())"
    done = subprocess.run(
        engine_python_command("-c", script), capture_output=True, text=True, timeout=DEMO_BUILD_TIMEOUT_S
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"The demo model could not be built: {tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def read_memory_plan(model_dir: Path, options: EngineOptions) -> dict[str, Any]:
    """Run `moebar-engine plan MODEL --json` and return the plan."""
    cache = "auto" if options.cache_mb is None else str(options.cache_mb)
    args = ["-m", "engine.cli", "plan", str(model_dir), "--json", "--cache-mb", cache]
    if options.memory_limit_mb is not None:
        args += ["--memory-limit-mb", str(options.memory_limit_mb)]
    if options.experts_per_token:
        args += ["--experts-per-token", str(options.experts_per_token)]
    done = subprocess.run(engine_python_command(*args), capture_output=True, text=True, timeout=PLAN_TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"Could not check {model_dir}: {tail.removeprefix('error: ').rstrip('.')}.")
    plan = json.loads(done.stdout)
    if not isinstance(plan, dict):
        raise RuntimeError(f"The memory plan of {model_dir} is not a JSON object")
    return plan


class ModelManager(QObject):
    """Loads the configured model (or the demo model) and reloads when engine settings change."""

    status = Signal(str)  # what is happening, for the status line
    failed = Signal(str)
    using_demo = Signal(bool)

    def __init__(self, bridge: EngineBridge, settings: SettingsStore, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.demo_dir: Path | None = None
        self.current_dir: Path | None = None
        self._building: BackgroundOp[Path] | None = None
        self._loading: Path | None = None  # the folder of the load under way
        self._working: tuple[Path, str] | None = None  # the last folder that loaded, and its model_dir setting
        self._restoring: tuple[Path, str] | None = None  # the folder loaded again after a failure, and the notice
        settings.changed.connect(self._on_setting_changed)
        bridge.loaded.connect(self._on_loaded)
        bridge.error.connect(self._on_engine_error)

    def engine_options(self) -> EngineOptions:
        """Load options from the settings."""
        s = self.settings.settings
        return engine_options_from(s)

    def is_demo(self) -> bool:
        """Whether the demo model is (or will be) loaded."""
        return not str(self.settings.get("model_dir")).strip()

    def load_configured(self) -> None:
        """Load the model from the settings, building the demo model first when none is set."""
        model_dir = str(self.settings.get("model_dir")).strip()
        self.using_demo.emit(not model_dir)
        if model_dir:
            self._load(Path(model_dir).expanduser())
            return
        if self.demo_dir is not None:
            self._load(self.demo_dir)
            return
        if self._building is not None:
            return
        self.status.emit("Preparing the demo model (first run only)…")
        self._building = BackgroundOp(self, lambda ctx: build_demo_model(), self._on_demo_built, self._on_demo_failed)
        self._building.run()

    def _load(self, model_dir: Path) -> None:
        self.current_dir = model_dir
        self._loading = model_dir
        self.status.emit(f"Loading {model_dir.name}…")
        self.bridge.load(model_dir, self.engine_options())

    def _on_demo_built(self, path: Path) -> None:
        self._building = None
        self.demo_dir = path
        if self.is_demo():
            self._load(path)

    def _on_demo_failed(self, error: BaseException) -> None:
        self._building = None
        self.failed.emit(str(error))

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        if self._loading is not None and Path(event.model_dir) == self._loading:
            self._working = (self._loading, str(self.settings.get("model_dir")))
            self._loading = None
        if self._restoring is not None and Path(event.model_dir) == self._restoring[0]:
            text, self._restoring = self._restoring[1], None
            QTimer.singleShot(0, lambda: self.failed.emit(text))  # after the window's own loaded notices

    @Slot(object)
    def _on_engine_error(self, event: ErrorEvent) -> None:
        """A load failed: say so in words and load the model that worked before (if any) again."""
        failed = self._loading
        if failed is None or event.id is not None or self.bridge.state == LOADING:
            return  # not a load error, or a later load is still under way
        self._loading = None
        text = f"Could not load {failed.name}: {event.message.rstrip('.')}."
        if self._restoring is not None:  # the model that worked before failed too
            text, self._restoring = f"{self._restoring[1].rsplit('. ', 1)[0]}. {text}", None
        if self._working is None or self._working[0] == failed:
            self.failed.emit(f"{text} Choose another model with Model… in the toolbar.")
            return
        previous, setting = self._working
        # Said once the previous model is back, so that no restart notice on the way hides it.
        self._restoring = (previous, f"{text} {previous.name} is loaded again.")
        if str(self.settings.get("model_dir")) != setting:
            self.settings.set("model_dir", setting)  # reloads through _on_setting_changed
        else:
            self._load(previous)

    @Slot(str)
    def _on_setting_changed(self, name: str) -> None:
        if name in ENGINE_SETTINGS:
            self.load_configured()


def plan_op(
    parent: QObject,
    model_dir: Path,
    options: EngineOptions,
    on_plan: Callable[[dict[str, Any]], None],
    on_error: Callable[[BaseException], None],
) -> BackgroundOp[dict[str, Any]]:
    """Start reading a memory plan in the background; callbacks run in the GUI thread."""

    def work(ctx: OpContext) -> dict[str, Any]:
        return read_memory_plan(model_dir, options)

    return BackgroundOp(parent, work, on_plan, on_error).run()
