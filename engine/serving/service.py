"""The service both front-ends share: owns the Engine, runs chat turns, reports protocol events.

A chat turn: render the conversation with the model's template, take the best prompt-cache
entry, prefill what is new, stream the answer through the OutputSplitter (reasoning, answer,
tool calls), and keep the final cache state for the next turn.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine import platform_info
from engine.serving.chat import ChatFormat, OutputSplitter, Piece, prompt_ends_in_reasoning, render_prompt
from engine.errors import MoeBarError, RequestError
from engine.serving.live_stats import LiveStats
from engine.serving.pressure_policy import POLL_S, PressurePolicy, PressureWatcher
from engine.serving.out_of_memory import is_out_of_memory, out_of_memory_message
from engine.model.prompt_cache import PromptCache, cache_is_trimmable, cache_length, common_prefix_len, snapshot
from engine.serving.protocol import (
    ChatMessage,
    ProtocolError,
    ChatRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    LiveFigures,
    LoadedEvent,
    LoadRequest,
    MessageFigures,
    NoticeEvent,
    PrefillEvent,
    ProgressEvent,
    StatsEvent,
    TokenTextEvent,
    ToolCallEvent,
)
from engine.types import EngineOptions, GenerationStats, SamplingParams

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
T = TypeVar("T")
EngineLoader = Callable[..., "Engine"]
NO_TOKEN = -1  # engine.model.generate's token id of an event that only reports a cancellation


class NotLoadedError(RequestError):
    """A request needs a model but none is loaded."""

    code = "not_loaded"


class BusyError(RequestError):
    """A request needs the engine while another one holds it."""

    code = "busy"


def _default_loader(model_dir: str | Path, options: EngineOptions, progress: Any = None) -> "Engine":
    from engine.engine import Engine

    return Engine.load(model_dir, options, progress=progress)


class _EngineThread:
    """The one thread of the process that every engine call runs on, in arrival order.

    MLX streams belong to the thread that created them (the engine makes extra CPU streams on
    first use, kept for the process), so all MLX work stays on one thread, shared by every
    EngineService. The thread is a daemon that never ends: a thread that made MLX streams must
    not exit before the process (MLX aborts).
    """

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self._started = False
        self._start_lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        """Queue fn(*args) for the engine thread."""
        with self._start_lock:
            if not self._started:
                threading.Thread(target=self._loop, name="moebar-engine", daemon=True).start()
                self._started = True
        future: Future[T] = Future()
        self._calls.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)


ENGINE_THREAD = _EngineThread()


@dataclass
class _Turn:
    """State of the chat turn in progress (read by the live-figures thread)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    stats: list[GenerationStats] = field(default_factory=list)  # one per engine.generate call
    first_token_at: float | None = None


