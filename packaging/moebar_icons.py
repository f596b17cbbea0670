"""The app icon for the bundles, drawn from resources/icons/moebar.svg with Qt's SVG renderer.

    python packaging/moebar_icons.py OUT_DIR

writes into OUT_DIR:
  MoeBar.iconset/   the PNGs macOS's `iconutil -c icns` takes (icon_16x16.png ... icon_512x512@2x.png)
  MoeBar.icns       the same PNGs in an .icns container, written here without Apple tools
  hicolor/SIZExSIZE/apps/moebar.png   the Linux icon theme sizes (the .desktop file's Icon=moebar)

An .icns file is the magic "icns", the file length (big-endian u32), then one block per image:
a four-letter type, the block length including its 8-byte header, and a PNG. The types used
here take PNG data on every macOS since 10.7; each says which pixel size it holds.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # drawing needs no display

from PySide6 import QtCore, QtGui
from PySide6.QtSvg import QSvgRenderer

ICNS_MAGIC = b"icns"
# .icns block type -> pixel size of its (square) PNG.
ICNS_TYPES: dict[bytes, int] = {
    b"icp4": 16, b"icp5": 32, b"icp6": 64, b"ic07": 128, b"ic08": 256, b"ic09": 512,
    b"ic10": 1024, b"ic11": 32, b"ic12": 64, b"ic13": 256, b"ic14": 512,
}
# iconutil's file names in an .iconset folder -> pixel size.
ICONSET_NAMES: dict[str, int] = {
    "icon_16x16.png": 16, "icon_16x16@2x.png": 32, "icon_32x32.png": 32, "icon_32x32@2x.png": 64,
    "icon_128x128.png": 128, "icon_128x128@2x.png": 256, "icon_256x256.png": 256,
    "icon_256x256@2x.png": 512, "icon_512x512.png": 512, "icon_512x512@2x.png": 1024,
}
LINUX_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


def render_png(svg: Path, size: int) -> bytes:
    """The SVG drawn on a transparent size x size canvas, as PNG bytes."""
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg}: not a valid SVG")
    image = QtGui.QImage(size, size, QtGui.QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(QtCore.Qt.GlobalColor.transparent)
    painter = QtGui.QPainter(image)
    painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QtGui.QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter, QtCore.QRectF(0, 0, size, size))
    painter.end()
    buffer = QtCore.QBuffer()
    buffer.open(QtCore.QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):  # type: ignore[call-overload]  # the stubs say bytes, PySide6 takes str
        raise RuntimeError(f"could not encode a {size}px PNG")
    return bytes(buffer.data().data())


def icns_bytes(blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An .icns file holding (type, PNG data) blocks."""
    body = b""
    for kind, data in blocks:
        if len(kind) != 4:
            raise ValueError(f"icns block type {kind!r} is not four bytes")
        body += kind + struct.pack(">I", len(data) + 8) + data
    return ICNS_MAGIC + struct.pack(">I", len(body) + 8) + body


def read_icns(data: bytes) -> dict[bytes, bytes]:
    """The blocks of an .icns file by type; raises ValueError when the framing is wrong."""
    if data[:4] != ICNS_MAGIC:
        raise ValueError("not an .icns file (no 'icns' magic)")
    (total,) = struct.unpack(">I", data[4:8])
    if total != len(data):
        raise ValueError(f".icns header says {total} bytes, file has {len(data)}")
    blocks: dict[bytes, bytes] = {}
    offset = 8
    while offset < total:
        if offset + 8 > total:
            raise ValueError(f"truncated block header at byte {offset}")
        kind = data[offset:offset + 4]
        (length,) = struct.unpack(">I", data[offset + 4:offset + 8])
        if length < 8 or offset + length > total:
            raise ValueError(f"block {kind!r} at byte {offset} has a bad length {length}")
        blocks[kind] = data[offset + 8:offset + length]
        offset += length
    return blocks


def build_icons(svg: Path, out_dir: Path, name: str = "MoeBar") -> dict[str, Path]:
    """Write the iconset, the .icns and the Linux PNGs for `svg` into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {size: render_png(svg, size) for size in sorted(set(ICNS_TYPES.values()) | set(LINUX_SIZES))}
    iconset = out_dir / f"{name}.iconset"
    iconset.mkdir(exist_ok=True)
    for file_name, size in ICONSET_NAMES.items():
        (iconset / file_name).write_bytes(pngs[size])
    icns = out_dir / f"{name}.icns"
    icns.write_bytes(icns_bytes((kind, pngs[size]) for kind, size in ICNS_TYPES.items()))
    hicolor = out_dir / "hicolor"
    for size in LINUX_SIZES:
        target = hicolor / f"{size}x{size}" / "apps" / "moebar.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pngs[size])
    return {"iconset": iconset, "icns": icns, "hicolor": hicolor}


def main(argv: list[str] | None = None) -> int:
    """Command line: build the icons into a folder."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--svg", type=Path, default=here.parent / "resources" / "icons" / "moebar.svg")
    args = parser.parse_args(argv)
    if QtGui.QGuiApplication.instance() is None:
        _app = QtGui.QGuiApplication(sys.argv[:1])  # kept alive while drawing
    paths = build_icons(args.svg, args.out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
