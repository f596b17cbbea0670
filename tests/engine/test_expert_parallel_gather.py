"""Expert parallelism sends only owned rows where that is fewer bytes (an all_gather, exact).

Unit tests check the byte accounting and the placement with simulated ranks in one process; the
rank tests run real loopback ranks on a prompt of several prefill passes and compare every
rank's greedy tokens with one process and with mlx-lm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from engine.model.expert_parallel import ExpertParallel, combine_plan, gathered_positions
from exactness import long_prompt, mlx_lm_reference
from test_expert_parallel import _logs, run_ranks

PROMPT = long_prompt(300)
TOKENS = 12
PASS = ["--prefill-chunk", "128", "--prefill-pass-tokens", "128"]  # three passes, the last one partial


class _FakeSwitch:
    """Row i through expert ids[i]: a different exact scaling per expert."""

    layer = 0

    def run_pairs(self, rows: mx.array, ids: np.ndarray, call_pairs: int = 0) -> mx.array:
        return rows * mx.array(np.asarray(ids) + 1, dtype=rows.dtype)[:, None]


def test_the_plan_counts_owned_rows_and_ring_bytes() -> None:
    ids = np.array([[0, 1], [2, 3], [4, 6]])  # 2 ranks: rank 0 owns 0, 2, 4, 6; rank 1 owns 1, 3
    plan = combine_plan(ids, 2, row_bytes=8)
    assert plan.counts == (4, 2) and plan.rows == 6 and plan.padded_rows == 4
    assert plan.all_sum_bytes == 6 * 8  # 2 (n - 1) / n of the 6 rows
    assert plan.gather_bytes == 4 * 8  # (n - 1) x the busiest rank's 4 rows
    assert plan.gathered and plan.bytes_sent == 32
    # one rank owns every row: the gather sends as much as the all_sum, which is kept
    tie = combine_plan(np.array([0, 2, 4]), 2, row_bytes=8)
    assert tie.gather_bytes == tie.all_sum_bytes and not tie.gathered and tie.bytes_sent == tie.all_sum_bytes
    # 4 ranks: a 4k-token pass of K 10 at hidden 4096 in bf16 (uniform routing) sends about half
    rng = np.random.default_rng(0)
    big = np.argsort(rng.random((4096, 512)), axis=1)[:, :10]
    prefill = combine_plan(big, 4, row_bytes=4096 * 2)
    assert prefill.rows * prefill.row_bytes == 320 * 2**20
    assert prefill.all_sum_bytes == 480 * 2**20  # 1.5 x 320 MiB
    assert prefill.gather_bytes == 3 * max(prefill.counts) * 8192 < 0.55 * prefill.all_sum_bytes


def test_positions_place_each_ranks_block() -> None:
    ids = np.array([5, 2, 7, 4, 1, 0])  # 3 ranks: owners 2, 2, 1, 1, 1, 0
    pos = gathered_positions(ids, 3, padded_rows=3)
    assert pos.tolist() == [6, 7, 3, 4, 5, 0]


def _simulate(ranks: int, host_idx: np.ndarray, x: mx.array, monkeypatch: Any) -> list[tuple[mx.array, ExpertParallel, list[int]]]:
    """Run every rank's run_layer in this process; each rank's all_gather/all_sum gets the others' inputs."""
    sends: dict[int, mx.array] = {}
    seen: list[int] = []

    def fake_gather(mine: mx.array, group: Any = None) -> mx.array:
        seen.append(mine.nbytes)
        return mx.concatenate([sends.get(r, mine) for r in range(ranks)], axis=0)

    def fake_sum(mine: mx.array, group: Any = None) -> mx.array:
        seen.append(mine.nbytes)
        return sum((sends.get(r, mine) for r in range(ranks)), mx.zeros_like(mine))


    out = []
    for phase in ("capture", "run"):
        for r in range(ranks):
            par = ExpertParallel(group=None, rank=r, size=ranks)
            if phase == "capture":
                box: list[mx.array] = []  # this rank's input; the result is not used in this phase
                monkeypatch.setattr(mx.distributed, "all_gather",
                                    lambda m, group=None: box.append(m) or mx.concatenate([m] * ranks, axis=0))
                monkeypatch.setattr(mx.distributed, "all_sum", lambda m, group=None: box.append(m) or m)
                par.run_layer(_FakeSwitch(), x, host_idx)  # type: ignore[arg-type]
                sends[r] = box[0]
            else:
                seen.clear()
                monkeypatch.setattr(mx.distributed, "all_gather", fake_gather)
                monkeypatch.setattr(mx.distributed, "all_sum", fake_sum)
                out.append((par.run_layer(_FakeSwitch(), x, host_idx), par, list(seen)))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 64])
