"""The model catalogue: a short list of MoE models in mlx-lm format (resources/catalogue/models.json)
and, for this machine, what each would do: fit in RAM, stream from the SSD at about N tok/s, or
need more free disk first. Works offline: it reads the data file, this machine's RAM and disk,
and which models are already in the download folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ui.format import human_bytes
from app.ui.model_download import VERIFIED_MARKER, disk_shortfall

CATALOGUE_FILE = "models.json"
_INT_FIELDS = ("download_bytes", "dense_bytes", "expert_bytes", "moe_layers", "experts_per_layer",
               "experts_per_token")
_TEXT_FIELDS = ("repo", "name", "summary", "model_type")


class CatalogueError(ValueError):
    """The catalogue file is unreadable or an entry is malformed (the message names which)."""


@dataclass(frozen=True)
class CatalogueModel:
    """One model of the catalogue, with the sizes that decide how it runs here."""

    repo: str
    name: str
    summary: str
    model_type: str
    download_bytes: int
    dense_bytes: int  # resident in RAM
    expert_bytes: int  # one routed expert of one layer
    moe_layers: int
    experts_per_layer: int
    experts_per_token: int

    @property
    def expert_bytes_total(self) -> int:
        """Every routed expert: what streams from the disk."""
        return self.moe_layers * self.experts_per_layer * self.expert_bytes

    @property
    def expert_bytes_per_token(self) -> int:
        """Expert bytes read per token when none is cached (the memory plan's figure)."""
        return self.moe_layers * self.experts_per_token * self.expert_bytes


@dataclass(frozen=True)
class Verdict:
    """How a catalogue model would run on this machine."""

    kind: str  # "fits_in_ram", "streams", "needs_disk" or "needs_ram"
    text: str
    tokens_per_s: float | None = None


def catalogue_path() -> Path:
    """The bundled catalogue file."""
    from app.ui.theme import resources_dir

    return resources_dir() / "catalogue" / CATALOGUE_FILE


def load_catalogue(path: Path | None = None) -> list[CatalogueModel]:
    """Read and check the catalogue; CatalogueError names the file, entry and field of a problem."""
    path = path or catalogue_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{path}: cannot read the model catalogue ({exc})") from None
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CatalogueError(f"{path}: 'models' must be a list")
    return [_entry(path, i, e) for i, e in enumerate(entries)]


def _entry(path: Path, index: int, entry: Any) -> CatalogueModel:
    where = f"{path}: models[{index}]"
    if not isinstance(entry, dict):
        raise CatalogueError(f"{where} must be an object")
    values: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            raise CatalogueError(f"{where}.{name} must be a non-empty string, not {value!r}")
        values[name] = value.strip()
    for name in _INT_FIELDS:
        value = entry.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CatalogueError(f"{where}.{name} must be a positive whole number, not {value!r}")
        values[name] = value
    if values["experts_per_token"] > values["experts_per_layer"]:
        raise CatalogueError(f"{where}.experts_per_token ({values['experts_per_token']}) exceeds experts_per_layer")
    return CatalogueModel(**values)


def verdict(model: CatalogueModel, ram_available: int, free_disk: int, downloaded_bytes: int,
            disk_read_bytes_per_s: float | None) -> Verdict:
    """Fits in RAM, streams at about N tok/s, or what is missing first (free disk, RAM).

    The rules are the memory plan's: the whole model fits when dense + expert bytes are below the
    RAM available; streamed, the disk-bound speed is the disk rate over the expert bytes one token
    reads with nothing cached (a floor: the expert cache and the OS page cache only add to it).
    """
    short = disk_shortfall(max(0, model.download_bytes - downloaded_bytes), free_disk)
    if short:
        return Verdict("needs_disk", f"needs {human_bytes(short)} more free disk")
    if model.dense_bytes + model.expert_bytes_total < ram_available:
        return Verdict("fits_in_ram", "fits in RAM")
    if model.dense_bytes >= ram_available:
        return Verdict("needs_ram", f"needs more RAM: {human_bytes(model.dense_bytes)} stays resident, "
                                    f"{human_bytes(ram_available)} is available")
    if not disk_read_bytes_per_s:
        return Verdict("streams", "streams from the SSD (disk speed not measured yet)")
    tps = disk_read_bytes_per_s / model.expert_bytes_per_token
    shown = f"{tps:.1f}" if tps < 10 else f"{tps:.0f}"
    return Verdict("streams", f"streams from the SSD at about {shown} tok/s", tps)


def download_state(folder: Path) -> str:
    """'downloaded' (checked after download), 'partial' (some files or parts) or 'none'."""
    if (folder / VERIFIED_MARKER).is_file():
        return "downloaded"
    if folder.is_dir() and any(folder.iterdir()):
        return "partial"
    return "none"


def packing_pays(model_verdict: Verdict) -> bool:
    """Packing the experts (one read per expert) helps only a model that streams from the disk."""
    return model_verdict.kind == "streams"
