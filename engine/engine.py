"""Engine: the one object both front-ends use — load a model, generate, report figures."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from engine.storage.expert_layout import LayerExperts
from engine.storage.expert_store import ExpertStore, page_aligned_empty, reads_land_directly
from engine.storage.packed_layout import PackedLayer
from engine.storage.read_choice import ReadChoice, choose_read_pieces
from engine.errors import RequestError
from engine.model.expert_parallel import ExpertParallel, attach_expert_parallel
from engine.model.array_limits import backend
from engine.model.generate import generate_tokens
from engine.model.kernel_shapes import aligned_pass_tokens, mirror_setting
from engine.model.layer_prefill import context_length, pass_shape, pass_tokens, prefill_memory_bytes, supports_layer_major
from engine.model.prefill_progress import ProgressFn as PrefillProgressFn
from engine.platform_info import memory_info
from engine.model.loader import ProgressFn, StreamedModel, load_streamed_model
from engine.model.plan import MemoryPlan, make_plan
from engine.types import EngineOptions, SamplingParams, TokenEvent
from engine.diagnostics.traces import TraceHeader, TraceRecorder
from engine.errors import MoeBarError
from engine.model.cache_resize import CacheResizer, ResizeOutcome
from engine.model.hot_set import HotSetWarmer, hot_set_path, read_hot_set, save_hot_set

log = logging.getLogger(__name__)


def measure_expert_read_speed(
    layers: Sequence[LayerExperts], *, io_threads: int = 4, samples: int = 32, seed: int = 0,
    packed: Sequence[PackedLayer] | None = None, piece_bytes: int | None = None, per_batch: int = 0,
    drop_cache: bool = True, aligned: bool = False,
) -> float:
    """Read ``samples`` random experts cold, in parallel, through the store (``piece_bytes``: its read
    pieces, None for the cold default); return bytes/s.

    ``packed``: read that layout (a rank's share has no other), only the experts it holds.
    ``per_batch`` > 0: submit that many at a time and wait for each batch, as decode waits for a
    layer's experts (0: all at once). ``drop_cache``: evict the store's files from the page cache
    first (a later call may skip it: cold reads do not fill the cache). ``aligned``: read into
    page-aligned buffers, as the engine's slots are where O_DIRECT reads skip the staging copy.
    """
    rng = random.Random(seed)
    # (a measurement of the disk: checksums are the engine's own store's, on its first read of each expert)
    store = ExpertStore(layers, io_threads=io_threads, cold=True, packed=packed, piece_bytes=piece_bytes, verify="never")
    try:  # (from here on, whatever raises still closes the store's files and I/O threads)
        picks = [(rng.randrange(len(layers)), 0) for _ in range(samples)]
        picks = [(l, rng.randrange(layers[l].num_experts)) for l, _ in picks]
        if packed:  # the packed layout: the same draws, mapped onto the experts it holds (a rank's share holds some)
            held = [range(p.rank, layer.num_experts, p.ranks) for p, layer in zip(packed, layers)]
            picks = [(l, e if store.holds(l, e) else held[l][e % len(held[l])]) for l, e in picks]
        if drop_cache:
            store.drop_page_cache()
        # (off the page boundary unless aligned: such reads go through the staging buffer, as the slots' would)
        buffers = [[page_aligned_empty(p.nbytes) if aligned else np.empty(p.nbytes + 1, dtype=np.uint8)[1:]
                    for p in layers[l].params] for l, _ in picks]  # fmt: skip
        step = per_batch if per_batch > 0 else len(picks)
        total, elapsed = 0, 0.0
        for start in range(0, len(picks), step):
            t0 = time.perf_counter()
            futures = [store.submit(l, e, bufs) for (l, e), bufs in zip(picks[start : start + step], buffers[start : start + step])]
            total += sum(f.result() for f in futures)
            elapsed += time.perf_counter() - t0
    finally:
        store.close()
    return total / elapsed if elapsed > 0 else 0.0


def _measure_reads(loaded: StreamedModel, options: EngineOptions) -> ReadChoice:
    """Cold reads of the model's experts, whole and in pieces, in batches of K as decode reads them
    (two batches a measurement, three measurements each way: 6K experts both ways together)."""
    packed = loaded.store.packed  # the layout the engine reads (O_DIRECT where packed), a rank's share included
    k = max(1, loaded.k)
    caches = loaded.streamer.caches
    aligned = bool(caches) and reads_land_directly(caches[0].pool.dests(0))  # as the engine's reads will land
    dropped: list[bool] = []  # the page cache is evicted once (on a Mac that walks every expert file)

    def measure(piece_bytes: int, round_: int) -> float:
        rate = measure_expert_read_speed(loaded.layers, io_threads=options.io_threads, samples=2 * k, seed=round_,
                                         packed=packed, piece_bytes=piece_bytes, per_batch=k,
                                         drop_cache=not dropped, aligned=aligned)  # fmt: skip
        dropped.append(True)
        return rate

    return choose_read_pieces(measure)


class Engine:
    """A streamed MoE model ready to generate: tokenizer, KV caches, expert figures and plan."""

    def __init__(self, loaded: StreamedModel, model_dir: Path, options: EngineOptions, plan: MemoryPlan) -> None:
        self._loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.model_type: str = loaded.config["model_type"]
        self.model_dir = model_dir
        self.options = options
        self.plan = plan
        self._trace_runs = 0  # generations recorded into options.trace_dir
        self._hot_set_saved_at = time.monotonic()
        self.warmer: HotSetWarmer | None = None
        self.read_choice: ReadChoice | None = None  # whole reads against pieces, measured at load
        self.parallel: ExpertParallel | None = None
        self.cache_resizer = CacheResizer(loaded.streamer, loaded.switches)  # memory pressure (service)
        try:
            self.context_length = context_length(loaded.config)  # 0 when config.json does not say
            self.layer_major_prefill = supports_layer_major(loaded.model)
            # where rows depend on their call (a GPU), every call gets mlx-lm's shape: same tokens
            where = backend()
            self.mlx_lm_shapes = mirror_setting(options.mlx_lm_shapes, where)
            loaded.streamer.kernel_backend = where if self.mlx_lm_shapes else "cpu"
            self.prefill_pass_tokens = self._pass_tokens()
            self.parallel = attach_expert_parallel(
                loaded.streamer,
                model_dir,
                {"k": loaded.k, "device": options.device, "prefill_matmul": options.prefill_matmul,
                 "prefill_chunk": options.prefill_chunk, "layer_major": self.layer_major_prefill,
                 "mlx_lm_shapes": self.mlx_lm_shapes},
            )
            if self.parallel is not None and self.prefill_pass_tokens:
                # every rank must cut the prompt at the same places (same collectives, same sums)
                agreed = mx.distributed.all_min(mx.array(self.prefill_pass_tokens), group=self.parallel.group)
                self.prefill_pass_tokens = int(agreed.item())  # type: ignore[arg-type]
            if options.hot_set_dir:
                # after joining the ranks: a rank warms only the experts it owns (read_hot_set)
                keys = read_hot_set(hot_set_path(options.hot_set_dir, model_dir), loaded.streamer)
                if keys:  # read in the background into free slots; never in a request's way (hot_set)
                    self.warmer = HotSetWarmer(loaded.streamer, keys, options.io_threads).start()
        except BaseException:  # a refused rank, a lost peer: release what the load opened
            self._release()
            raise

    def _release(self) -> None:
        """Stop the warm start and close the store's files and I/O threads (nothing saved)."""
        try:
            if self.warmer is not None:
                self.warmer.stop()
            self._loaded.streamer.drain_prefetch()
        finally:
            self._loaded.store.close()

    def _pass_tokens(self) -> int:
        """Tokens per layer-major prefill pass (0 where the family is prefilled chunk by chunk)."""
        if not self.layer_major_prefill:
            return 0
        n = self._budget_pass_tokens()
        return aligned_pass_tokens(n) if self.mlx_lm_shapes else n

    def _budget_pass_tokens(self) -> int:
        if self.options.prefill_pass_tokens > 0:
            return self.options.prefill_pass_tokens
        on_cpu = self._loaded.activation_dtype == "float32"
        shape = pass_shape(self.config, self._loaded.k, 4 if on_cpu else 2)
        budget = prefill_memory_bytes(self.options.prefill_memory_mb, memory_info().total_bytes)
        memory = self._loaded.budget
        if self.options.prefill_memory_mb is None and memory.limit_bytes is not None:
            # under --memory-limit-mb a pass gets what the budget set aside for prefill, no more
            budget = min(budget, memory.needs.prefill_bytes)
        # MLX's CPU attention materialises the scores; its GPU kernels do not.
        return pass_tokens(shape, budget, self.context_length or 32768, on_cpu, max(1, self.options.prefill_chunk))

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        options: EngineOptions | None = None,
        progress: ProgressFn | None = None,
        *,
        measure_disk: bool = True,
    ) -> "Engine":
        """Load ``model_dir`` with its experts streamed; raises ModelError subclasses on bad input."""
        options = options or EngineOptions()
        path = Path(model_dir).expanduser().resolve()
        loaded = load_streamed_model(path, options, progress)
        try:
            disk = None
            read_choice = None
            if measure_disk:
                read_choice = _measure_reads(loaded, options)
                disk = read_choice.best_bytes_per_s
                if options.cold and options.read_piece_kb is None:  # no setting: the faster way here
                    loaded.store.piece_bytes = read_choice.piece_bytes
                log.info("%s (kept for cold mode: %s)", read_choice.describe(), bool(options.cold and options.read_piece_kb is None))
            plan = make_plan(
                model_type=loaded.config["model_type"],
                moe_layers=len(loaded.layers),
                experts_per_layer=loaded.layers[0].num_experts,
                k=loaded.k,
                trained_k=loaded.trained_k,
                dense_bytes=loaded.dense_bytes,
                expert_bytes_total=loaded.expert_bytes_total,
                expert_bytes=loaded.layers[0].expert_bytes,
                budget=loaded.budget,
                disk_read_bytes_per_s=disk,
                layout=loaded.store.layout,
            )
        except BaseException:
            loaded.store.close()
            raise
        engine = cls(loaded, path, options, plan)  # (which closes the store itself if it raises)
        engine.read_choice = read_choice
        return engine

    @property
    def experts_per_token(self) -> int:
        """K in use (the trained value unless overridden)."""
        return self._loaded.k

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end an answer."""
        return set(self.tokenizer.eos_token_ids)

    def make_kv_cache(self) -> list[Any]:
        """A fresh KV (and linear-attention) cache for this model."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def generate(
        self, prompt_tokens: Sequence[int], sampling: SamplingParams, *args: Any, **kwargs: Any
    ) -> Iterator[TokenEvent]:
        """Generate (see ``_generate`` for the arguments); records a routing trace per generation
        when ``options.trace_dir`` is set, and keeps the hot set of ``options.hot_set_dir`` fresh."""
        return self._observed(self._generate(prompt_tokens, sampling, *args, **kwargs))

    def _observed(self, events: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        started = None
        if self.options.trace_dir and self._loaded.streamer.trace is None:
            self._trace_runs += 1
            name = f"trace-{time.strftime('%Y%m%d-%H%M%S')}-{self._trace_runs}.jsonl"
            try:
                started = self.start_trace(Path(self.options.trace_dir).expanduser() / name)
            except (OSError, MoeBarError) as e:  # a diagnostic: the answer goes on without it
                log.warning("routing trace not recorded: %s", e)
        try:
            yield from events
        finally:
            if started is not None:
                self.stop_trace()
            if self.options.hot_set_dir and time.monotonic() - self._hot_set_saved_at > 60:
                try:
                    self.save_hot_set()
                except OSError as e:  # a warm start is an optimisation: never fail an answer for it
                    log.warning("hot set not saved: %s", e)

    def start_trace(self, path: str | Path) -> TraceRecorder:
        """Record the routing of every layer call to ``path`` (JSON lines, diagnostics.traces).

        While recording, fully resident layers route on the host (the ids are needed there).
        """
        loaded = self._loaded
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        header = TraceHeader(
            self.model_type, len(loaded.layers), loaded.layers[0].num_experts, loaded.k, loaded.layers[0].expert_bytes
        )
        self.stop_trace()
        loaded.streamer.trace = TraceRecorder(path, header)
        return loaded.streamer.trace

    def stop_trace(self) -> None:
        """Finish the routing trace being recorded, if any."""
        recorder, self._loaded.streamer.trace = self._loaded.streamer.trace, None
        if recorder is not None:
            recorder.close()

    def save_hot_set(self) -> int:
        """Write the ids of the cached experts to ``options.hot_set_dir``; return how many."""
        self._hot_set_saved_at = time.monotonic()
        if not self.options.hot_set_dir:
            return 0
        path = hot_set_path(self.options.hot_set_dir, self.model_dir)
        return save_hot_set(self._loaded.streamer, path, self.options.cache_policy)

    def _generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        stop: Callable[[], bool] | None = None,
        kv_cache: list[Any] | None = None,
        reused_tokens: int = 0,
        on_prefill: PrefillProgressFn | None = None,
    ) -> Iterator[TokenEvent]:
        """Prefill ``prompt_tokens`` (after what ``kv_cache`` holds) and yield generated tokens.

        ``on_prefill(PrefillProgress)`` is called after every layer of the prefill (see
        engine.model.prefill_progress); ``stop()`` is polled there too, and a stopped prefill
        leaves ``kv_cache`` holding whole passes only. A prompt that does not fit the model's
        context is refused (RequestError) before anything is read.
        """
        if self.context_length and reused_tokens + len(prompt_tokens) >= self.context_length:
            raise RequestError(
                f"the prompt has {reused_tokens + len(prompt_tokens)} tokens ({reused_tokens} reused); the model's context is "
                f"{self.context_length} tokens, with room needed for at least one new token"
            )
        if self.parallel is not None:
            stop = self.parallel.agreed_stop(stop)  # every rank stops where rank 0 does
        cache = kv_cache if kv_cache is not None else self.make_kv_cache()
        return generate_tokens(
            self.model,
            self._loaded.streamer,
            cache,
            prompt_tokens,
            sampling,
            eos_token_ids=self.eos_token_ids,
            stop=stop,
            reused_tokens=reused_tokens,
            prefill_chunk=self.options.prefill_chunk,
            pass_tokens=self.prefill_pass_tokens,
            on_prefill=on_prefill,
            context_length=self.context_length,
            mlx_lm_shapes=self.mlx_lm_shapes,
        )

    def preload_experts(self) -> int:
        """Read now every expert of the cache pools that can hold all of theirs; return bytes read.

        With a cache budget as large as the experts, this makes every layer resident at once, and
        such layers then route on the device with no host sync per layer.
        """
        return self._loaded.streamer.preload()

    def set_device_routing(self, enabled: bool) -> None:
        """Let fully resident layers route on the device (default), or force the host sync path."""
        self._loaded.streamer.device_routing = enabled

    def resize_expert_cache(self, direction: str) -> ResizeOutcome | None:
        """Halve ("shrink") or double ("grow", up to the budget's size) the in-process expert cache;
        None when it cannot go further. Only between requests (the engine thread, no generation
        running): the warm start is stopped first, so that no read fills a slot being dropped."""
        if direction not in ("shrink", "grow"):
            raise ValueError(f"direction must be 'shrink' or 'grow', got {direction!r}")
        if self.warmer is not None:
            self.warmer.stop()
        return self.cache_resizer.shrink() if direction == "shrink" else self.cache_resizer.grow()

    def expert_counters(self) -> dict[str, int]:
        """Cumulative expert figures since load: bytes read, cache hits and misses, resident bytes."""
        s = self._loaded.streamer
        return {
            "bytes_read": self._loaded.store.bytes_read,
            "cache_hits": s.hits,
            "cache_misses": s.misses,
            "cache_saved_bytes": s.saved_bytes,
            "prefetched_hits": s.prefetched_hits,
            "device_routed_calls": s.device_routed_calls,
            "resident_bytes": s.resident_bytes + self._loaded.dense_bytes,
            "expert_cache_bytes": s.resident_bytes,
            "expert_cache_full_bytes": self.cache_resizer.full_resident_bytes,  # before any pressure shrink
        }

    def close(self) -> None:
        """Release the I/O threads and files (after saving the hot set, when kept)."""
        if self.warmer is not None:
            self.warmer.stop()
        self.stop_trace()
        if self.options.hot_set_dir:
            try:
                self.save_hot_set()
            except OSError as e:  # a warm start is an optimisation: closing must not fail for it
                log.warning("hot set not saved: %s", e)
        self._loaded.streamer.drain_prefetch()
        self._loaded.store.close()
