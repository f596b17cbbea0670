"""The app <-> engine protocol: typed requests and events, one JSON object per line.

Every line is a JSON object with ``"v"`` (PROTOCOL_VERSION), ``"type"`` and the fields of the
dataclass named by that type. Both sides import this module; it needs no MLX.

Requests (app -> engine): load, chat, cancel, unload, shutdown.
Events (engine -> app): hello, loaded, progress, token, tool_call, stats, done, error, unloaded,
notice (something the user should know that is not an error, e.g. the expert cache was reduced).

The engine answers in this order: `hello` first; `load` -> progress..., then `loaded` or an
`error` with id null; `chat` -> token / tool_call / stats events, then exactly one `done` (after
an `error` with the chat's id when it failed: finish_reason "error"); `cancel` -> the chat's
`done` says "cancelled" (no reply when the id is unknown or finished); `unload` -> `unloaded`.
Requests run one at a time in arrival order; cancel acts at once. A bad line gets an `error`
(usable true) and the engine reads on. `stats` come at least twice a second while working.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from engine.errors import RequestError
from engine.types import EngineOptions, SamplingParams
from engine.model.cache_policies import is_policy_name

PROTOCOL_VERSION = 1
MAX_LINE_CHARS = 16 * 1024 * 1024  # one request line (a whole conversation) may not exceed this


class ProtocolError(RequestError):
    """A line is not a valid protocol message; `field` names the offending field when known."""

    code = "bad_request"

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        if code is not None:
            self.code = code


# ---------------------------------------------------------------- shared pieces


@dataclass
class ToolCall:
    """One tool call made by the assistant; `arguments` is the parsed JSON object."""

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatMessage:
    """One conversation message (OpenAI roles: system, user, assistant, tool)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    reasoning: str | None = None  # the assistant's <think> text, when the app kept it
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages: which call this result answers
    name: str | None = None  # tool messages: the tool's name


@dataclass
class LiveFigures:
    """Live gauges of the engine, sent at least twice a second while it works."""

    decode_tps: float = 0.0  # decode tokens per second (excluding the wait for the first token)
    prompt_tps: float = 0.0  # prefill tokens per second
    ttft_s: float = 0.0  # time to first token of the current request
    engine_read_bps: float = 0.0  # expert bytes the engine read per second (recent window)
    disk_read_bps: float | None = None  # the disk's own read counter, bytes per second
    cache_hit_rate: float = 0.0  # expert cache hits / lookups (cumulative since load)
    cache_saved_bytes: int = 0  # expert bytes the cache's hits did not read (cumulative since load)
    resident_bytes: int = 0  # bytes held by the in-process expert cache
    rss_bytes: int = 0  # process resident set size
    pressure_level: Literal["normal", "warning", "critical", "unknown"] = "unknown"
    pressure_raw: str = ""  # the platform's raw reading, readable (e.g. "some avg10=0.00% full avg10=0.00%")
    pressure_value: float = 0.0  # the raw number: macOS level 1/2/4, PSI full avg10 %, or available RAM share
    pressure_source: str = ""  # where it came from (sysctl name, PSI file, psutil)
    prompt_tokens: int = 0  # of the current request: prefilled so far
    generated_tokens: int = 0  # of the current request: generated so far
    mlx_active_bytes: int = 0  # MLX's buffers in use (weights, slots, KV, activations)
    mlx_cached_bytes: int = 0  # freed buffers MLX keeps for reuse (held small by the memory budget)
    mlx_peak_bytes: int = 0  # MLX's most active bytes since the engine started
    expert_cache_bytes: int = 0  # the in-process expert cache's pools now (smaller while memory pressure reduced it)
    expert_cache_full_bytes: int = 0  # the pools at the memory budget's size (before any reduction)


@dataclass
class MessageFigures:
    """Figures of one finished message, kept with it."""

    prompt_tokens: int = 0  # prompt tokens prefilled (not counting reused ones)
    reused_tokens: int = 0  # prompt tokens served by the prompt cache
    generated_tokens: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    bytes_read: int = 0  # expert bytes read during this message
    cache_hit_rate: float = 0.0
    peak_rss_bytes: int = 0


# ---------------------------------------------------------------- requests


