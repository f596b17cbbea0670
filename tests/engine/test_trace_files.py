"""Routing trace files that cannot be replayed (engine/diagnostics/traces.py): each is refused with
the file, the line number and the field that is wrong; a trace without a header takes its sizes
from the ids it holds; a recorder closed mid-generation writes nothing more."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.diagnostics.traces import TraceError, TraceHeader, TraceRecorder, read_trace

HEADER = json.dumps({"routing_trace": 1, "model_type": "qwen3_moe", "moe_layers": 2, "experts_per_layer": 8,
                     "experts_per_token": 2, "expert_bytes": 100})  # fmt: skip
LINE = '{"token": 0, "layer": 0, "experts": [1, 2]}'

BAD = {
    "other-version": ('{"routing_trace": 2}', 1, "unknown trace version 2 (expected 1)"),
    "header-field": ('{"routing_trace": 1, "moe_layers": -1, "experts_per_layer": 8, "experts_per_token": 2}', 1,
                     "header field 'moe_layers' must be a non-negative integer, got -1"),
    "header-bool": ('{"routing_trace": 1, "moe_layers": 2, "experts_per_layer": true, "experts_per_token": 2}', 1,
                    "header field 'experts_per_layer' must be a non-negative integer, got True"),
    "header-model-type": ('{"routing_trace": 1, "moe_layers": 2, "experts_per_layer": 8, "experts_per_token": 2, "model_type": 3}', 1,
                          "header field 'model_type' must be a string, got 3"),
    "not-json": (HEADER + "\n" + '{"token": 0, "layer"', 2, "not a JSON object"),
    "not-an-object": (HEADER + "\n[1, 2]", 2, "expected a JSON object, got list"),
    "late-header": (LINE + "\n" + HEADER, 2, "a header line may only be the first line"),
    "token": (HEADER + '\n{"token": -1, "layer": 0, "experts": [1]}', 2, "field 'token' must be a non-negative integer, got -1"),
    "layer": (HEADER + '\n{"token": 0, "layer": "0", "experts": [1]}', 2, "field 'layer' must be a non-negative integer, got '0'"),
    "experts-empty": (HEADER + '\n{"token": 0, "layer": 0, "experts": []}', 2, "field 'experts' must be a non-empty list of expert ids, got []"),
    "experts-repeat": (HEADER + '\n{"token": 0, "layer": 0, "experts": [3, 3]}', 2, "field 'experts' repeats an expert: [3, 3]"),
    "prefill": (HEADER + '\n{"token": 0, "layer": 0, "experts": [3], "prefill": 1}', 2, "field 'prefill' must be true or false, got 1"),
    "layer-of-another-model": (HEADER + '\n{"token": 0, "layer": 2, "experts": [3]}', 2,
                               "layer 2 but the trace's model has 2 MoE layers; trace from another model?"),
    "expert-of-another-model": (HEADER + '\n{"token": 0, "layer": 1, "experts": [3, 8]}', 2,
                                "expert 8 but the trace's model has 8 experts per layer"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_trace_is_refused_naming_the_line_and_field(tmp_path: Path, case: str) -> None:
    text, line, message = BAD[case]
    path = tmp_path / "t.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError) as refused:
        read_trace(path)
    assert str(refused.value).startswith(f"{path}:{line}: ") and message in str(refused.value)


def test_missing_unreadable_and_empty_traces(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=f"{tmp_path / 'none.jsonl'}: trace file not found"):
        read_trace(tmp_path / "none.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match=f"{binary}: cannot read the trace"):
        read_trace(binary)
    empty = tmp_path / "e.jsonl"
    empty.write_text(HEADER + "\n\n")
    with pytest.raises(TraceError, match=f"{empty}: the trace has no routing lines"):
        read_trace(empty)


def test_a_trace_without_header_takes_its_sizes_from_the_ids(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(LINE + '\n{"token": 1, "layer": 3, "experts": [9, 4, 0]}\n{"token": 1, "layer": 0, "experts": [2], "prefill": true}\n')
    trace = read_trace(path)
    assert not trace.has_header
    assert (trace.header.moe_layers, trace.header.experts_per_layer, trace.header.experts_per_token) == (4, 10, 3)
    assert trace.decode_tokens == 2 and trace.prefill.tolist() == [False, False, True]


def test_another_models_header_is_refused_by_the_model_check() -> None:
    trace = TraceHeader("qwen3_moe", 2, 8, 2)
    trace.check_model(TraceHeader("qwen3_moe", 2, 8, 4), "/m")  # K may differ (a lowered K)
    with pytest.raises(TraceError, match="/m: trace is from another model: experts_per_layer is 8 in the trace but 16 in the model"):
        trace.check_model(TraceHeader("qwen3_moe", 2, 16, 2), "/m")


def test_recorder_refuses_an_unwritable_path_and_ignores_calls_after_close(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TraceError, match=f"{blocker / 't.jsonl'}: cannot write the trace"):
        TraceRecorder(blocker / "t.jsonl", TraceHeader("qwen3_moe", 2, 8, 2))
    rec = TraceRecorder(tmp_path / "t.jsonl", TraceHeader("qwen3_moe", 2, 8, 2))
    rec.record(0, np.array([[[1, 2]]]), prefill=False)
    rec.close()
    rec.record(1, np.array([[[3, 4]]]), prefill=False)  # a layer call after the trace was stopped
    rec.close()
    assert rec.lines == 1 and len(read_trace(tmp_path / "t.jsonl").experts) == 1
