"""Prefill in one pass over the experts: the prompt goes through the model layer by layer.

mlx-lm (and a chunked prefill) runs the prompt chunk by chunk through every layer, so a streamed
MoE layer reads the experts it routes to once per chunk: with 512 experts and top-10, any chunk
of a few hundred tokens touches nearly all of them, and a 4,096-token prompt in 512-token chunks
reads the model eight times. Here a *pass* of many tokens runs layer-major instead: for each
decoder layer, its attention runs over the pass in sub-chunks of ``ATTENTION_CHUNK`` tokens
(through the layer's KV / linear-attention cache, as a chunked prefill does), then its MoE block
runs once on every token of the pass, so each routed expert is read once per layer per pass.

The arithmetic is mlx-lm's own: the decoder layers of the supported families compute
``h = x + attn(input_layernorm(x), mask, cache); out = h + mlp(post_attention_layernorm(h))``,
and this module calls those same sub-modules in that order, with the masks the model would make
(``create_attention_mask`` / ``create_ssm_mask`` on the layer's own cache, whose offset is the one
the model reads). Layers of any other class are not split: ``supports_layer_major`` says so and
``generate`` keeps its chunked prefill for them.

Memory bound of one pass of ``n`` tokens (what ``pass_tokens`` sizes from the budget):
``n * act_bytes * (3*k*(hidden + moe_intermediate) + 6*hidden)`` for the MoE call (the routed rows
gathered, gate/up/activation, the down projection, the weighted sum) and the hidden states, plus
the attention scores of one sub-chunk (``heads * ATTENTION_CHUNK * context * act_bytes`` where MLX
materialises them, i.e. on the CPU). The KV cache itself is the context's, not the pass's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from engine.model.array_limits import CUDA_GATHER_OFFSET_LIMIT
from engine.model.prefill_progress import PrefillProgress, ProgressFn

ATTENTION_CHUNK = 512  # queries per attention call inside a pass (mlx-lm's stream_generate step)
DEFAULT_PREFILL_MEMORY = 2 << 30  # bytes for one pass's working memory when nothing else says
MIN_PASS_TOKENS = 16


def _decoder_classes() -> tuple[type, ...]:
    """The mlx-lm decoder layer classes whose ``__call__`` this module reproduces step by step."""
    from mlx_lm.models import qwen3_5, qwen3_moe, qwen3_next

    return (qwen3_moe.Qwen3MoeDecoderLayer, qwen3_next.Qwen3NextDecoderLayer, qwen3_5.DecoderLayer)


def _text_model(model: nn.Module) -> nn.Module | None:
    """The module holding ``embed_tokens`` and the decoder layers (``model.model`` in these families)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "embed_tokens") else None


def supports_layer_major(model: nn.Module) -> bool:
    """Whether every decoder layer is of a class whose computation ``run_pass`` splits exactly."""
    inner = _text_model(model)
    if inner is None or getattr(inner, "pipeline_size", 1) != 1:
        return False
    layers = list(getattr(model, "layers", []) or [])
    classes = _decoder_classes()
    return bool(layers) and all(type(layer) in classes for layer in layers)


@dataclass(frozen=True)
class PassShape:
    """The sizes that bound a pass's working memory (see the module's docstring)."""

    hidden: int
    experts_per_token: int
    moe_intermediate: int
    heads: int
    act_bytes: int  # bytes per activation element: 4 for fp32 (CPU), 2 for bf16/fp16

    def bytes_per_token(self) -> int:
        """Working bytes one prompt token adds to a pass."""
        k, d, i = self.experts_per_token, self.hidden, self.moe_intermediate
        return self.act_bytes * (3 * k * (d + i) + 6 * d)

    def attention_bytes(self, context: int, attention_chunk: int = ATTENTION_CHUNK) -> int:
        """Scores of one attention sub-chunk against the whole context, where MLX materialises them."""
        return self.act_bytes * self.heads * attention_chunk * max(1, context)


def pass_tokens(
    shape: PassShape, budget_bytes: int, context: int, materialised_attention: bool, attention_chunk: int = ATTENTION_CHUNK
) -> int:
    """Tokens per pass under ``budget_bytes`` (at least MIN_PASS_TOKENS, at most the context).

    Also under ``max_gather_tokens``: MLX's CUDA gather kernel offsets a routed row's input and
    output in 32 bits (row x width), so a pass's (token, expert) rows times the widest width stay
    below 2**32 elements.
    """
    room = budget_bytes - (shape.attention_bytes(context, attention_chunk) if materialised_attention else 0)
    n = min(room // max(1, shape.bytes_per_token()), max_gather_tokens(shape))
    return int(max(MIN_PASS_TOKENS, min(max(1, context), n)))


def max_gather_tokens(shape: PassShape) -> int:
    """Tokens whose routed rows keep ``rows x max(hidden, moe_intermediate)`` below 2**32 elements."""
    width = max(shape.hidden, shape.moe_intermediate)
    return (CUDA_GATHER_OFFSET_LIMIT - 1) // max(1, shape.experts_per_token * width)


def _arrays_in(value: Any) -> list[mx.array]:
    """The MLX arrays in a cache's state (nested lists and tuples, Nones skipped)."""
    if isinstance(value, mx.array):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays_in(v)]
    return []


def _head_owner(model: nn.Module) -> nn.Module:
    """The module with the output head (``lm_head`` or tied embeddings) and ``args``."""
    owner = getattr(model, "language_model", model)
    assert isinstance(owner, nn.Module)
    return owner