@dataclass
class LoadRequest:
    """Load a model directory (replaces any loaded model)."""

    TYPE: ClassVar[str] = "load"
    model_dir: str
    options: EngineOptions = field(default_factory=EngineOptions)
    prompt_cache_mb: float = 1024.0  # bound of the prompt (KV) cache kept across turns

    def check(self) -> None:
        """Raise ProtocolError when a value is out of range."""
        o = self.options
        _require(bool(self.model_dir.strip()), "load.model_dir", "must not be empty")
        _require(o.cache_mb is None or o.cache_mb >= 0, "load.options.cache_mb",
                 f"must be >= 0 or null (automatic), got {o.cache_mb}")  # fmt: skip
        _require(o.memory_limit_mb is None or o.memory_limit_mb > 0, "load.options.memory_limit_mb",
                 f"must be > 0 or null (no limit), got {o.memory_limit_mb}")  # fmt: skip
        _require(o.context_tokens >= 1, "load.options.context_tokens", f"must be >= 1, got {o.context_tokens}")
        _require(o.activation_dtype in ("auto", "float32", "bfloat16"), "load.options.activation_dtype",
                 f"must be auto, float32 or bfloat16, got {o.activation_dtype!r}")  # fmt: skip
        _require(
            self.prompt_cache_mb >= 0, "load.prompt_cache_mb", f"must be >= 0, got {self.prompt_cache_mb}"
        )
        _require(
            o.experts_per_token is None or o.experts_per_token >= 1,
            "load.options.experts_per_token",
            f"must be >= 1 or null, got {o.experts_per_token}",
        )
        _require(o.io_threads >= 1, "load.options.io_threads", f"must be >= 1, got {o.io_threads}")
        _require(o.read_piece_kb is None or o.read_piece_kb >= 0, "load.options.read_piece_kb", f"must be >= 0 or null, got {o.read_piece_kb}")
        _require(
            o.prefill_chunk >= 1, "load.options.prefill_chunk", f"must be >= 1, got {o.prefill_chunk}"
        )
        _require(
            o.device in ("auto", "cpu", "gpu"),
            "load.options.device",
            f"must be auto, cpu or gpu, got {o.device!r}",
        )
        for name in ("prefill_matmul", "mlx_lm_shapes", "gather_slots"):
            value = getattr(o, name)
            _require(value in ("auto", "on", "off"), f"load.options.{name}", f"must be auto, on or off, got {value!r}")
        _require(
            is_policy_name(o.cache_policy),
            "load.options.cache_policy",
            f"must be a cache policy (wtinylfu-ghost@layer, lru-layer, lru, arc, wtinylfu, lrfu, lfu, lrfu:HALF_LIFE "
            f"or NAME@layer), got {o.cache_policy!r}",
        )


@dataclass
class ChatRequest:
    """Generate the assistant's next message for a whole conversation."""

    TYPE: ClassVar[str] = "chat"
    id: str
    messages: list[ChatMessage]
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function-tool schemas
    sampling: SamplingParams = field(default_factory=SamplingParams)  # max_tokens lives here
    thinking: bool | None = None  # None keeps the chat template's default

    def check(self) -> None:
        """Raise ProtocolError when a value is out of range or a tool schema is malformed."""
        s = self.sampling
        _require(bool(self.id), "chat.id", "must not be empty")
        _require(bool(self.messages), "chat.messages", "must hold at least one message")
        _require(s.max_tokens >= 1, "chat.sampling.max_tokens", f"must be >= 1, got {s.max_tokens}")
        _require(s.temperature >= 0, "chat.sampling.temperature", f"must be >= 0, got {s.temperature}")
        _require(0 < s.top_p <= 1, "chat.sampling.top_p", f"must be in (0, 1], got {s.top_p}")
        _require(s.top_k >= 0, "chat.sampling.top_k", f"must be >= 0, got {s.top_k}")
        _require(0 <= s.min_p <= 1, "chat.sampling.min_p", f"must be in [0, 1], got {s.min_p}")
        _require(
            s.repetition_penalty > 0,
            "chat.sampling.repetition_penalty",
            f"must be > 0, got {s.repetition_penalty}",
        )
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(s, name)
            _require(math.isfinite(value), f"chat.sampling.{name}", f"must be a finite number, got {value}")
        if s.logit_bias is not None:
            s.logit_bias = _checked_logit_bias(s.logit_bias)
        for i, tool in enumerate(self.tools):
            check_tool_schema(tool, f"chat.tools[{i}]")


@dataclass
class CancelRequest:
    """Stop the chat request `id` (its done event says finish_reason "cancelled")."""

    TYPE: ClassVar[str] = "cancel"
    id: str


@dataclass
class UnloadRequest:
    """Free the loaded model."""

    TYPE: ClassVar[str] = "unload"


@dataclass
class ShutdownRequest:
    """Stop the engine process."""

    TYPE: ClassVar[str] = "shutdown"