class EngineService:
    """Owns one Engine and serves load, chat and unload; thread-safe, one turn at a time."""

    def __init__(
        self,
        loader: EngineLoader = _default_loader,
        live: LiveStats | None = None,
        *,
        pressure_source: Callable[[], platform_info.MemoryPressure] = platform_info.memory_pressure,
        clock: Callable[[], float] = time.monotonic,
        pressure_poll_s: float | None = POLL_S,
    ) -> None:
        """``pressure_source``/``clock`` feed the memory-pressure policy (tests pass fakes);
        ``pressure_poll_s`` None starts no watcher thread (tests call poll_memory_pressure)."""
        self._loader = loader
        self.engine: "Engine | None" = None
        self.loaded: LoadedEvent | None = None
        self.prompt_cache = PromptCache(max_bytes=0)
        self._fmt = ChatFormat()
        self._thread = ENGINE_THREAD
        self._closed = False
        self._turn: _Turn | None = None
        self._loading = False
        self.live = live or LiveStats()
        self.notify: Emit | None = None  # where notices go when no request is running (the stdio server)
        self._pressure_source = pressure_source
        self._clock = clock
        self._pressure_poll_s = pressure_poll_s
        self._policy: PressurePolicy | None = None
        self._watcher: PressureWatcher | None = None

    # ------------------------------------------------------------------ load / unload

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the engine thread (one call at a time, in arrival order) and return its result."""
        if self._closed:
            raise RequestError("the engine service is closed")
        return self._thread.submit(fn, *args).result()

    def load(self, req: LoadRequest, emit: Emit) -> LoadedEvent:
        """Load a model (replacing the current one); emits progress; returns the loaded event."""
        return self._run(self._load, req, emit)

    def _load(self, req: LoadRequest, emit: Emit) -> LoadedEvent:
        self._unload_now()
        self._loading = True
        t0 = time.perf_counter()

        def progress(stage: str, fraction: float) -> None:
            emit(ProgressEvent(stage=str(stage), fraction=min(1.0, max(0.0, float(fraction)))))

        try:
            engine = self._loader(req.model_dir, req.options, progress=progress)
        finally:
            self._loading = False
        self.engine = engine
        self._fmt = ChatFormat.from_tokenizer(engine.tokenizer)
        self.prompt_cache = PromptCache(max_bytes=prompt_cache_bound(engine, req.prompt_cache_mb))
        self.live.attach(engine)
        self.loaded = _loaded_event(engine, self._fmt, time.perf_counter() - t0)
        options = getattr(engine, "options", None)
        if getattr(options, "shrink_cache_under_pressure", False) and hasattr(engine, "resize_expert_cache"):
            self._policy = PressurePolicy()
            if self._pressure_poll_s is not None:
                self._watcher = PressureWatcher(self.poll_memory_pressure, self._pressure_poll_s).start()
        return self.loaded

    def unload(self) -> None:
        """Free the model and the prompt cache."""
        self._run(self._unload_now)

    def _unload_now(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._watcher = self._policy = None
        self.prompt_cache.clear()
        self.live.attach(None)
        if self.engine is not None:
            engine, self.engine, self.loaded = self.engine, None, None
            engine.close()

    def close(self) -> None:
        """Unload; later calls are refused."""
        if not self._closed:
            self.unload()
            self._closed = True

    @property
    def busy(self) -> bool:
        """Whether a load or a chat turn is running."""
        return self._loading or self._turn is not None

    # ------------------------------------------------------------------ memory pressure

    def poll_memory_pressure(self) -> str | None:
        """One memory-pressure check (the watcher's, every POLL_S): read the level and, when the
        policy says so and no request is running, resize the expert cache on the engine thread
        (between requests: a safe point). Returns "shrink"/"grow" when the cache changed."""
        policy = self._policy
        if policy is None or self.engine is None:
            return None
        reading = self._pressure_source()
        now = self._clock()
        action = policy.observe(reading.level, now)
        if action is None or self.busy:
            return None  # (busy: the condition persists, so the next idle poll decides again)
        return self._run(self._resize_now, policy, action, now, reading.level)

    def _resize_now(self, policy: PressurePolicy, action: str, now: float, level: str) -> str | None:
        engine = self.engine
        if engine is None or self._policy is not policy or self._turn is not None:
            return None  # unloaded or replaced meanwhile
        outcome = engine.resize_expert_cache(action)
        policy.applied(action, now, outcome is not None)  # type: ignore[arg-type]
        if outcome is None:
            return None
        size = _gb(outcome.new_bytes)
        if action == "shrink":
            event = NoticeEvent(code="cache_reduced", level="warning", bytes=outcome.new_bytes, message=(
                f"Memory pressure ({level}): expert cache reduced to {size} (from {_gb(outcome.old_bytes)}); "
                "the experts it dropped are read again from the SSD when needed."))  # fmt: skip
        else:
            full = " (its full size)" if outcome.level == 0 else ""
            event = NoticeEvent(code="cache_restored", level="info", bytes=outcome.new_bytes,
                                message=f"Memory pressure has eased: expert cache grown back to {size}{full}.")
        log.info("%s", event.message)
        if self.notify is not None:
            self.notify(event)
        return action

    # ------------------------------------------------------------------ live figures

    def live_figures(self) -> tuple[str | None, LiveFigures]:
        """The current request id (None when idle) and the live figures."""
        turn = self._turn
        if turn is None:
            return None, self.live.sample(None)
        return turn.request_id, self.live.sample(_turn_figures(turn))

    # ------------------------------------------------------------------ chat

    def chat(self, req: ChatRequest, emit: Emit, cancelled: Callable[[], bool]) -> DoneEvent:
        """Run one chat turn, emitting token/tool_call events; returns (does not emit) the done event."""
        return self._run(self._chat, req, emit, cancelled)

    def _chat(self, req: ChatRequest, emit: Emit, cancelled: Callable[[], bool]) -> DoneEvent:
        engine = self.engine
        if engine is None:
            raise NotLoadedError("no model is loaded: send a load request first")
        turn = _Turn(request_id=req.id)
        self._turn = turn
        try:
            done = self._turn_of(engine, req, emit, cancelled, turn)
            emit(StatsEvent(figures=self.live.sample(_turn_figures(turn)), id=req.id))
            return done
        finally:
            self._turn = None

    def _turn_of(
        self, engine: "Engine", req: ChatRequest, emit: Emit, cancelled: Callable[[], bool], turn: _Turn
    ) -> DoneEvent:
        tok = engine.tokenizer
        if req.tools and not self._fmt.supports_tools:
            raise RequestError(f"chat.tools: the model {engine.model_dir.name} has no tool-call format")
        prompt = render_prompt(tok, req.messages, req.tools, req.thinking)
        turn.prompt_tokens = len(prompt)
        context = self.loaded.context_length if self.loaded else 0
        if context and len(prompt) >= context:
            raise RequestError(f"chat.messages: the prompt has {len(prompt)} tokens; the model's context is {context}")
        req = dataclasses.replace(req, sampling=bounded_sampling(req.sampling, _vocab_size(engine), len(prompt), context))
        hit = self.prompt_cache.fetch(prompt)
        kv, reused = (hit.cache, hit.reused) if hit else (engine.make_kv_cache(), 0)
        splitter = OutputSplitter(self._fmt, req.tools, in_reasoning=prompt_ends_in_reasoning(tok, prompt))
        detok = tok.detokenizer
        eos = set(tok.eos_token_ids)
        bytes_before = engine.expert_counters()["bytes_read"]
        split, snapshot_end = (None, False) if cache_is_trimmable(kv) else self._snapshot_points(req, prompt)
        held = reused
        if split is not None and split >= reused:
            held = self._prefill_and_snapshot(engine, prompt, split, kv, reused, cancelled, turn, emit)
            if held < 0:
                return self._finish(engine, req, turn, "cancelled", reused, bytes_before)
        generated: list[int] = []
        reason = "stop"
        on_prefill = _prefill_reporter(req.id, emit)
        for ev in engine.generate(
            prompt[held:], req.sampling, stop=cancelled, kv_cache=kv, reused_tokens=reused, on_prefill=on_prefill
        ):
            if not turn.stats or turn.stats[-1] is not ev.stats:
                turn.stats.append(ev.stats)
            if ev.token != NO_TOKEN:
                if turn.first_token_at is None:
                    turn.first_token_at = time.perf_counter()
                    if snapshot_end:  # the first token is not fed yet: the cache holds the prompt
                        self._store_snapshot(prompt, kv)
                generated.append(ev.token)
                if ev.token not in eos:
                    detok.add_token(ev.token)
                    self._emit_pieces(req.id, splitter.feed(detok.last_segment), emit)
            reason = ev.finish_reason or reason
        detok.finalize()
        self._emit_pieces(req.id, splitter.feed(detok.last_segment) + splitter.finish(), emit)
        self._keep(prompt + generated, kv)
        if reason == "stop" and splitter.tool_calls:
            reason = "tool_calls"
        return self._finish(engine, req, turn, reason, reused, bytes_before)

    def _snapshot_points(self, req: ChatRequest, prompt: list[int]) -> tuple[int | None, bool]:
        """Where to copy a cache that cannot be trimmed: (a split point to prefill up to, or None; copy at the prompt's end?).

        The next turn is probed by rendering this conversation plus a reply and a new message.
        If it starts with the whole prompt, a copy at the prompt's end serves it; otherwise (a
        template that re-renders the generation prompt, e.g. an empty <think> block) the copy is
        taken where the conversation ends, which needs the prefill split there.
        """
        assert self.engine is not None
        tok = self.engine.tokenizer
        probe_messages = [*req.messages, ChatMessage(role="assistant", content="x"), ChatMessage(role="user", content="y")]
        try:
            probe = render_prompt(tok, probe_messages, req.tools, req.thinking)
            if common_prefix_len(prompt, probe) == len(prompt):
                return None, True
            conversation = render_prompt(tok, req.messages, req.tools, req.thinking, add_generation_prompt=False)
        except RequestError:  # a template that refuses the probe: no snapshot this turn
            return None, False
        split = len(conversation)
        shared = common_prefix_len(conversation, prompt) == split and common_prefix_len(conversation, probe) == split
        return (split, False) if shared and 0 < split < len(prompt) else (None, False)

    def _prefill_and_snapshot(
        self,
        engine: "Engine",
        prompt: list[int],
        split: int,
        kv: list[Any],
        reused: int,
        cancelled: Callable[[], bool],
        turn: _Turn,
        emit: Emit,
    ) -> int:
        """Prefill the prompt up to `split`, store a copy of the cache there; return split, or -1 if cancelled."""
        if split > reused:
            # Prefill only: the first event comes right after the prefill, before its token is fed.
            gen = engine.generate(
                prompt[reused:split],
                SamplingParams(max_tokens=1),
                stop=cancelled,
                kv_cache=kv,
                reused_tokens=reused,
                on_prefill=_prefill_reporter(turn.request_id, emit),
            )
            try:
                first = next(gen)
            finally:
                close = getattr(gen, "close", None)  # a generator: release it without feeding its token
                if close is not None:
                    close()
            turn.stats.append(first.stats)
            if first.finish_reason == "cancelled":
                return -1
        self._store_snapshot(prompt[:split], kv)
        return split

    def _store_snapshot(self, tokens: list[int], kv: list[Any]) -> None:
        """Store a copy of the cache, if it holds exactly `tokens` (otherwise keep nothing rather than a wrong state)."""
        if cache_length(kv) == len(tokens):
            self.prompt_cache.store(tokens, snapshot(kv))
        else:
            log.warning("prompt cache: no snapshot (cache holds %s tokens, expected %d)", cache_length(kv), len(tokens))

    def _keep(self, tokens: list[int], kv: list[Any]) -> None:
        """Store the final cache state under the tokens it holds."""
        held = cache_length(kv)
        if held is None or held == 0 or held > len(tokens):
            return
        self.prompt_cache.store(tokens[:held], kv)

    @staticmethod
    def _emit_pieces(request_id: str, pieces: list[Piece], emit: Emit) -> None:
        for p in pieces:
            if p.kind in ("reasoning", "answer"):
                emit(TokenTextEvent(id=request_id, text=p.text, kind="reasoning" if p.kind == "reasoning" else "answer"))
            elif p.kind == "tool_call" and p.call is not None:
                emit(ToolCallEvent(id=request_id, call_id=p.call.id, name=p.call.name, arguments=p.call.arguments))
            elif p.kind == "tool_error":
                emit(ErrorEvent(code="bad_tool_call", message=f"the model wrote a tool call that cannot be read: {p.error}", usable=True, id=request_id))

    def _finish(self, engine: "Engine", req: ChatRequest, turn: _Turn, reason: str, reused: int, bytes_before: int) -> DoneEvent:
        figures = _turn_figures(turn)
        figures.reused_tokens = reused
        figures.bytes_read = engine.expert_counters()["bytes_read"] - bytes_before
        return DoneEvent(id=req.id, finish_reason=reason, figures=figures)  # type: ignore[arg-type]


PREFILL_EVENT_INTERVAL_S = 0.25  # prefill events at most four times a second (plus the first and the last)


def _prefill_reporter(request_id: str, emit: Emit) -> Callable[[Any], None]:
    """An ``on_prefill`` callback that emits PrefillEvents for ``request_id``, throttled.

    Called on the engine thread after every layer of the prefill; the first report, the end of
    each pass and the end of the prefill always go out, the rest at most every 0.25 s.
    """
    last = [-1.0]

    def report(progress: Any) -> None:
        now = time.perf_counter()
        boundary = progress.layers_done in (0, progress.layers_total)
        if not boundary and now - last[0] < PREFILL_EVENT_INTERVAL_S:
            return
        last[0] = now
        emit(
            PrefillEvent(
                id=request_id,
                tokens_total=int(progress.tokens_total),
                tokens_done=int(progress.tokens_done),
                layers_total=int(progress.layers_total),
                layers_done=int(progress.layers_done),
                passes_total=int(progress.passes_total),
                pass_index=int(progress.pass_index),
                fraction=float(progress.fraction),
                bytes_read=int(progress.bytes_read),
                elapsed_s=float(progress.elapsed_s),
                seconds_left=None if progress.seconds_left is None else float(progress.seconds_left),
            )
        )

    return report


def _gb(n: int) -> str:
    """Bytes as GB with one decimal (MB below 1 GB), as the notices say them."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def bounded_sampling(sampling: SamplingParams, vocab: int, prompt_tokens: int, context: int) -> SamplingParams:
    """`sampling` checked against the model, with max_tokens cut to the room left in the context.

    top_k above the vocabulary and logit_bias ids outside it are refused (ProtocolError naming
    the field); top_k equal to the vocabulary keeps every token, so it becomes 0 (off). A request
    whose prompt plus max_tokens passes the context stops at the context with finish_reason
    "length" (vocab or context 0: unknown, not checked).
    """
    top_k = sampling.top_k
    if vocab:
        if top_k > vocab:
            raise ProtocolError(f"top_k is {top_k}, more than the model's vocabulary of {vocab} tokens",
                                field="chat.sampling.top_k")
        outside = sorted(t for t in (sampling.logit_bias or {}) if not 0 <= t < vocab)
        if outside:
            raise ProtocolError(f"logit_bias names token {outside[0]}; the model's token ids are 0 to {vocab - 1}",
                                field="chat.sampling.logit_bias")
        top_k = 0 if top_k == vocab else top_k
    max_tokens = sampling.max_tokens
    if context:
        max_tokens = max(1, min(max_tokens, context - prompt_tokens))
    return dataclasses.replace(sampling, top_k=top_k, max_tokens=max_tokens)


def _vocab_size(engine: "Engine") -> int:
    """Rows of the model's output (its vocabulary), from config.json; 0 when unknown."""
    config = getattr(engine, "config", None) or {}
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    value = text.get("vocab_size", config.get("vocab_size", 0)) if isinstance(text, dict) else 0
    return int(value) if isinstance(value, int) and value > 0 else 0


def prompt_cache_bound(engine: "Engine", prompt_cache_mb: float) -> int:
    """Bytes the prompt cache may keep: as asked, but under a memory limit no more than the KV
    room the memory budget counted (the footprint must stay under the limit)."""
    asked = int(prompt_cache_mb * 2**20)
    plan = getattr(engine, "plan", None)
    if plan is None or not getattr(plan, "memory_limit_bytes", None):
        return asked
    kv_room = int(plan.budget.get("needs", {}).get("kv_bytes", asked))
    return min(asked, kv_room)


def _turn_figures(turn: _Turn) -> MessageFigures:
    """Combine the stats of a turn's engine calls into the message's figures."""
    f = MessageFigures()
    hits = misses = 0
    for s in turn.stats:
        f.prompt_tokens += s.prompt_tokens
        f.bytes_read += s.prefill.bytes_read + s.decode.bytes_read
        hits += s.prefill.cache_hits + s.decode.cache_hits
        misses += s.prefill.cache_misses + s.decode.cache_misses
        f.peak_rss_bytes = max(f.peak_rss_bytes, s.peak_rss_bytes)
    prompt_s = sum(s.prompt_s for s in turn.stats)
    if turn.stats:
        last = turn.stats[-1]
        f.reused_tokens = turn.stats[0].reused_tokens
        f.generated_tokens = last.generated_tokens
        f.decode_tps = last.decode_tps
    f.prompt_tps = f.prompt_tokens / prompt_s if prompt_s > 0 else 0.0
    f.ttft_s = (turn.first_token_at - turn.started) if turn.first_token_at else 0.0
    f.elapsed_s = time.perf_counter() - turn.started
    f.cache_hit_rate = hits / (hits + misses) if hits + misses else 0.0
    return f


def _loaded_event(engine: "Engine", fmt: ChatFormat, load_s: float) -> LoadedEvent:
    config = engine.config.get("text_config", engine.config)
    plan = engine.plan.to_dict()
    return LoadedEvent(
        model_dir=str(engine.model_dir),
        name=Path(engine.model_dir).name,
        model_type=engine.model_type,
        num_layers=int(config.get("num_hidden_layers", 0)),
        num_experts=int(plan.get("experts_per_layer", config.get("num_experts", 0)) or 0),
        experts_per_token=int(plan.get("experts_per_token", 0) or 0),
        context_length=int(getattr(engine, "context_length", 0) or config.get("max_position_embeddings", 0) or 0),
        supports_tools=fmt.supports_tools,
        supports_thinking=fmt.supports_thinking,
        plan=plan,
        load_s=load_s,
        ranks=engine.parallel.size if engine.parallel is not None else 1,
    )


def error_event(exc: BaseException, request_id: str | None = None) -> ErrorEvent:
    """Turn an exception into an error event; only memory exhaustion marks the engine unusable."""
    if isinstance(exc, MoeBarError):
        usable = bool(getattr(exc, "usable", True))  # e.g. a lost peer rank leaves the engine unusable
        return ErrorEvent(code=exc.code, message=str(exc), usable=usable, id=request_id, field=getattr(exc, "field", None))
    if is_out_of_memory(exc):  # MemoryError, or Metal/CUDA exhaustion arriving as a RuntimeError
        return ErrorEvent(code="out_of_memory", message=out_of_memory_message(exc), usable=False, id=request_id)
    return ErrorEvent(code="internal_error", message=f"{type(exc).__name__}: {exc}", usable=True, id=request_id)
