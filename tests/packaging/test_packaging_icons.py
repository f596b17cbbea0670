"""The app icon: PNGs drawn from resources/icons/moebar.svg, an .iconset and a hand-written .icns."""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType

import pytest

from app.qt import QtGui

ROOT = Path(__file__).resolve().parents[2]
SVG = ROOT / "resources" / "icons" / "moebar.svg"


def png_size(data: bytes) -> tuple[int, int]:
    image = QtGui.QImage.fromData(data)
    assert not image.isNull(), "not a PNG Qt can read"
    return image.width(), image.height()


@pytest.fixture(scope="module")
def built(icons: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return icons.build_icons(SVG, tmp_path_factory.mktemp("icons"))


def test_icns_holds_a_png_of_the_right_size_per_block(icons: ModuleType, built: dict[str, Path]) -> None:
    blocks = icons.read_icns(built["icns"].read_bytes())
    assert set(blocks) == set(icons.ICNS_TYPES)
    for kind, data in blocks.items():
        size = icons.ICNS_TYPES[kind]
        assert png_size(data) == (size, size), kind


def test_iconset_has_every_file_iconutil_expects(icons: ModuleType, built: dict[str, Path]) -> None:
    names = {path.name for path in built["iconset"].iterdir()}
    assert names == set(icons.ICONSET_NAMES)
    for name, size in icons.ICONSET_NAMES.items():
        assert png_size((built["iconset"] / name).read_bytes()) == (size, size), name


def test_linux_icons_are_in_theme_layout(icons: ModuleType, built: dict[str, Path]) -> None:
    for size in icons.LINUX_SIZES:
        path = built["hicolor"] / f"{size}x{size}" / "apps" / "moebar.png"
        assert png_size(path.read_bytes()) == (size, size)


def test_rendered_icon_is_the_svg_not_a_blank_square(icons: ModuleType) -> None:
    image = QtGui.QImage.fromData(icons.render_png(SVG, 64))
    corner, middle = image.pixelColor(0, 0), image.pixelColor(32, 32)
    assert corner.alpha() == 0  # the rounded square leaves the corners transparent
    assert middle.alpha() == 255
    assert len({image.pixel(x, y) for x in range(0, 64, 4) for y in range(0, 64, 4)}) > 4


def test_icns_framing_round_trips_and_rejects_damage(icons: ModuleType) -> None:
    data = icons.icns_bytes([(b"ic07", b"abc"), (b"ic08", b"")])
    assert data[:4] == b"icns" and struct.unpack(">I", data[4:8])[0] == len(data)
    assert icons.read_icns(data) == {b"ic07": b"abc", b"ic08": b""}
    with pytest.raises(ValueError, match="magic"):
        icons.read_icns(b"xxxx" + data[4:])
    with pytest.raises(ValueError, match="header says"):
        icons.read_icns(data[:-1])
    bad_length = data[:12] + struct.pack(">I", 4) + data[16:]
    with pytest.raises(ValueError, match="bad length"):
        icons.read_icns(bad_length)
    with pytest.raises(ValueError, match="four bytes"):
        icons.icns_bytes([(b"ic7", b"")])


def test_an_invalid_svg_is_refused(icons: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg")
    with pytest.raises(ValueError, match="not a valid SVG"):
        icons.render_png(bad, 16)