def logits_of(model: nn.Module, h: mx.array) -> mx.array:
    """The model's output head on final hidden states: its norm, then ``lm_head`` or the tied embedding."""
    inner = _text_model(model)
    assert inner is not None
    out = inner.norm(h)
    owner = _head_owner(model)
    if getattr(owner.args, "tie_word_embeddings", False):
        return inner.embed_tokens.as_linear(out)
    return owner.lm_head(out)


def run_pass(
    model: nn.Module,
    cache: Sequence[Any],
    tokens: Sequence[int],
    *,
    last: bool,
    between_layers: Callable[[int], None],
    attention_chunk: int = ATTENTION_CHUNK,
    tail_alone: int = 0,
) -> mx.array | None:
    """Run ``tokens`` through every decoder layer, layer by layer, filling ``cache``.

    Only the caches and, for the prompt's ``last`` pass, the last token's logits are kept: the
    last layer's MLP runs on that one token (on none in other passes), since nothing else reads
    its output. ``between_layers(i)`` is called after layer ``i`` is evaluated (progress,
    cancellation). ``tail_alone`` > 0: the MLP of the last that many tokens runs in a call of its
    own (kernel_shapes: the short step mlx-lm ends with, whose kernel the whole pass's would not
    be). Returns the logits (``[1, 1, vocab]``) for the last pass, else None.
    """
    inner = _text_model(model)
    assert inner is not None
    layers = list(model.layers)
    h = inner.embed_tokens(mx.array(list(tokens))[None])
    mx.eval(h)
    n = h.shape[1]
    for i, (layer, c) in enumerate(zip(layers, cache)):
        linear = bool(getattr(layer, "is_linear", False))
        attn = layer.linear_attn if linear else layer.self_attn
        parts = []
        for start in range(0, n, attention_chunk):
            x = h[:, start : start + attention_chunk]
            mask = create_ssm_mask(x, c) if linear else create_attention_mask(x, c)
            part = x + attn(layer.input_layernorm(x), mask, c)
            mx.eval(part, *_arrays_in(c.state))
            parts.append(part)
        hh = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        del parts
        if i == len(layers) - 1:
            if not last:
                between_layers(i)
                return None
            hh = hh[:, -1:]
        h = hh + _mlp_in_calls(layer, hh, tail_alone)
        mx.eval(h)
        del hh
        between_layers(i)
    return logits_of(model, h)


def _mlp_in_calls(layer: nn.Module, hh: mx.array, tail_alone: int) -> mx.array:
    """The layer's MLP on ``hh`` (``[1, n, hidden]``), its last ``tail_alone`` tokens in a call of their own."""
    n = hh.shape[1]
    if not 0 < tail_alone < n:
        return layer.mlp(layer.post_attention_layernorm(hh))
    head = layer.mlp(layer.post_attention_layernorm(hh[:, : n - tail_alone]))
    mx.eval(head)  # the head's experts are done with before the tail's are routed
    tail = layer.mlp(layer.post_attention_layernorm(hh[:, n - tail_alone :]))
    return mx.concatenate([head, tail], axis=1)


class PassReporter:
    """Builds the ``PrefillProgress`` of each layer boundary and hands it to the callback."""

    def __init__(
        self, fn: ProgressFn | None, tokens_total: int, passes_total: int, layers_total: int,
        bytes_read: Callable[[], int],
    ) -> None:  # fmt: skip
        self.fn = fn
        self.t0 = time.perf_counter()
        self.tokens_total = tokens_total
        self.passes_total = passes_total
        self.layers_total = layers_total
        self.bytes_read = bytes_read
        self.tokens_done = 0
        self.pass_index = 0
        self.pass_tokens = 0

    def report(self, layers_done: int) -> None:
        """Tell the callback (if any) where the prefill stands."""
        if self.fn is None:
            return
        self.fn(PrefillProgress(
            tokens_total=self.tokens_total, tokens_done=self.tokens_done, pass_tokens=self.pass_tokens,
            passes_total=self.passes_total, pass_index=self.pass_index, layers_total=self.layers_total,
            layers_done=layers_done, bytes_read=self.bytes_read(), elapsed_s=time.perf_counter() - self.t0,
        ))  # fmt: skip


def _text_fields(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def context_length(config: dict[str, Any]) -> int:
    """The model's context in tokens (``max_position_embeddings``, text_config first); 0 if absent."""
    for src in (_text_fields(config), config):
        value = src.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return 0


def pass_shape(config: dict[str, Any], k: int, act_bytes: int) -> PassShape:
    """The sizes that bound a pass, read from config.json."""
    c = _text_fields(config)
    hidden = int(c.get("hidden_size", 0) or 0)
    inter = int(c.get("moe_intermediate_size", 0) or c.get("intermediate_size", 0) or 0)
    return PassShape(hidden, k, inter, int(c.get("num_attention_heads", 1) or 1), act_bytes)


def prefill_memory_bytes(setting_mb: float | None, ram_total: int) -> int:
    """Working memory of one pass: ``setting_mb`` MiB, or min(DEFAULT_PREFILL_MEMORY, RAM / 8)."""
    if setting_mb is not None:
        return int(setting_mb * 2**20)
    return int(min(DEFAULT_PREFILL_MEMORY, ram_total // 8)) if ram_total > 0 else DEFAULT_PREFILL_MEMORY
