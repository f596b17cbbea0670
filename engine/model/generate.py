"""The generation loop: chunked prefill, then one token per step, with each step's figures."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from engine.errors import RequestError
from engine.platform_info import peak_rss_bytes
from engine.model.streamed_moe import ExpertStreamer
from engine.types import GenerationStats, SamplingParams, StepFigures, TokenEvent

NO_TOKEN = -1  # token id of the event that only reports a cancellation


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
) -> Iterator[TokenEvent]:
    """Prefill ``prompt_tokens`` into ``kv_cache`` in chunks, then decode until eos or the limit.

    Each event carries the token and the figures of the step that made it; the first token's
    step is the whole prefill. A cancelled generation ends with an event whose token is NO_TOKEN.
    """
    if len(prompt_tokens) == 0:
        raise RequestError("the prompt has no new tokens to process")
    if sampling.max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    should_stop = stop or (lambda: False)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = _sampler(sampling)
    processors = (
        make_logits_processors(repetition_penalty=sampling.repetition_penalty)
        if sampling.repetition_penalty != 1.0
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
        return sampler(logprobs)

    def finish_step(t0: float, tokens: int) -> StepFigures:
        fig = streamer.take_figures()
        fig.tokens = tokens
        fig.elapsed_s = time.perf_counter() - t0
        fig.compute_s = max(0.0, fig.elapsed_s - fig.io_wait_s - fig.sync_s)
        return fig

    # Prefill: route each chunk together, so each needed expert is read once per chunk. All but
    # the last prompt token go in chunks whose outputs are never used (only the caches are), so
    # the last MoE layer is skipped there; the last token then runs alone for its logits.
    t0 = time.perf_counter()
    prompt = mx.array(list(prompt_tokens))
    n = len(prompt_tokens)
    chunk = max(1, prefill_chunk)
    if streamer.last_layer_is_final_block:
        streamer.skip_layer = len(streamer.layers) - 1
    try:
        for start in range(0, n - 1, chunk):
            if should_stop():
                stats.prefill.add(finish_step(t0, start))
                yield TokenEvent(NO_TOKEN, stats.prefill, stats, "cancelled")
                return
            model(prompt[start : min(start + chunk, n - 1)][None], cache=kv_cache)
            mx.eval([c.state for c in kv_cache])
            streamer.release_pins()
    finally:
        streamer.skip_layer = None
    syncs_before_last = streamer.host_syncs
    token = sample(model(prompt[n - 1 :][None], cache=kv_cache))
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
