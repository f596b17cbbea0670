"""The JSON-lines protocol: round trips, clear errors naming the field, no MLX import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.serving import protocol as p
from engine.types import EngineOptions, SamplingParams

REQUESTS = [
    p.LoadRequest(model_dir="/models/q", options=EngineOptions(cache_mb=512, experts_per_token=4)),
    p.ChatRequest(
        id="r1",
        messages=[
            p.ChatMessage(role="system", content="be brief"),
            p.ChatMessage(role="user", content="weather?"),
            p.ChatMessage(
                role="assistant",
                content="",
                reasoning="need a tool",
                tool_calls=[p.ToolCall(id="c1", name="get_weather", arguments={"city": "Oslo"})],
            ),
            p.ChatMessage(role="tool", content='{"t": 3}', tool_call_id="c1", name="get_weather"),
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        sampling=SamplingParams(temperature=0.7, max_tokens=32, seed=3),
        thinking=False,
    ),
    p.CancelRequest(id="r1"),
    p.UnloadRequest(),
    p.ShutdownRequest(),
]

EVENTS = [
    p.HelloEvent(pid=12),
    p.LoadedEvent(model_dir="/m", name="m", model_type="qwen3_moe", num_layers=2, plan={"resident_bytes": 5}),
    p.ProgressEvent(stage="dense", fraction=0.5),
    p.PrefillEvent(id="r1", tokens_total=4096, layers_total=60, layers_done=7, fraction=0.1, bytes_read=10, seconds_left=None),
    p.PrefillEvent(id="r1", tokens_total=9, passes_total=2, pass_index=1, fraction=0.75, elapsed_s=1.5, seconds_left=0.5),
    p.TokenTextEvent(id="r1", text="Hé", kind="reasoning"),
    p.ToolCallEvent(id="r1", call_id="call_1", name="f", arguments={"a": [1, 2]}),
    p.StatsEvent(figures=p.LiveFigures(decode_tps=3.5, pressure_level="warning", disk_read_bps=None), id=None),
    p.DoneEvent(id="r1", finish_reason="tool_calls", figures=p.MessageFigures(reused_tokens=7)),
    p.ErrorEvent(code="bad_request", message="x", usable=True, field="chat.id"),
    p.UnloadedEvent(),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_request_round_trip(message: object) -> None:
    line = p.encode(message)  # type: ignore[arg-type]
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line)["v"] == p.PROTOCOL_VERSION
    assert p.decode_request(line) == message


@pytest.mark.parametrize("message", EVENTS, ids=lambda m: type(m).__name__)
def test_event_round_trip(message: object) -> None:
    assert p.decode_event(p.encode(message)) == message  # type: ignore[arg-type]


def test_minimal_chat_takes_defaults() -> None:
    req = p.decode_request('{"v":1,"type":"chat","id":"a","messages":[{"role":"user","content":"hi"}]}')
    assert isinstance(req, p.ChatRequest)
    assert req.sampling == SamplingParams() and req.tools == [] and req.thinking is None


@pytest.mark.parametrize(
    ("line", "code", "field"),
    [
        ("{", "bad_request", None),
        ("[1]", "bad_request", None),
        ('{"type":"chat"}', "version_mismatch", "v"),
        ('{"v":true,"type":"unload"}', "version_mismatch", "v"),
        ('{"v":1,"type":"dance"}', "unknown_type", "type"),
        ('{"v":1,"type":"load"}', "bad_request", "load.model_dir"),
        ('{"v":1,"type":"load","model_dir":" "}', "bad_request", "load.model_dir"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"cache_mb":-1}}', "bad_request", "load.options.cache_mb"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"device":"tpu"}}', "bad_request", "load.options.device"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"prefill_matmul":"maybe"}}', "bad_request", "load.options.prefill_matmul"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"mlx_lm_shapes":"maybe"}}', "bad_request", "load.options.mlx_lm_shapes"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"read_piece_kb":-1}}', "bad_request", "load.options.read_piece_kb"),
        ('{"v":1,"type":"load","model_dir":"m","options":{"bogus":1}}', "bad_request", "load.options.bogus"),
        ('{"v":1,"type":"chat","id":"a","messages":[]}', "bad_request", "chat.messages"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"bot"}]}', "bad_request", "chat.messages[0].role"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user","content":1}]}', "bad_request", "chat.messages[0].content"),
        ('{"v":1,"type":"chat","id":7,"messages":[{"role":"user"}]}', "bad_request", "chat.id"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":{"max_tokens":0}}', "bad_request", "chat.sampling.max_tokens"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":{"max_tokens":1.5}}', "bad_request", "chat.sampling.max_tokens"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":{"top_p":0}}', "bad_request", "chat.sampling.top_p"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"tools":[{"type":"x"}]}', "bad_request", "chat.tools[0].type"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"tools":[{"type":"function","function":{}}]}', "bad_request", "chat.tools[0].function.name"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"thinking":"yes"}', "bad_request", "chat.thinking"),
        ('{"v":1,"type":"cancel"}', "bad_request", "cancel.id"),
        ('{"v":1,"type":"chat","id":"a","messages":"hi"}', "bad_request", "chat.messages"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":"fast"}', "bad_request", "chat.sampling"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"tools":["get_weather"]}', "bad_request", "chat.tools[0]"),
        ('{"v":1,"type":"chat","id":"a","messages":[{"role":"assistant","tool_calls":[{"id":"c","name":"f",'
         '"arguments":[1]}]}]}', "bad_request", "chat.messages[0].tool_calls"),
    ],
)
def test_bad_lines_name_the_field(line: str, code: str, field: str | None) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(line)
    assert info.value.code == code
    assert info.value.field == field
    if field:
        assert field in str(info.value)


def test_non_finite_numbers_are_rejected() -> None:
    line = '{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":{"temperature":NaN}}'
    with pytest.raises(p.ProtocolError, match="chat.sampling.temperature"):
        p.decode_request(line)


def test_events_are_not_requests() -> None:
    with pytest.raises(p.ProtocolError, match="unknown request type 'token'"):
        p.decode_request(p.encode(p.TokenTextEvent(id="a", text="x")))


def test_peek_id() -> None:
    assert p.peek_id('{"id":"z","type":1}') == "z"
    assert p.peek_id('{"id":3}') is None and p.peek_id("{") is None


def test_importable_without_mlx() -> None:
    code = "import sys, engine.serving.protocol; assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))


def test_lines_are_ascii_even_for_lone_surrogates() -> None:
    ev = p.TokenTextEvent(id="a", text="caf\u00e9 \ud800 \u6c34")
    line = p.encode(ev)
    assert line.isascii()
    assert p.decode_event(line) == ev


def test_unencodable_message_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="cannot encode a tool_call"):
        p.encode(p.ToolCallEvent(id="a", call_id="c", name="f", arguments={"x": float("nan")}))


def test_wrong_kinds_say_what_came_instead() -> None:
    with pytest.raises(p.ProtocolError, match=r"chat\.messages must be a list, got a string"):
        p.decode_request('{"v":1,"type":"chat","id":"a","messages":"hi"}')
    with pytest.raises(p.ProtocolError, match=r"chat\.sampling: expected an object, got a string"):
        p.decode_request('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"sampling":"fast"}')
    with pytest.raises(p.ProtocolError, match=r"chat\.tools\[0\] must be an object, got a string"):
        p.decode_request('{"v":1,"type":"chat","id":"a","messages":[{"role":"user"}],"tools":["get_weather"]}')


def test_a_line_too_long_is_refused_before_it_is_parsed() -> None:
    line = '{"v":1,"type":"unload","pad":"' + "x" * p.MAX_LINE_CHARS + '"}'
    with pytest.raises(p.ProtocolError, match=rf"line too long \({len(line)} > {p.MAX_LINE_CHARS} characters\)"):
        p.decode_request(line)


def test_field_types_the_decoder_does_not_know_are_refused_by_name() -> None:
    """A message type declared with a field type the decoder has no rule for fails loudly, naming the field."""
    import typing

    assert p._convert(typing.Any, {"k": [1]}, "x.any") == {"k": [1]}  # Any passes through
    with pytest.raises(p.ProtocolError, match=r"x\.blob: unsupported field type <class 'bytes'>") as info:
        p._convert(bytes, "abc", "x.blob")
    assert info.value.field == "x.blob"


def test_values_that_are_not_json_are_shown_by_repr() -> None:
    assert p._short({1, 2}) == "{1, 2}"
    assert p._short("x" * 100) == json.dumps("x" * 100)[:57] + "..."
