"""Shared helpers for exactness tests: cache sizes with a fixed meaning, mlx-lm references, checks.

Cache sizes (``cache_mb(path, size)``):
- ``"zero"``: ``--cache-mb 0``; the pool holds only the K slots one layer call needs, so every
  lookup after the first token of a layer is a miss and every miss evicts.
- ``"partial"``: 3/8 of all experts (24 of the tiny preset's 4 x 16): more than any one step
  needs, fewer than the model has. Generation gets hits, and misses that evict experts of other
  layers (the pool is shared by every layer of one shape). This is what a real user runs.
- ``"all"``: every expert fits; nothing is ever evicted and layers route on the device.
  (Slot bytes can exceed the bytes on disk where 16-bit scales are widened, so budgets are
  generous and ``check_cache_was_exercised`` checks the slots the engine really made.)

``check_cache_was_exercised(engine, size)`` asserts that a run really did what its size means
(hits, evictions across layers, or no re-reads), so a test cannot pass on a configuration that
silently degenerated into another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CACHE_SIZES = ("zero", "partial", "all")
PARTIAL_FRACTION = 3 / 8
# Prompt of PROMPT_TOKENS random ids (seed 0) prefilled in chunks of PREFILL_CHUNK: three chunks,
# the last one partial. Its greedy references on the tiny preset have 32-64 distinct tokens in 64
# (qwen3_moe 4/8-bit: 35/32; qwen3_next and qwen3_5_moe: 64), so they do not fall into a loop.
PROMPT_TOKENS = 300
PREFILL_CHUNK = 128
GENERATED_TOKENS = 64
MIN_DISTINCT = 24  # a reference with fewer distinct tokens in 64 proves too little


def long_prompt(n: int = PROMPT_TOKENS, seed: int = 0) -> list[int]:
    """``n`` random token ids below 50,000 (inside every tiny tokenizer's vocabulary)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, 50_000, size=n)]


def all_expert_bytes(path: Path) -> int:
    """Bytes of every routed expert of the model at ``path``."""
    from engine.model.loader import inspect_experts

    return sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)


def partial_slots(path: Path) -> int:
    """Slots of the "partial" cache of the model at ``path`` (one bank: every layer one shape)."""
    from engine.model.loader import inspect_experts

    layers = inspect_experts(path).layers
    return int(sum(l.num_experts for l in layers) * PARTIAL_FRACTION)


def cache_mb(path: Path, size: str) -> float:
    """The ``--cache-mb`` budget of a named cache size (see the module docstring)."""
    from engine.model.loader import inspect_experts

    if size == "zero":
        return 0.0
    if size == "all":
        # twice the bytes on disk: CPU slots hold 16-bit scales widened to fp32 (never more than 2x)
        return 2 * all_expert_bytes(path) / 2**20 + 1
    if size == "partial":
        one = inspect_experts(path).layers[0].expert_bytes
        return (partial_slots(path) + 0.5) * one / 2**20  # +0.5: no rounding below the count
    raise ValueError(f"unknown cache size {size!r}; known: {', '.join(CACHE_SIZES)}")


def check_cache_was_exercised(engine: Any, size: str) -> None:
    """Assert that ``engine``'s run so far did what ``size`` means (hits, evictions, no re-reads)."""
    streamer = engine._loaded.streamer
    counters = engine.expert_counters()
    assert counters["bytes_read"] > 0
    slots = sum(c.pool.n_slots for c in streamer.caches)
    total_experts = sum(l.num_experts for l in streamer.layers)
    if size == "zero":
        assert slots == engine.experts_per_token * (2 if streamer.prefetch else 1) * len(streamer.caches)
        assert counters["cache_misses"] > slots
    elif size == "partial":
        assert streamer.k * len(streamer.caches) < slots < total_experts, (slots, total_experts)
        assert counters["cache_hits"] > 0, counters
        # every miss takes a slot: more misses than slots means experts were evicted
        assert counters["cache_misses"] > slots, counters
        resident_layers = {key[0] for c in streamer.caches for key in c.resident()}
        assert len(resident_layers) > 1, "the shared pool should hold experts of several layers"
        assert counters["device_routed_calls"] == 0  # a pool that evicts never routes on the device
    elif size == "all":
        assert slots >= total_experts
        # every expert is read at most once when the cache holds them all
        assert counters["bytes_read"] <= all_expert_bytes(engine.model_dir)
    else:
        raise ValueError(f"unknown cache size {size!r}")


_LONG_PROMPT_REFERENCES: dict[tuple[Path, int], list[int]] = {}


def long_prompt_reference(path: Path, max_tokens: int) -> list[int]:
    """mlx-lm's greedy tokens after ``long_prompt()`` for the model at ``path``, computed once per process."""
    key = (Path(path), max_tokens)
    if key not in _LONG_PROMPT_REFERENCES:
        _LONG_PROMPT_REFERENCES[key] = mlx_lm_reference(path, long_prompt(), max_tokens)
    return _LONG_PROMPT_REFERENCES[key]


def mlx_lm_reference(
    path: Path,
    prompt: list[int],
    max_tokens: int = GENERATED_TOKENS,
    *,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    experts_per_token: int | None = None,
) -> list[int]:
    """mlx-lm's own generation (``generate_step``, its sampler and logits processors) on the fully
    loaded model at ``path``, ending at an eos token of config.json as ``stream_generate`` does.

    ``experts_per_token`` lowers K in every MoE block of mlx-lm's model (its ``top_k``), the
    reference for the engine's ``--experts-per-token``. The tokenizer is not loaded: prompts are ids.
    """
    import importlib
    import json

    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler
    from mlx_lm.utils import load_model

    generate_step = importlib.import_module("mlx_lm.generate").generate_step
    model, _ = load_model(Path(path))
    eos = json.loads((Path(path) / "config.json").read_text()).get("eos_token_id", [])
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    if experts_per_token is not None:
        blocks = [m for _, m in model.named_modules() if hasattr(m, "top_k") and hasattr(m, "switch_mlp")]
        assert blocks, "no MoE block with top_k in mlx-lm's model"
        for block in blocks:
            block.top_k = experts_per_token
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    out: list[int] = []
    steps = generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    )
    for token, _ in steps:
        out.append(int(token))
        if out[-1] in eos_ids:
            break
    return out


_tokenizers: dict[Path, Any] = {}


def share_tokenizers(monkeypatch: Any) -> None:
    """Load each model's tokenizer once per session for ``Engine.load`` (it takes seconds, and
    exactness tests give token ids, so it plays no part in what they compare)."""
    import engine.model.loader as loader

    real = loader._load_tokenizer

    def load_once(model_dir: Path, config: dict[str, Any]) -> Any:
        key = Path(model_dir).resolve()
        if key not in _tokenizers:
            _tokenizers[key] = real(model_dir, config)
        return _tokenizers[key]

    monkeypatch.setattr(loader, "_load_tokenizer", load_once)


def assert_not_degenerate(reference: list[int], minimum: int = MIN_DISTINCT) -> None:
    """A reference worth comparing with: enough distinct tokens (not a short loop)."""
    assert len(set(reference)) >= minimum, f"reference has {len(set(reference))} distinct tokens: {reference}"