def test_simulated_ranks_combine_exactly_and_send_what_the_plan_says(ranks: int, tokens: int, monkeypatch: Any) -> None:
    rng = np.random.default_rng(ranks * 100 + tokens)
    k, hidden, experts = 4, 16, 32
    host_idx = np.argsort(rng.random((1, tokens, experts)), axis=-1)[..., :k]
    x = mx.array(rng.standard_normal((1, tokens, hidden)).astype(np.float32)).astype(mx.bfloat16)
    expected = x[..., None, :] * mx.array(host_idx + 1, dtype=mx.bfloat16)[..., None]  # one process
    plan = combine_plan(host_idx, ranks, hidden * 2)
    for y, par, seen in _simulate(ranks, host_idx, x, monkeypatch):
        assert y.shape == (1, tokens, k, hidden)
        assert np.array_equal(np.array(y.astype(mx.float32)), np.array(expected.astype(mx.float32)))
        assert par.collectives == 1 and par.bytes_sent == plan.bytes_sent
        if plan.gathered:
            assert par.gathered_layers == 1 and seen == [plan.padded_rows * hidden * 2]
            assert par.bytes_sent == (ranks - 1) * seen[0]  # the ring forwards each block n - 1 times
        else:
            assert par.summed_layers == 1 and seen == [tokens * k * hidden * 2]
            assert par.bytes_sent == 2 * (ranks - 1) * seen[0] // ranks
    if tokens == 64:
        assert plan.gathered  # many rows: the owned rows are fewer bytes


def _single_process(model: Path) -> list[int]:
    """The same options in this process, alone (no ranks)."""
    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    engine = Engine.load(model, EngineOptions(cache_mb=0, prefill_chunk=128, prefill_pass_tokens=128), measure_disk=False)
    try:
        assert engine.parallel is None
        return [ev.token for ev in engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=TOKENS))]
    finally:
        engine.close()


def _check_long_prompt(tiny_model: Any, tmp_path: Path, model_type: str, bits: int, ranks: int, *,
                       single: bool = True) -> None:
    model = tiny_model(model_type, bits)
    reference = mlx_lm_reference(model, PROMPT, TOKENS)
    if single:
        assert _single_process(model) == reference
    args = ["--prompt", ",".join(map(str, PROMPT)), "--max-tokens", str(TOKENS), *PASS]
    results = run_ranks(model, tmp_path, ranks, per_rank_args={r: args for r in range(ranks)})
    assert all(code == 0 for code, _, _ in results), _logs(results)
    for r, (_, res, _) in enumerate(results):
        assert res["tokens"] == reference, f"rank {r}: {res['tokens']} != mlx-lm {reference}"
        assert res["gathered_layers"] > 0, res  # the prefill passes sent only owned rows


def test_a_long_prompt_on_two_ranks_gives_mlx_lm_tokens(tiny_model: Any, tmp_path: Path) -> None:
    _check_long_prompt(tiny_model, tmp_path, "qwen3_moe", 4, 2, single=False)  # (one process too: slow cases)


@pytest.mark.slow
def test_a_long_prompt_on_two_ranks_gives_the_single_process_tokens(tiny_model: Any, tmp_path: Path) -> None:
    _check_long_prompt(tiny_model, tmp_path, "qwen3_moe", 4, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "bits", "ranks"), [
    ("qwen3_moe", 4, 4), ("qwen3_next", 4, 2), ("qwen3_5_moe", 8, 2), ("qwen3_next", 8, 4), ("qwen3_5_moe", 4, 4),
])
def test_a_long_prompt_on_more_ranks_gives_mlx_lm_tokens(tiny_model: Any, tmp_path: Path, model_type: str, bits: int,
                                                        ranks: int) -> None:
    _check_long_prompt(tiny_model, tmp_path, model_type, bits, ranks)