@dataclass
class ServeRequest:
    """Serve the loaded model over the OpenAI-compatible HTTP API from this process (or stop: enabled false)."""

    TYPE: ClassVar[str] = "serve"
    enabled: bool
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None

    def check(self) -> None:
        """Raise ProtocolError when a value is out of range."""
        _require(bool(self.host.strip()), "serve.host", "must not be empty")
        _require(0 <= self.port <= 65535, "serve.port", f"must be 0..65535, got {self.port}")


Request = Union[LoadRequest, ChatRequest, CancelRequest, UnloadRequest, ShutdownRequest, ServeRequest]

# ---------------------------------------------------------------- events


@dataclass
class HelloEvent:
    """First line the engine writes: its protocol version and process id."""

    TYPE: ClassVar[str] = "hello"
    protocol: int = PROTOCOL_VERSION
    pid: int = 0


@dataclass
class LoadedEvent:
    """A model is loaded: its facts and the memory plan."""

    TYPE: ClassVar[str] = "loaded"
    model_dir: str
    name: str
    model_type: str
    num_layers: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    context_length: int = 0
    supports_tools: bool = False
    supports_thinking: bool = False
    plan: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    ranks: int = 1  # machines running the model together (expert parallelism); 1 when alone


@dataclass
class ProgressEvent:
    """Loading progress: a stage name and a fraction in [0, 1]."""

    TYPE: ClassVar[str] = "progress"
    stage: str
    fraction: float


@dataclass
class PrefillEvent:
    """Progress of a chat request's prompt prefill, a few times a second while it runs.

    Counts are of this request's new prompt tokens (those served by the prompt cache are not
    counted). ``seconds_left`` is a linear estimate, None until something is done.
    """

    TYPE: ClassVar[str] = "prefill"
    id: str
    tokens_total: int
    tokens_done: int = 0  # tokens whose every layer is done
    layers_total: int = 0
    layers_done: int = 0  # layers done in the pass under way
    passes_total: int = 1
    pass_index: int = 0
    fraction: float = 0.0  # share of the prefill done, 0..1
    bytes_read: int = 0  # expert bytes read by this prefill so far
    elapsed_s: float = 0.0
    seconds_left: float | None = None


@dataclass
class TokenTextEvent:
    """A piece of generated text; `kind` says whether it is reasoning or answer."""

    TYPE: ClassVar[str] = "token"
    id: str
    text: str
    kind: Literal["reasoning", "answer"] = "answer"


@dataclass
class ToolCallEvent:
    """The model called a tool; `arguments` is the parsed JSON object."""

    TYPE: ClassVar[str] = "tool_call"
    id: str
    call_id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class StatsEvent:
    """Live figures; `id` is the request being served, None when idle."""

    TYPE: ClassVar[str] = "stats"
    figures: LiveFigures
    id: str | None = None


@dataclass
class DoneEvent:
    """A chat request ended: finish_reason is stop, length, tool_calls, cancelled or error."""

    TYPE: ClassVar[str] = "done"
    id: str
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled", "error"]
    figures: MessageFigures = field(default_factory=MessageFigures)


