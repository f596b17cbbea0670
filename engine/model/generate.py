"""The generation loop: prefill (layer-major passes or chunks), then one token per step, with each step's figures."""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engine.errors import RequestError
from engine.platform_info import peak_rss_bytes
from engine.model.kernel_shapes import MLX_LM_PREFILL_STEP, short_step_tail
from engine.model.layer_prefill import PassReporter, run_pass
from engine.model.prefill_progress import CacheCheckpoint, PrefillCancelled, ProgressFn
from engine.model.streamed_moe import ExpertStreamer
from engine.types import GenerationStats, SamplingParams, StepFigures, TokenEvent

NO_TOKEN = -1  # token id of the event that only reports a cancellation


def request_seed(seed: int | None) -> int:
    """The seed of a generation's random state: its own seed (any int, folded to 64 bits) or a fresh one."""
    return secrets.randbits(64) if seed is None else seed % 2**64


def _sampler(sampling: SamplingParams) -> Callable[[mx.array], mx.array]:
    return make_sampler(
        temp=sampling.temperature,
        top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0,
        min_p=sampling.min_p,
        top_k=sampling.top_k,
    )


def generate_tokens(
    model: nn.Module,
    streamer: ExpertStreamer,
    kv_cache: list[Any],
    prompt_tokens: Sequence[int],
    sampling: SamplingParams,
    *,
    eos_token_ids: set[int],
    stop: Callable[[], bool] | None = None,
    reused_tokens: int = 0,
    prefill_chunk: int = 512,
    pass_tokens: int = 0,
    on_prefill: ProgressFn | None = None,
    context_length: int = 0,
    mlx_lm_shapes: bool = False,
) -> Iterator[TokenEvent]:
    """Prefill ``prompt_tokens`` into ``kv_cache``, then decode until eos or the limit.

    With ``pass_tokens`` > 0 (a model ``layer_prefill`` supports) the prompt is prefilled
    layer-major in passes of that many tokens, each routed expert read once per layer per pass;
    otherwise in chunks of ``prefill_chunk`` tokens through the whole model. ``on_prefill`` gets
    a ``PrefillProgress`` after every layer (see prefill_progress); ``stop`` is polled between
    layers and expert groups, and a cancelled prefill leaves the cache at its last whole pass.
    A prompt that with ``reused_tokens`` reaches ``context_length`` (when > 0) is refused before
    anything is read. Each event carries the token and the figures of the step that made it; the
    first token's step is the whole prefill. A cancelled generation ends with an event whose
    token is NO_TOKEN. With ``mlx_lm_shapes`` (backends whose rows depend on their call, see
    engine.model.kernel_shapes) every call has mlx-lm's shape: all but the last token in steps
    of MLX_LM_PREFILL_STEP (``pass_tokens`` a multiple of it), then the last token alone.
    """
    if len(prompt_tokens) == 0:
        raise RequestError("the prompt has no new tokens to process")
    if context_length > 0 and reused_tokens + len(prompt_tokens) >= context_length:
        raise RequestError(
            f"the prompt has {reused_tokens + len(prompt_tokens)} tokens ({reused_tokens} reused); "
            f"the model's context is {context_length} tokens, with room needed for at least one new token"
        )
    if sampling.max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    should_stop = stop or (lambda: False)
    # Each generation starts its own random state: from its seed, or fresh when it has none. So no
    # earlier request (one that failed half-way included) changes what this one samples, and a
    # seeded request gives the same tokens whatever ran before it.
    mx.random.seed(request_seed(sampling.seed))
    sampler = _sampler(sampling)
    processors = (
        make_logits_processors(
            logit_bias=sampling.logit_bias or None,
            repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
        )
        if sampling.repetition_penalty != 1.0 or sampling.logit_bias
        else []
    )
    history = list(prompt_tokens)
    stats = GenerationStats(reused_tokens=reused_tokens)
    t_start = time.perf_counter()
    streamer.take_figures()
    streamer.in_prefill = True  # (marks the prompt's lines of a routing trace)

    def sample(logits: mx.array) -> mx.array:
        logits = logits[:, -1, :]
        if processors:
            context = mx.array(history)
            for proc in processors:
                logits = proc(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if streamer.parallel is not None:  # several machines: every rank takes rank 0's token
            return streamer.parallel.agree_token(sampler(logprobs))
        return sampler(logprobs)

    def finish_step(t0: float, tokens: int) -> StepFigures:
        fig = streamer.take_figures()
        fig.tokens = tokens
        fig.elapsed_s = time.perf_counter() - t0
        fig.compute_s = max(0.0, fig.elapsed_s - fig.io_wait_s - fig.sync_s)
        return fig

    # Prefill. Layer-major (pass_tokens > 0): the whole prompt in passes, the last pass giving
    # the last token's logits. Chunked: all but the last token fill the caches only (their
    # outputs are never used, so the last MoE layer is skipped there); the last token then runs
    # alone through the model for its logits.
    t0 = time.perf_counter()
    n = len(prompt_tokens)
    layer_major = pass_tokens > 0
    # The last token in the last pass saves a step where rows are independent; with mlx-lm's
    # shapes it runs alone, as in mlx-lm.
    last_in_pass = layer_major and not mlx_lm_shapes
    todo = list(prompt_tokens) if last_in_pass else list(prompt_tokens[: n - 1])
    chunk = MLX_LM_PREFILL_STEP if mlx_lm_shapes else max(1, prefill_chunk)
    step = max(1, pass_tokens if layer_major else chunk)
    passes = -(-len(todo) // step)
    reporter = PassReporter(on_prefill, len(todo), passes, len(getattr(model, "layers", [])), lambda: streamer.figures.bytes_read)
    syncs_before_last = streamer.host_syncs
    logits: mx.array | None = None

    def check_stop() -> None:
        if should_stop():
            raise PrefillCancelled("stopped during the prefill")

    def after_layer(i: int) -> None:
        reporter.report(i + 1)
        check_stop()

    if not layer_major and streamer.last_layer_is_final_block:
        streamer.skip_layer = len(streamer.layers) - 1
    try:
        for index, start in enumerate(range(0, len(todo), step)):
            piece = todo[start : start + step]
            reporter.pass_index, reporter.pass_tokens = index, len(piece)
            checkpoint = CacheCheckpoint.of(kv_cache)
            # Stop mid-pass (between expert groups) only where the pass can be rolled back.
            # (not on several machines: the number of expert groups differs between ranks, and every
            # stop check there is a collective that all ranks must make at the same points)
            streamer.abort_check = check_stop if checkpoint is not None and streamer.parallel is None else None
            try:
                check_stop()
                reporter.report(0)
                if layer_major:
                    syncs_before_last = streamer.host_syncs
                    logits = run_pass(
                        model, kv_cache, piece, last=last_in_pass and start + step >= len(todo), attention_chunk=chunk,
                        between_layers=after_layer, tail_alone=short_step_tail(len(piece)) if mlx_lm_shapes else 0,
                    )
                else:
                    model(mx.array(piece)[None], cache=kv_cache)
                    mx.eval([c.state for c in kv_cache])
                    reporter.report(reporter.layers_total)
            except PrefillCancelled:
                mx.synchronize()  # nothing queued may still read a slot or write the cache
                streamer.release_pins()
                if checkpoint is not None:
                    checkpoint.restore()
                stats.prefill.add(finish_step(t0, reporter.tokens_done))
                streamer.in_prefill = False  # the next generation's trace lines start afresh
                yield TokenEvent(NO_TOKEN, stats.prefill, stats, "cancelled")
                return
            streamer.release_pins()
            reporter.tokens_done += len(piece)
    finally:
        streamer.skip_layer = None
        streamer.abort_check = None
    if logits is None:
        syncs_before_last = streamer.host_syncs
        logits = model(mx.array(list(prompt_tokens[n - 1 :]))[None], cache=kv_cache)
    token = sample(logits)
    mx.eval(token)
    streamer.release_pins()
    streamer.in_prefill = False
    fig = finish_step(t0, n)
    stats.prefill = fig
    stats.prompt_tokens = n
    stats.prompt_s = fig.elapsed_s
    stats.ttft_s = time.perf_counter() - t_start
    t_first = time.perf_counter()
    generated = 0
    # A step that needed no host sync (every layer routed on the device) can be queued before the
    # token it starts from is read, as mlx-lm does: the device computes token i+1 while the host
    # reads token i. If generation then ends, that step is undone by trimming the KV cache.
    may_queue = not processors and can_trim_prompt_cache(kv_cache)
    lazy = streamer.host_syncs == syncs_before_last
    t_ready = time.perf_counter()
    queued = False
    while True:
        ahead = None
        if may_queue and lazy and generated + 1 < sampling.max_tokens:
            syncs = streamer.host_syncs
            ahead = sample(model(token.reshape(1, 1), cache=kv_cache))
            mx.async_eval(ahead)
            lazy = streamer.host_syncs == syncs
        tok = int(token.item())  # type: ignore[arg-type]
        if generated > 0 and queued:
            fig = finish_step(t_ready, 1)  # this token's step was queued one token earlier
            stats.decode.add(fig)
        t_ready = time.perf_counter()
        history.append(tok)
        generated += 1
        stats.generated_tokens = generated
        stats.decode_s = time.perf_counter() - t_first
        reason = "stop" if tok in eos_token_ids else ("length" if generated >= sampling.max_tokens else None)
        if reason is not None or generated % 16 == 1:
            stats.peak_rss_bytes = peak_rss_bytes()  # reads /proc: not every token
        try:
            yield TokenEvent(tok, fig, stats, reason)
        except GeneratorExit:  # closed by the consumer: leave the cache as it would be unqueued
            _undo_queued_step(ahead, streamer, kv_cache)
            raise
        cancelled = reason is None and should_stop()
        if reason is not None or cancelled:
            _undo_queued_step(ahead, streamer, kv_cache)
        if reason is not None:
            return
        if cancelled:
            yield TokenEvent(NO_TOKEN, StepFigures(), stats, "cancelled")
            return
        queued = ahead is not None
        if ahead is not None:
            token = ahead
            continue
        t0 = time.perf_counter()
        syncs = streamer.host_syncs
        out = model(token.reshape(1, 1), cache=kv_cache)
        token = sample(out)
        lazy = streamer.host_syncs == syncs
        mx.eval(token)
        streamer.release_pins()
        fig = finish_step(t0, 1)
        stats.decode.add(fig)
        t_ready = time.perf_counter()


def _undo_queued_step(ahead: mx.array | None, streamer: ExpertStreamer, kv_cache: list[Any]) -> None:
    """Take a step queued ahead (whose token will not be used) back out of the KV cache."""
    if ahead is None:
        return
    mx.eval(ahead)  # let it finish writing the cache before the cache is trimmed
    streamer.release_pins()
    trim_prompt_cache(kv_cache, 1)
