"""Reading text from an already-opened file descriptor: binary sniffing, line iteration, line counting."""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator

_CHUNK = 1 << 20


def sniff_problem(first_block: bytes, is_whole_file: bool) -> str | None:
    """Why `first_block` is not UTF-8 text ('contains NUL bytes' / 'is not UTF-8 text'), or None if it is."""
    if b"\x00" in first_block:
        return "contains NUL bytes"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # A multi-byte character cut at the end of the block is fine unless the file ends there.
        decoder.decode(first_block, final=is_whole_file)
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    return None


def sniff_fd(fd: int, size: int, sniff_bytes: int) -> str | None:
    """Read the first block of an open file and return `sniff_problem` for it."""
    block = os.pread(fd, sniff_bytes, 0)
    return sniff_problem(block, is_whole_file=size <= sniff_bytes)


def iter_line_blocks(fd: int, max_bytes: int, block_bytes: int = _CHUNK) -> Iterator[bytes]:
    """The file from offset 0 in blocks that end at a line break (the last may not), up to `max_bytes` bytes."""
    offset = 0
    pending = b""
    while offset < max_bytes:
        chunk = os.pread(fd, min(block_bytes, max_bytes - offset), offset)
        if not chunk:
            break
        offset += len(chunk)
        data = pending + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no line break yet: one long line keeps growing (bounded by max_bytes)
            pending = data
            continue
        pending = data[cut:]
        yield data[:cut]
    if pending:
        yield pending


def split_raw_lines(block: bytes) -> list[bytes]:
    """A block's lines, each keeping its b'\n' (only b'\n' separates lines, as `wc -l` counts them)."""
    parts = block.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def block_line_count(block: bytes) -> int:
    """How many lines `block` holds, counting a final line without a line break."""
    return block.count(b"\n") + (0 if not block or block.endswith(b"\n") else 1)


def count_newlines(fd: int, start: int, max_bytes: int) -> tuple[int, bool]:
    """Count b'\\n' from byte `start` up to `max_bytes`; also whether the file's last byte read is a newline."""
    count = 0
    offset = start
    last = b"\n"
    while offset < max_bytes:
        chunk = os.pread(fd, min(_CHUNK, max_bytes - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        last = chunk[-1:]
        offset += len(chunk)
    return count, last == b"\n"


def decode_line(raw: bytes) -> str:
    """One raw line as text without its line ending; undecodable bytes become U+FFFD."""
    return raw.decode("utf-8", errors="replace").rstrip("\n").removesuffix("\r")