@dataclass
class ErrorEvent:
    """Something failed; `usable` says whether the engine can still serve requests."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    usable: bool = True
    id: str | None = None  # the request it concerns, when known
    field: str | None = None  # the offending field of a bad request, when known


@dataclass
class NoticeEvent:
    """Something the user should know that is not a failure, sent when it happens (idle or not).

    ``code`` says what it is about: "cache_reduced" / "cache_restored" (memory pressure resized
    the expert cache; ``bytes`` is its new size).
    """

    TYPE: ClassVar[str] = "notice"
    code: str
    message: str
    level: Literal["info", "warning"] = "info"
    bytes: int = 0


@dataclass
class UnloadedEvent:
    """The model was unloaded (answer to unload)."""

    TYPE: ClassVar[str] = "unloaded"


@dataclass
class ServerEvent:
    """State of the local HTTP server (answer to serve, and whenever a request starts or ends)."""

    TYPE: ClassVar[str] = "server"
    running: bool
    host: str = ""
    port: int = 0
    active_requests: int = 0  # HTTP chat requests running or waiting for the engine
    error: str = ""  # why it is not running (a port in use, ...), empty when all is well


Event = Union[
    HelloEvent,
    LoadedEvent,
    ProgressEvent,
    PrefillEvent,
    TokenTextEvent,
    ToolCallEvent,
    StatsEvent,
    DoneEvent,
    ErrorEvent,
    UnloadedEvent,
    ServerEvent,
    NoticeEvent,
]

REQUEST_TYPES: dict[str, type] = {
    c.TYPE: c for c in (LoadRequest, ChatRequest, CancelRequest, UnloadRequest, ShutdownRequest, ServeRequest)
}
EVENT_TYPES: dict[str, type] = {c.TYPE: c for c in typing.get_args(Event)}

# ---------------------------------------------------------------- encode / decode


def to_json_obj(message: Request | Event) -> dict[str, Any]:
    """Return the JSON object (with "v" and "type") of a request or event."""
    return {"v": PROTOCOL_VERSION, "type": type(message).TYPE, **dataclasses.asdict(message)}


def encode(message: Request | Event) -> str:
    """Encode a request or event as one JSON line (ending in a newline); raises ProtocolError if it cannot be."""
    try:
        # ASCII-only: a lone surrogate from model output can never break the UTF-8 pipe.
        return json.dumps(to_json_obj(message), ensure_ascii=True, allow_nan=False) + "\n"
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"cannot encode a {type(message).TYPE} message: {exc}") from None


def decode_request(line: str | bytes) -> Request:
    """Decode one request line; raises ProtocolError naming the bad field."""
    return typing.cast(Request, _decode(line, REQUEST_TYPES, "request"))


def decode_event(line: str | bytes) -> Event:
    """Decode one event line; raises ProtocolError naming the bad field."""
    return typing.cast(Event, _decode(line, EVENT_TYPES, "event"))


def peek_id(line: str | bytes) -> str | None:
    """Return the "id" of a line if it has a string one (to tag errors of a bad request)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _decode(line: str | bytes, kinds: dict[str, type], what: str) -> Any:
    if len(line) > MAX_LINE_CHARS:
        raise ProtocolError(f"line too long ({len(line)} > {MAX_LINE_CHARS} characters)")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a {what} must be a JSON object, got {_json_kind(obj)}")
    version = obj.pop("v", None)
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            field="v",
            code="version_mismatch",
        )
    kind = obj.pop("type", None)
    if not isinstance(kind, str) or kind not in kinds:
        raise ProtocolError(
            f"unknown {what} type {kind!r}; expected one of {sorted(kinds)}",
            field="type",
            code="unknown_type",
        )
    message = _build(kinds[kind], obj, kind)
    check = getattr(message, "check", None)
    if check is not None:
        check()
    return message


def check_tool_schema(tool: Any, where: str = "tools[0]") -> None:
    """Raise ProtocolError unless `tool` is an OpenAI function tool with a name."""
    _require(isinstance(tool, dict), where, "must be an object")
    _require(tool.get("type") == "function", f"{where}.type", 'must be "function"')
    function = tool.get("function")
    _require(isinstance(function, dict), f"{where}.function", "must be an object")
    name = function.get("name")
    _require(isinstance(name, str) and bool(name), f"{where}.function.name", "must be a non-empty string")
    params = function.get("parameters", {})
    _require(isinstance(params, dict), f"{where}.function.parameters", "must be an object (JSON schema)")


def _checked_logit_bias(bias: dict[Any, Any]) -> dict[int, float]:
    """logit_bias with int token ids (JSON object keys arrive as strings) and finite biases; ProtocolError otherwise."""
    checked: dict[int, float] = {}
    for key, value in bias.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit() and len(key.strip()) <= 12:
            token = int(key)
        _require(token is not None and token >= 0, "chat.sampling.logit_bias",
                 f"keys must be token ids (integers >= 0), got {_short(key)}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _require(ok and -100 <= value <= 100, "chat.sampling.logit_bias",
                 f"[{key}] must be a number in [-100, 100], got {_short(value)}")
        checked[int(token)] = float(value)  # type: ignore[arg-type]
    return checked


def _require(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise ProtocolError(f"{where} {problem}", field=where)


def _build(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path}: expected an object, got {_json_kind(obj)}", field=path)
    hints, fields = _fields_of(cls)
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise ProtocolError(f"{path}.{unknown[0]} is not a known field", field=f"{path}.{unknown[0]}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        where = f"{path}.{name}"
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where} is required", field=where)
            continue
        kwargs[name] = _convert(hints[name], obj[name], where)
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{where}: bad value {_short(value)}", field=where)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        raise ProtocolError(f"{where} must be one of {list(args)}, got {_short(value)}", field=where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where} must be a list, got {_json_kind(value)}", field=where)
        return [_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object, got {_json_kind(value)}", field=where)
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ProtocolError(f"{where} must be true or false, got {_short(value)}", field=where)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProtocolError(f"{where} must be an integer, got {_short(value)}", field=where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ProtocolError(f"{where} must be a finite number, got {_short(value)}", field=where)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ProtocolError(f"{where} must be a string, got {_short(value)}", field=where)
    raise ProtocolError(f"{where}: unsupported field type {hint!r}", field=where)


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
