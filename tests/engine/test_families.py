"""Every MoE family of the installed mlx-lm streams with mlx-lm's exact tokens, or is refused.

The families are listed at test time from the installed mlx-lm (every model module that reaches
``switch_layers``); each gets a tiny random model built from its own ``ModelArgs``
(``engine/demo/family_configs.py``), once per session. For each family the table
(``engine/model/family_support.json``) marks as streaming, greedy tokens streamed with cache 0,
a partial cache (hits and evictions) and a cache of all experts equal mlx-lm's own generation,
on a short prompt and on one long enough for chunked prefill through the CPU dense-GEMM path;
the short prompt's logits are compared too (a random model may repeat one token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.demo.family_configs import moe_families
from engine.diagnostics.family_table import README, build_table, render_markdown, replace_section
from engine.engine import Engine
from engine.errors import UnsupportedModelError
from engine.model.family_support import TABLE_PATH, family_support
from engine.types import EngineOptions, SamplingParams
from exactness import cache_mb, check_cache_was_exercised

FAMILIES = moe_families()
SHORT_PROMPT = [int(t) for t in np.random.default_rng(1).integers(10, 1000, size=12)]
LONG_PROMPT = [int(t) for t in np.random.default_rng(2).integers(10, 1000, size=90)]
LONG_CHUNK = 40  # three chunks (40, 40, 10): each full one routes 40 x K rows, sorted and GEMM'd
N_TOKENS = 8
LOGIT_ATOL = 1e-4  # fp32 on both sides; the same kernels on the same rows (see test_streaming_exactness)
_TABLE = json.loads(TABLE_PATH.read_text())["families"]


def _status(family: str) -> str:
    return str(_TABLE.get(family, {}).get("status", "missing"))


STREAMING = [f for f in FAMILIES if _status(f) == "streams"]


def _reference(path: Path, tokenizer: Any, prompt: list[int], chunk: int) -> list[int]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    stream = stream_generate(model, tokenizer, prompt, max_tokens=N_TOKENS, sampler=make_sampler(0.0),
                             prefill_step_size=chunk)  # fmt: skip
    return [r.token for r in stream]


def _streamed(path: Path, prompt: list[int], cache: str, chunk: int, matmul: str) -> tuple[list[int], Engine]:
    options = EngineOptions(cache_mb=cache_mb(path, cache), prefill_chunk=chunk, prefill_matmul=matmul)
    engine = Engine.load(path, options, measure_disk=False)
    try:
        tokens = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
    finally:
        engine.close()
    return tokens, engine


def _check_logits(path: Path) -> None:
    """The streamed model's logits for the short prompt equal mlx-lm's (greedy tokens alone prove
    little where a random model keeps choosing the same token)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    reference, _ = load_model(path)
    tokens = mx.array([SHORT_PROMPT])
    expected = np.array(reference(tokens, cache=make_prompt_cache(reference)))
    engine = Engine.load(path, EngineOptions(cache_mb=0.0), measure_disk=False)
    try:
        got = np.array(engine.model(tokens, cache=engine.make_kv_cache()))
    finally:
        engine.close()
    np.testing.assert_allclose(got, expected, atol=LOGIT_ATOL, rtol=0)


def _check_family(path: Path, tokenizer: Any, runs: list[tuple[str, str]]) -> None:
    """Each (prompt, cache) run streams mlx-lm's tokens; caches did what their size means."""
    references: dict[str, list[int]] = {}
    failures = []
    for prompt_name, cache in runs:
        prompt, chunk = (SHORT_PROMPT, 512) if prompt_name == "short" else (LONG_PROMPT, LONG_CHUNK)
        if prompt_name not in references:
            references[prompt_name] = _reference(path, tokenizer, prompt, chunk)
        got, engine = _streamed(path, prompt, cache, chunk, "on")
        if got != references[prompt_name]:
            failures.append(f"{prompt_name} prompt, cache {cache}: {got} != mlx-lm {references[prompt_name]}")
            continue
        check_cache_was_exercised(engine, cache)
        if prompt_name == "long":
            assert engine._loaded.streamer.prefill_matmul.dense_gemms > 0, "the dense-GEMM prefill path did not run"
    assert not failures, "\n".join(failures)


