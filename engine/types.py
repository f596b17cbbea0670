"""Plain data shared by the engine's stages and front-ends: options, sampling, per-token figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EngineOptions:
    """How a model is loaded and streamed."""

    # in-process expert cache budget (MiB); None: sized from this machine (engine.model.memory_budget);
    # the OS page cache is beyond it
    cache_mb: float | None = 0.0
    memory_limit_mb: float | None = None  # cap of the whole footprint (RSS + MLX buffers); None: no cap
    context_tokens: int = 8192  # the context the budget keeps KV-cache room for
    # activations: "auto" (fp32 on the CPU, the model's own dtype on a GPU), "float32" or
    # "bfloat16" (the dense weights cast to it; bf16 runs as Macs run real models)
    activation_dtype: str = "auto"
    experts_per_token: int | None = None  # override K; None keeps the model's trained value
    cold: bool = False  # bypass the OS page cache on expert reads (honest disk figures)
    io_threads: int = 4  # parallel pread workers
    # an expert's read is cut into pieces of this many KiB that the I/O threads share (0: one
    # read per expert); None: for cold reads (past the page cache) the faster of 1024 and 0 as
    # measured at load (engine.storage.read_choice; 1024 when the load measures nothing), 0 for
    # reads through the page cache (see engine.storage.expert_store.piece_bytes_for)
    read_piece_kb: int | None = None
    # prompt tokens per attention call of a prefill pass (and per chunk for model families that
    # engine.model.layer_prefill cannot run layer by layer)
    prefill_chunk: int = 512
    # prompt tokens per prefill pass over the experts (each routed expert is read once per layer
    # per pass); 0: as many as prefill_memory_mb holds (see engine.model.layer_prefill)
    prefill_pass_tokens: int = 0
    prefill_memory_mb: float | None = None  # working memory of one pass; None: min(2 GiB, RAM / 8)
    prefetch: bool = False  # read layer l+1's predicted experts while layer l computes
    # expert cache replacement policy (engine.model.cache_policies: wtinylfu-ghost@layer, lru-layer,
    # lru, arc, wtinylfu, lrfu, lfu, lrfu:HALF_LIFE, NAME@layer, ...)
    cache_policy: str = "wtinylfu-ghost@layer"
    # folder of the per-model hot sets (warm start: the cached experts' ids, read back after a
    # load); "" keeps none
    hot_set_dir: str = ""
    trace_dir: str = ""  # folder where each generation writes a routing trace; "" records none
    device: str = "auto"  # "auto", "cpu" or "gpu"
    use_packed: bool = True  # use the packed per-expert layout when present
    cpu_split: bool = True  # on CPU, split the output projection over the cores (exact)
    # long prefill calls: on the CPU dequantize + dense GEMM ("auto": where MLX has a fast BLAS),
    # on a GPU one quantized matmul per expert run ("on" only); see engine.model.prefill_matmul
    prefill_matmul: str = "auto"
    # give every MLX call mlx-lm's shape (prompt steps of 2048, the last token alone, split expert
    # calls padded to the whole call's kernel): "auto" where a row's result depends on its call
    # (the GPU), "on"/"off" to force it; see engine.model.kernel_shapes
    mlx_lm_shapes: str = "auto"
    # before a call of a streaming layer on at most 2K experts (decode, a cold prefill's groups),
    # copy them out of the slot pool into one compact array, so that a GPU reads host-resident
    # slots in one bulk copy instead of inside the expert kernels; the same kernels on the same
    # bytes ("auto": where slot pools are CUDA
    # managed memory; on an H100 a cold token's expert compute fell from 39 to 15.5 ms, the same
    # tokens; see engine.model.streamed_moe)
    gather_slots: str = "auto"
    # give the in-process expert cache's memory back under memory pressure (halve it on "critical"
    # or a lasting "warning", grow it back after a calm spell; engine.serving.pressure_policy);
    # False keeps the cache at the budget's size whatever the pressure
    shrink_cache_under_pressure: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-ready dict."""
        return asdict(self)


@dataclass
class SamplingParams:
    """Sampling settings for one generation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling


@dataclass
class StepFigures:
    """What one forward step (a decode token or a prefill chunk) cost."""

    tokens: int = 0  # tokens processed by this step
    bytes_read: int = 0  # expert bytes read from disk (or page cache) by the engine
    cache_hits: int = 0  # expert lookups served by the in-process cache
    cache_misses: int = 0  # expert lookups that needed a read
    io_wait_s: float = 0.0  # time the compute thread waited for expert reads
    sync_s: float = 0.0  # time spent evaluating up to the router (host synchronisation)
    compute_s: float = 0.0  # time spent in the rest of the forward pass
    elapsed_s: float = 0.0  # wall time of the step

    def add(self, other: "StepFigures") -> None:
        """Accumulate another step's figures into this one."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """Return the figures as a JSON-ready dict."""
        return asdict(self)


@dataclass
class GenerationStats:
    """Running figures of one generation (kept for the message when it ends)."""

    prompt_tokens: int = 0  # prompt tokens prefilled in this generation (not reused ones)
    reused_tokens: int = 0  # prompt tokens served by the prompt cache
    generated_tokens: int = 0
    prompt_s: float = 0.0  # prefill wall time
    decode_s: float = 0.0  # wall time from first token to last
    ttft_s: float = 0.0  # request start to first token
    prefill: StepFigures = field(default_factory=StepFigures)
    decode: StepFigures = field(default_factory=StepFigures)
    peak_rss_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (prefill only)."""
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second, not counting the wait before the first token."""
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float:
        """Share of expert lookups served by the in-process cache."""
        hits = self.prefill.cache_hits + self.decode.cache_hits
        total = hits + self.prefill.cache_misses + self.decode.cache_misses
        return hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the stats, with derived rates, as a JSON-ready dict."""
        d = asdict(self)
        d.update(
            prompt_tps=self.prompt_tps,
            decode_tps=self.decode_tps,
            cache_hit_rate=self.cache_hit_rate,
            bytes_read=self.prefill.bytes_read + self.decode.bytes_read,
        )
        return d


@dataclass
class TokenEvent:
    """One generated token with the figures of the step that made it."""

    token: int
    step: StepFigures
    stats: GenerationStats  # running totals (same object through one generation)
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last event
