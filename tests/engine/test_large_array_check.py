"""The self-check's large-array check: it passes where gather_qmm is right and names the slots
where it is not (a fake gather_qmm that wraps its slot offset, as a 32-bit offset would)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine.diagnostics import large_array_check as lac
from engine.diagnostics.selfcheck import check_large_array


def test_probes_cover_both_ends_and_every_gib_boundary() -> None:
    n = 2560  # 5 GiB of 2 MiB slots
    probes = lac.probe_slots(n, 4)
    assert probes[0] == 0 and probes[-1] == n - 1
    for boundary in (512, 1024, 1536, 2048):
        assert {boundary - 1, boundary, boundary + 1} <= set(probes)
    assert len(lac.probe_slots(128, 4)) >= 10  # enough rows for the tiled kernel


@pytest.mark.parametrize("bits", [4, 8])
def test_a_right_gather_passes(bits: int) -> None:
    r = lac.check_stacked_array(32 << 20, bits=bits)
    assert r.wrong == [] and r.max_abs_diff < 1e-3
    assert r.slots == (32 << 20) // lac.slot_bytes(bits)


def test_a_gather_that_wraps_its_offset_is_caught(monkeypatch) -> None:
    real = mx.gather_qmm
    wrap = 8  # slots at and past 8 read slot - 8: what a too-narrow offset does past its range

    def wrapped(x, w, scales, biases, rhs_indices, **kw):
        return real(x, w, scales, biases, rhs_indices=rhs_indices % wrap, **kw)

    monkeypatch.setattr(lac.mx, "gather_qmm", wrapped)
    r = lac.check_stacked_array(32 << 20, bits=4)  # 16 slots
    assert r.wrong and min(r.wrong) >= wrap and all(s >= wrap for s in r.wrong)
    assert 0 not in r.wrong and r.slots - 1 in r.wrong


def test_the_selfcheck_line_fails_and_names_the_slots(monkeypatch) -> None:
    monkeypatch.setattr(lac, "CPU_CHECK_BYTES", 32 << 20)
    real = mx.gather_qmm
    monkeypatch.setattr(lac.mx, "gather_qmm", lambda x, w, s, b, rhs_indices, **kw: real(x, w, s, b, rhs_indices=rhs_indices * 0, **kw))
    r = check_large_array()
    assert r.status == "FAIL" and "read wrong" in r.detail and "slots [" in r.detail
    monkeypatch.setattr(lac.mx, "gather_qmm", real)
    ok = check_large_array()
    assert ok.status == "PASS" and "0.03 GiB" in ok.detail


def test_size_follows_the_backend_and_free_ram() -> None:
    assert lac.array_bytes_to_check("cpu", 1 << 62, 20 << 30)[0] == lac.CPU_CHECK_BYTES
    assert lac.array_bytes_to_check("cuda", 2 << 30, 100 << 30) == (2 << 30, "the cuda limit for one stacked array")
    size, why = lac.array_bytes_to_check("metal", 2 << 30, 4 << 30)  # an 8 GB Mac with 4 GB free
    assert size == 1 << 30 and "a quarter of free RAM" in why
