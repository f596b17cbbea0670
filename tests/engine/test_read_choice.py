"""Whole reads or pieces for cold mode, chosen at load from the model's own files (engine.storage.read_choice)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.engine import Engine
from engine.storage.expert_store import READ_PIECE_BYTES
from engine.storage.read_choice import ReadChoice, choose_read_pieces
from engine.types import EngineOptions


def _fake(whole: list[float], pieces: list[float]) -> tuple[Any, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    rates = {0: iter(whole), READ_PIECE_BYTES: iter(pieces)}

    def measure(piece_bytes: int, round_: int) -> float:
        calls.append((piece_bytes, round_))
        return next(rates[piece_bytes])

    return measure, calls


def test_pieces_are_kept_only_where_their_median_is_faster() -> None:
    measure, calls = _fake([1.0, 9.0, 1.1], [1.5, 1.4, 0.1])  # one outlier each way: the medians decide
    choice = choose_read_pieces(measure)
    assert choice == ReadChoice(1.1, 1.4, READ_PIECE_BYTES) and choice.best_bytes_per_s == 1.4
    # alternating which goes first, each round reading the same draw both ways
    assert calls == [(0, 0), (READ_PIECE_BYTES, 0), (READ_PIECE_BYTES, 1), (0, 1), (0, 2), (READ_PIECE_BYTES, 2)]
    measure, _ = _fake([1.5, 1.5, 1.5], [1.4, 1.6, 1.5])
    tie = choose_read_pieces(measure)
    assert tie.piece_bytes == 0 and "one read per expert" in tie.describe()  # a tie keeps the simpler reads
    with pytest.raises(ValueError, match="rounds"):
        choose_read_pieces(measure, rounds=0)


@pytest.mark.parametrize("cold, setting", [(True, None), (True, 0), (True, 64), (False, None)])
def test_a_load_measures_both_and_only_cold_mode_without_a_setting_follows_it(packed_model: Any, cold: bool,
                                                                             setting: int | None) -> None:  # fmt: skip
    engine = Engine.load(packed_model, EngineOptions(cold=cold, read_piece_kb=setting))
    try:
        choice = engine.read_choice
        assert choice is not None and choice.whole_bytes_per_s > 0 and choice.pieces_bytes_per_s > 0
        assert engine.plan.disk_read_bytes_per_s == choice.best_bytes_per_s
        kept = engine._loaded.store.piece_bytes
        if cold and setting is None:
            assert kept == choice.piece_bytes
        else:  # a setting is kept; reads through the page cache stay whole
            assert kept == (setting or 0) * 1024
    finally:
        engine.close()


def test_a_load_that_measures_nothing_keeps_the_cold_default(packed_model: Any) -> None:
    engine = Engine.load(packed_model, EngineOptions(cold=True), measure_disk=False)
    try:
        assert engine.read_choice is None and engine._loaded.store.piece_bytes == READ_PIECE_BYTES
    finally:
        engine.close()


def test_the_load_evicts_the_page_cache_once_for_all_its_measurements(packed_model: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Cold reads leave nothing cached, so one eviction serves the six measurements (on a Mac it
    walks every expert file)."""
    from engine.storage.expert_store import ExpertStore

    drops: list[int] = []
    original = ExpertStore.drop_page_cache
    monkeypatch.setattr(ExpertStore, "drop_page_cache", lambda self: (drops.append(1), original(self))[1])
    engine = Engine.load(packed_model, EngineOptions(cold=True))
    try:
        assert engine.read_choice is not None and len(drops) == 1
    finally:
        engine.close()


@pytest.mark.parametrize("slots_aligned", [True, False])
def test_the_load_measures_reads_landing_as_the_engine_s_will(packed_model: Any, monkeypatch: pytest.MonkeyPatch,
                                                               slots_aligned: bool) -> None:  # fmt: skip
    """Where the slots are page-aligned (CUDA's managed pools) O_DIRECT reads skip the staging
    copy, 1.5-1.7x faster on the H100 machine's disk: the load's measurement reads the same way,
    from the packed layout the engine reads (it read the safetensors before, 1.8 against 3.2 GB/s
    in decode there)."""
    from engine import engine as engine_module
    from engine.storage import expert_store

    seen: list[bool] = []
    real = engine_module.measure_expert_read_speed

    def spy(*args: Any, **kwargs: Any) -> float:
        seen.append(kwargs["aligned"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "reads_land_directly", lambda dests: slots_aligned)
    monkeypatch.setattr(engine_module, "measure_expert_read_speed", spy)
    copies: list[int] = []
    real_copy = expert_store._copy_out
    monkeypatch.setattr(expert_store, "_copy_out", lambda st, dests: copies.append(1) or real_copy(st, dests))
    engine = Engine.load(packed_model, EngineOptions(cold=True))
    try:
        direct = engine._loaded.store._use_direct
    finally:
        engine.close()
    assert seen and set(seen) == {slots_aligned}
    if direct and not slots_aligned:  # (the tiny model's experts are no whole pages: staged either way)
        assert copies  # the packed layout read with O_DIRECT, as the engine reads it
