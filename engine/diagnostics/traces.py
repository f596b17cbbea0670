"""Routing traces: which experts each token routed to, per MoE layer, as JSON lines.

One line per (token, layer): ``{"token": t, "layer": l, "experts": [ids]}``, with
``"prefill": true`` on prompt tokens (a line without it is a decode token). The recorder writes a
first line that names the model, so that a trace is never replayed against another model::

    {"routing_trace": 1, "model_type": "qwen3_5_moe", "moe_layers": 60, "experts_per_layer": 512,
     "experts_per_token": 10, "expert_bytes": 7077888}

The header is optional when reading (traces from elsewhere can be dropped in); without one, the
layer and expert counts are taken from the ids seen. Tokens are numbered from 0 in the order the
engine ran them. Prefill chunks skip the last MoE layer where its output is unused (see
generate) or run it for the last prompt token only, so prompt tokens can lack a line for that
layer; a layer call with fewer rows than its step is numbered as the step's last tokens.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard

import numpy as np

from engine.errors import MoeBarError

TRACE_VERSION = 1


class TraceError(MoeBarError):
    """A routing trace is malformed or does not belong to the model it is used with."""

    code = "bad_trace"


@dataclass
class TraceHeader:
    """The model a trace was recorded from."""

    model_type: str
    moe_layers: int
    experts_per_layer: int
    experts_per_token: int
    expert_bytes: int = 0  # bytes read per expert miss (0: unknown)

    def to_json(self) -> str:
        """The header line."""
        return json.dumps({"routing_trace": TRACE_VERSION, **asdict(self)})

    def check_model(self, other: "TraceHeader", where: str) -> None:
        """Refuse a trace whose layer or expert counts differ from ``other`` (the model at ``where``)."""
        for name in ("moe_layers", "experts_per_layer"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise TraceError(
                    f"{where}: trace is from another model: {name} is {mine} in the trace but {theirs} in the model"
                )


@dataclass
class Trace:
    """A parsed trace: one row per line, in file order."""

    header: TraceHeader
    tokens: np.ndarray  # int64 [rows]
    layers: np.ndarray  # int32 [rows]
    experts: list[tuple[int, ...]]  # routed ids per row
    prefill: np.ndarray  # bool [rows]
    has_header: bool = True

    @property
    def decode_tokens(self) -> int:
        """Distinct decode tokens."""
        return len(np.unique(self.tokens[~self.prefill]))


def _header_from(obj: dict[str, Any], path: Path) -> TraceHeader:
    if obj.get("routing_trace") != TRACE_VERSION:
        raise TraceError(f"{path}:1: unknown trace version {obj.get('routing_trace')!r} (expected {TRACE_VERSION})")
    fields = {}
    for name in ("moe_layers", "experts_per_layer", "experts_per_token", "expert_bytes"):
        value = obj.get(name, 0 if name == "expert_bytes" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TraceError(f"{path}:1: header field {name!r} must be a non-negative integer, got {value!r}")
        fields[name] = value
    model_type = obj.get("model_type", "")
    if not isinstance(model_type, str):
        raise TraceError(f"{path}:1: header field 'model_type' must be a string, got {model_type!r}")
    return TraceHeader(model_type=model_type, **fields)


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def read_trace(path: str | Path) -> Trace:
    """Parse a trace file; a malformed line is reported with its line number."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TraceError(f"{path}: trace file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read the trace ({e})") from None
    header: TraceHeader | None = None
    tokens: list[int] = []
    layers: list[int] = []
    experts: list[tuple[int, ...]] = []
    prefill: list[bool] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{n}: not a JSON object ({e.msg}); truncated or malformed line") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        if "routing_trace" in obj:
            if n != 1 and (tokens or header is not None):
                raise TraceError(f"{path}:{n}: a header line may only be the first line")
            header = _header_from(obj, path)
            continue
        t, l, ids, pre = obj.get("token"), obj.get("layer"), obj.get("experts"), obj.get("prefill", False)
        if not (_int(t) and t >= 0):
            raise TraceError(f"{path}:{n}: field 'token' must be a non-negative integer, got {t!r}")
        if not (_int(l) and l >= 0):
            raise TraceError(f"{path}:{n}: field 'layer' must be a non-negative integer, got {l!r}")
        if not isinstance(ids, list) or not ids or not all(_int(e) and e >= 0 for e in ids):
            raise TraceError(f"{path}:{n}: field 'experts' must be a non-empty list of expert ids, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise TraceError(f"{path}:{n}: field 'experts' repeats an expert: {ids}")
        if not isinstance(pre, bool):
            raise TraceError(f"{path}:{n}: field 'prefill' must be true or false, got {pre!r}")
        if header is not None:
            if l >= header.moe_layers:
                raise TraceError(
                    f"{path}:{n}: layer {l} but the trace's model has {header.moe_layers} MoE layers; trace from another model?"
                )
            if max(ids) >= header.experts_per_layer:
                raise TraceError(
                    f"{path}:{n}: expert {max(ids)} but the trace's model has {header.experts_per_layer} experts per layer"
                )
        tokens.append(int(t))  # type: ignore[arg-type]  # (checked above)
        layers.append(int(l))  # type: ignore[arg-type]
        experts.append(tuple(ids))
        prefill.append(pre)
    if not tokens:
        raise TraceError(f"{path}: the trace has no routing lines")
    has_header = header is not None
    if header is None:
        header = TraceHeader(
            model_type="",
            moe_layers=max(layers) + 1,
            experts_per_layer=max(max(e) for e in experts) + 1,
            experts_per_token=max(len(e) for e in experts),
        )
    return Trace(
        header, np.array(tokens, dtype=np.int64), np.array(layers, dtype=np.int32), experts,
        np.array(prefill, dtype=bool), has_header,
    )  # fmt: skip


class TraceRecorder:
    """Writes the routing of every MoE layer call to a trace file (thread-safe, line-buffered)."""

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        try:
            self._file: IO[str] | None = self.path.open("w", buffering=1)
        except OSError as e:
            raise TraceError(f"{self.path}: cannot write the trace ({e})") from None
        self._file.write(header.to_json() + "\n")
        self._lock = threading.Lock()
        self._next_token = 0  # the number of the next step's first token
        self._step_tokens = 0  # tokens of the step being recorded
        self._last_layer = 1 << 30  # so that the first call starts step 0
        self.lines = 0

    def record(self, layer: int, indices: np.ndarray, prefill: bool) -> None:
        """The routed ids of one layer call: ``indices`` is ``[..., tokens, k]``."""
        rows = np.asarray(indices).reshape(-1, indices.shape[-1])
        with self._lock:
            if self._file is None:
                return
            if layer <= self._last_layer:  # a new step (the next token, chunk or pass) began
                self._next_token += self._step_tokens
                self._step_tokens = 0
            self._last_layer = layer
            self._step_tokens = max(self._step_tokens, len(rows))
            # a call with fewer rows than its step runs the step's last tokens (prefill skips the
            # last layer, or runs it for the last prompt token only)
            first = self._next_token + self._step_tokens - len(rows)
            extra = ', "prefill": true' if prefill else ""
            out = []
            for i, ids in enumerate(rows.tolist()):
                out.append(f'{{"token": {first + i}, "layer": {layer}, "experts": {json.dumps(ids)}{extra}}}\n')
            self._file.write("".join(out))
            self.lines += len(out)

    def close(self) -> None:
        """Finish the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
