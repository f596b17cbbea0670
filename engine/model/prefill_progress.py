"""Watching and stopping a long prefill: progress figures, the cancellation exception, cache rollback.

The hook, for front-ends (the service, the chat):

- ``Engine.generate(..., on_prefill=fn)`` calls ``fn(PrefillProgress)`` after every decoder layer of
  every prefill pass (and once at the start, with nothing done). ``fn`` runs on the engine's
  thread and must return quickly; it may raise ``PrefillCancelled`` itself to stop.
- The generation's ``stop()`` callable is polled between layers and between the expert groups of
  a layer. When it says stop, the prefill aborts with ``PrefillCancelled``; ``generate`` catches
  it, rolls the KV / linear-attention cache back to the last finished pass (whole passes are
  kept: the cache then holds exactly ``reused + tokens_done`` tokens of the prompt), and ends with
  the usual cancelled event (token ``NO_TOKEN``, finish reason ``"cancelled"``). Nothing half
  written stays in the cache, so the service may store it in the prompt cache as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence


class PrefillCancelled(Exception):
    """The prefill was asked to stop; the cache is rolled back to the last finished pass."""


@dataclass
class PrefillProgress:
    """Where a prefill stands. Counts are for this generation's prompt (reused tokens excluded)."""

    tokens_total: int  # prompt tokens to prefill
    tokens_done: int  # tokens whose every layer is done (whole passes)
    pass_tokens: int  # tokens in the pass under way
    passes_total: int  # passes over the experts the prompt needs
    pass_index: int  # the pass under way (0-based)
    layers_total: int  # decoder layers in the model (the MoE layers in these families)
    layers_done: int  # decoder layers done in the pass under way
    bytes_read: int  # expert bytes read so far in this prefill
    elapsed_s: float  # since the prefill started

    @property
    def fraction(self) -> float:
        """Share of the prefill's layer passes done (0..1)."""
        units = self.passes_total * self.layers_total
        done = self.pass_index * self.layers_total + self.layers_done
        return min(1.0, done / units) if units else 1.0

    @property
    def seconds_left(self) -> float | None:
        """A linear estimate of the time left, once something is done (None before)."""
        f = self.fraction
        return self.elapsed_s * (1 - f) / f if f > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``fraction`` and ``seconds_left``."""
        return {**asdict(self), "fraction": self.fraction, "seconds_left": self.seconds_left}


ProgressFn = Callable[[PrefillProgress], None]


class CacheCheckpoint:
    """The lengths and linear-attention states of a model cache, to roll a cancelled pass back.

    Attention caches that can be trimmed (mlx-lm's ``KVCache``) are cut back to their offset;
    caches holding a fixed-size state (``ArraysCache``: conv and recurrent state of a gated delta
    net) get their state arrays back (MLX arrays are immutable, so keeping references is a copy).
    """

    def __init__(self, cache: Sequence[Any]) -> None:
        self._cache = list(cache)
        self._saved: list[tuple[str, Any]] = []
        for c in self._cache:
            if hasattr(c, "offset") and c.is_trimmable():
                self._saved.append(("offset", int(c.offset)))
            elif isinstance(getattr(c, "cache", None), list):
                self._saved.append(("arrays", (list(c.cache), getattr(c, "lengths", None))))
            else:
                raise TypeError(f"cannot checkpoint a {type(c).__name__} cache for a cancellable prefill")

    @classmethod
    def of(cls, cache: Sequence[Any]) -> "CacheCheckpoint | None":
        """A checkpoint of ``cache``, or None for a cache of a kind this class cannot roll back."""
        try:
            return cls(cache)
        except TypeError:
            return None

    def restore(self) -> None:
        """Put every layer's cache back where it was when the checkpoint was taken."""
        for c, (kind, value) in zip(self._cache, self._saved):
            if kind == "offset":
                extra = int(c.offset) - value
                if extra > 0:
                    c.trim(extra)
            else:
                arrays, lengths = value
                c.cache = list(arrays)
                if hasattr(c, "lengths"):
                    c.lengths = lengths