def test_every_moe_family_is_in_the_table() -> None:
    assert FAMILIES, "no MoE family found in the installed mlx-lm"
    assert sorted(_TABLE) == sorted(FAMILIES), "run python -m engine.diagnostics.family_table"


def test_table_and_readme_are_current() -> None:
    table = build_table()
    recorded = json.loads(TABLE_PATH.read_text())
    assert recorded["mlx_lm"] == table["mlx_lm"], (
        f"the table was made with mlx-lm {recorded['mlx_lm']}, {table['mlx_lm']} is installed: "
        "run python -m engine.diagnostics.family_table and the family tests"
    )
    assert recorded == table, "run python -m engine.diagnostics.family_table"
    readme = README.read_text()
    assert replace_section(readme, render_markdown(table)) == readme, "run python -m engine.diagnostics.family_table"


@pytest.mark.parametrize("family", STREAMING)
def test_family_streams_exactly(family: str, family_model: Any, fast_tokenizer: Any) -> None:
    path = family_model(family)
    _check_logits(path)
    _check_family(path, fast_tokenizer, [("short", "zero"), ("short", "all"), ("long", "partial")])


@pytest.mark.slow
@pytest.mark.parametrize("family", STREAMING)
def test_family_streams_exactly_every_cache_and_prompt(family: str, family_model: Any, fast_tokenizer: Any) -> None:
    runs = [(p, c) for p in ("short", "long") for c in ("zero", "partial", "all")]
    _check_family(family_model(family), fast_tokenizer, runs)


def test_folder_support_names_the_family(family_model: Any) -> None:
    from engine.model.family_support import folder_support

    path = family_model("deepseek_v3")
    assert folder_support(path).startswith("deepseek_v3: its MoE models stream")
    support = family_support("kimi_k2")  # mlx-lm maps kimi_k2 to deepseek_v3
    assert support is not None and support.family == "deepseek_v3"
    assert family_support("llama") is None


def test_discovery_follows_the_routing_not_the_names() -> None:
    """A made-up family: odd names, K in an attribute of its own, and a SwitchLinear in attention
    indexed by a fixed group table. Only the routed bank is found, with the block's K."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

    from engine.model.discovery import probe_banks

    class GroupedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grouped = SwitchLinear(8, 8, 2)
            self.groups = mx.array([[0, 1]])

        def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
            return self.grouped(x[..., None, :], self.groups).sum(axis=-2) + positions[..., None]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = GroupedAttention()
            self.chooser = nn.Linear(8, 6)
            self.pool = SwitchGLU(8, 4, 6)
            self.picks = 3

        def __call__(self, x: mx.array) -> mx.array:
            x = self.attention(x, mx.zeros(x.shape[:-1], dtype=mx.int32))
            chosen = mx.argpartition(self.chooser(x), kth=-self.picks, axis=-1)[..., -self.picks :]
            return x + self.pool(x, chosen).sum(axis=-2)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.blocks = [Block(), Block()]

        def __call__(self, tokens: mx.array, cache: object = None) -> mx.array:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return x

    banks = probe_banks(Toy(), "toy")
    assert [(b.path, b.k) for b in banks] == [("blocks.0.pool", 3), ("blocks.1.pool", 3)]
    assert banks[0].param_keys == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]

    toy = Toy()
    toy.blocks[1].pool.expert_bias = mx.zeros((6,))  # a bank tensor streaming would not remap
    with pytest.raises(UnsupportedModelError, match=r"toy: blocks\.1\.pool: .*\(expert_bias\)"):
        probe_banks(toy, "toy")


def test_plan_names_the_family(family_model: Any, fast_tokenizer: Any, capsys: Any) -> None:
    from engine.cli import main

    path = family_model("deepseek_v3")
    assert main(["plan", str(path), "--json", "--samples", "2", "--device", "cpu"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family_support"].startswith("deepseek_v3: its MoE models stream")
    assert main(["plan", str(path), "--samples", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("family: deepseek_v3: its MoE models stream")
