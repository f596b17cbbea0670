"""Whole-expert reads or reads in pieces, chosen at load by measuring both on the model's own files.

Which is faster depends on the disk: reads past the page cache in 1 MiB pieces ran 1.2-1.57x
faster than one read per expert on this project's Linux VM (2 cores), and 0.91x as fast on the
lent H100 machine's disk (16 cores, 2026-12-06: 1.39 against 1.51 GB/s in cold decode). So a cold
load with no setting measures decode-shaped batches both ways, alternating, and keeps the faster.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

from engine.storage.expert_store import READ_PIECE_BYTES


@dataclass(frozen=True)
class ReadChoice:
    """Cold read rates (bytes/s, medians) of whole experts and of pieces, and the piece size kept."""

    whole_bytes_per_s: float
    pieces_bytes_per_s: float
    piece_bytes: int  # the size the pieces were measured at when they won, else 0 (whole experts)

    @property
    def best_bytes_per_s(self) -> float:
        """The faster of the two rates (the disk's rate for the plan)."""
        return max(self.whole_bytes_per_s, self.pieces_bytes_per_s)

    def describe(self) -> str:
        """One line for the log and the self-check."""
        kept = f"pieces of {self.piece_bytes // 1024} KiB" if self.piece_bytes else "one read per expert"
        return (f"cold reads: whole experts {self.whole_bytes_per_s / 1e9:.2f} GB/s, pieces "
                f"{self.pieces_bytes_per_s / 1e9:.2f} GB/s; {kept}")


def choose_read_pieces(measure: Callable[[int, int], float], *, rounds: int = 3,
                       piece_bytes: int = READ_PIECE_BYTES) -> ReadChoice:  # fmt: skip
    """Measure both ways ``rounds`` times, alternating which goes first; keep pieces only if faster.

    ``measure(piece_bytes, round)`` reads a decode-shaped sample cold with that piece size (0:
    whole experts) and returns bytes/s; the round number varies the experts drawn.
    """
    if rounds < 1 or piece_bytes <= 0:
        raise ValueError(f"need rounds >= 1 and piece_bytes > 0 (got {rounds}, {piece_bytes})")
    rates: dict[int, list[float]] = {0: [], piece_bytes: []}
    for r in range(rounds):
        for size in (0, piece_bytes) if r % 2 == 0 else (piece_bytes, 0):
            rates[size].append(measure(size, r))
    whole, pieces = statistics.median(rates[0]), statistics.median(rates[piece_bytes])
    return ReadChoice(whole, pieces, piece_bytes if pieces > whole else 0)
