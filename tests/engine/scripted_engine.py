"""A stand-in for engine.Engine in tests: the real tokenizer, scripted output, no model.

Its generate() follows Engine.generate's contract (stop polled before every step, max_tokens,
eos ends with "stop", a cancelled run ends with a NO_TOKEN event), so the service and both
front-ends run their real code paths on output the test chose (tool-call markup, endless text).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.types import EngineOptions, GenerationStats, SamplingParams, StepFigures, TokenEvent

NO_TOKEN = -1
ENDLESS = None  # a script entry that never ends on its own (for cancel tests)


class _Plan:
    def to_dict(self) -> dict[str, Any]:
        return {"scripted": True}


class ScriptedEngine:
    """Generates the next scripted reply for each generate() call."""

    def __init__(self, tokenizer: Any, replies: Sequence[str | None], delay_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.delay_s = delay_s
        self.config = {"model_type": "scripted", "max_position_embeddings": 32768, "num_hidden_layers": 1}
        self.model_type = "scripted"
        self.model_dir = Path("/scripted")
        self.plan = _Plan()
        self.prompts: list[list[int]] = []
        self.finish_reasons: list[str] = []
        self.finished = threading.Event()
        self.closed = False
        self.parallel = None  # one process (Engine.parallel: the ranks of an expert-parallel run)
        self.prefill_layers = 2  # layers of the reported prefill (on_prefill)
        self.prefill_delay_s = 0.0  # time each reported prefill layer takes

    def make_kv_cache(self) -> list[Any]:
        return []

    def expert_counters(self) -> dict[str, int]:
        return {"bytes_read": 0, "cache_hits": 0, "cache_misses": 0, "resident_bytes": 0}

    def close(self) -> None:
        self.closed = True

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        stop: Callable[[], bool] | None = None,
        kv_cache: list[Any] | None = None,
        reused_tokens: int = 0,
        on_prefill: Callable[[Any], None] | None = None,
    ) -> Iterator[TokenEvent]:
        self.prompts.append(list(prompt_tokens))
        reply = self.replies.pop(0) if self.replies else ""
        should_stop = stop or (lambda: False)
        if on_prefill is not None and not self._prefill(len(prompt_tokens), on_prefill, should_stop):
            self._end("cancelled")
            yield TokenEvent(NO_TOKEN, StepFigures(), GenerationStats(reused_tokens=reused_tokens), "cancelled")
            return
        eos = next(iter(self.tokenizer.eos_token_ids))
        if reply is ENDLESS:
            tokens: Iterator[int] = iter(lambda: self.tokenizer.encode(" tick", add_special_tokens=False)[0], None)
        else:
            tokens = iter(self.tokenizer.encode(reply, add_special_tokens=False) + [eos])
        stats = GenerationStats(reused_tokens=reused_tokens, prompt_tokens=len(prompt_tokens), prompt_s=0.001)
        n = 0
        for tok in tokens:
            if should_stop():
                self._end("cancelled")
                yield TokenEvent(NO_TOKEN, StepFigures(), stats, "cancelled")
                return
            if self.delay_s:
                time.sleep(self.delay_s)
            n += 1
            stats.generated_tokens = n
            stats.decode_s += self.delay_s
            reason = "stop" if tok == eos else ("length" if n >= sampling.max_tokens else None)
            if reason:
                self._end(reason)
            yield TokenEvent(tok, StepFigures(tokens=1), stats, reason)
            if reason:
                return

    def _prefill(self, n: int, on_prefill: Callable[[Any], None], should_stop: Callable[[], bool]) -> bool:
        """Report a prefill of ``prefill_layers`` layers (``prefill_delay_s`` each); False if stopped."""
        from engine.model.prefill_progress import PrefillProgress

        t0 = time.perf_counter()
        for done in range(self.prefill_layers + 1):
            if done and should_stop():
                return False
            if done and self.prefill_delay_s:
                time.sleep(self.prefill_delay_s)
            on_prefill(
                PrefillProgress(
                    tokens_total=n,
                    tokens_done=n if done == self.prefill_layers else 0,
                    pass_tokens=n,
                    passes_total=1,
                    pass_index=0,
                    layers_total=self.prefill_layers,
                    layers_done=done,
                    bytes_read=done * 1000,
                    elapsed_s=time.perf_counter() - t0,
                )
            )
        return True

    def _end(self, reason: str) -> None:
        self.finish_reasons.append(reason)
        self.finished.set()


def scripted_loader(engine: ScriptedEngine) -> Callable[..., ScriptedEngine]:
    """A loader for EngineService that returns `engine` for any model directory."""

    def load(model_dir: str | Path, options: EngineOptions, progress: Any = None) -> ScriptedEngine:
        if progress is not None:
            progress("scripted", 1.0)
        return engine

    return load


@functools.lru_cache(maxsize=None)
def load_tokenizer(kind: str) -> Any:
    """The real Qwen3 ("qwen3") or Qwen3.5 ("qwen3_5") tokenizer through mlx-lm's wrapper."""
    from mlx_lm.tokenizer_utils import load

    from engine.demo.tokenizer_builder import cached_tokenizer_dir

    return load(Path(cached_tokenizer_dir(kind)))
