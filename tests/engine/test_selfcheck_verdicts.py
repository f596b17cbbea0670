"""The self-check's verdicts when something is wrong (engine/diagnostics/selfcheck.py), driven by
fakes so that each failure is certain: streamed tokens that differ from mlx-lm's are reported at
the first differing token, a page cache that cannot be evicted fails the disk check, one that
keeps nothing skips it, and Linux without PSI says what stands in."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import platform_info
from engine.diagnostics import selfcheck
from engine.platform import page_cache


def test_streamed_tokens_that_differ_are_reported_at_the_first_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selfcheck, "build_check_model", lambda root: root / "m")
    monkeypatch.setattr(selfcheck, "mlx_lm_tokens", lambda model, prompt, n, dtype: ([1, 2, 3, 4, 5, 6, 7], True))
    got = [1, 2, 3, 9, 5, 6, 7]
    monkeypatch.setattr(selfcheck, "streamed_tokens",
                        lambda model, prompt, n, dtype, cache_fraction: (got, {"cache_hits": 3, "cache_misses": 4}))
    result = selfcheck.check_exactness(tmp_path, "float32")
    assert result.status == "FAIL"
    assert result.detail == f"token 3 differs: streamed [9, 5, 6, 7] vs mlx-lm [4, 5, 6, 7] ({len(selfcheck._prompt())}-token prompt)"
    got[:] = [1, 2, 3]  # a generation that stopped early differs where it ended
    assert selfcheck.check_exactness(tmp_path, "float32").detail.startswith("token 3 differs: streamed [] vs mlx-lm [4, 5, 6, 7]")
    got[:] = [1, 2, 3, 4, 5, 6, 7]
    ok = selfcheck.check_exactness(tmp_path, "float32")
    assert ok.status == "PASS" and ok.detail == "7 tokens equal mlx-lm's; cache 3 hits, 4 misses"


@pytest.mark.parametrize(("runs", "said"), [
    ([([0, 655, 655, 0], False), ([0, 655, 655, 0], False)], "mlx-lm's own logits are not finite (NaN or inf)"),
    ([([1, 2, 3, 4], True), ([1, 2, 3, 4], False)], "mlx-lm's own logits are not finite (NaN or inf)"),
    ([([1, 2, 3, 4, 5], True), ([1, 2, 9, 4, 5], True)],
     "mlx-lm's own tokens differ between two identical runs ([1, 2, 3, 4] vs [1, 2, 9, 4])"),
])
def test_a_reference_mlx_lm_cannot_repeat_is_named_as_mlx_s_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  runs: list[tuple[list[int], bool]], said: str) -> None:
    # (what the H100 gave at the tiny preset's 64-wide layers: NaN logits, tokens 0 and 655)
    monkeypatch.setattr(selfcheck, "build_check_model", lambda root: root / "m")
    left = list(runs)
    monkeypatch.setattr(selfcheck, "mlx_lm_tokens", lambda model, prompt, n, dtype: left.pop(0))
    streamed: list[int] = []
    monkeypatch.setattr(selfcheck, "streamed_tokens", lambda *a, **k: streamed.append(1) or ([1], {}))
    result = selfcheck.check_exactness(tmp_path, "bfloat16")
    assert result.status == "FAIL"
    assert result.detail == f"{said} on the {selfcheck.check_preset()} model: a fault of MLX on this device, the engine not compared"
    assert streamed == [] and left == []


def test_the_check_model_has_real_widths_off_the_cpu() -> None:
    from engine.demo.demo_model import preset_shape

    assert selfcheck.check_preset(on_cpu=True) == "tiny"
    assert selfcheck.check_preset(on_cpu=False) == "kernel-check"
    shape = preset_shape("kernel-check")
    assert (shape.hidden, shape.head_dim, shape.moe_intermediate) == (512, 64, 256)


def test_a_page_cache_that_cannot_be_evicted_fails_the_disk_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(page_cache, "cached_fraction", lambda path, libc=None: 1.0)
    result = selfcheck.check_disk(tmp_path, size=4 << 20)
    assert result.status == "FAIL"
    assert "cached 100% -> 100%: eviction did not work, cold figures would be warm" in result.detail


def test_a_filesystem_without_page_cache_skips_the_disk_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(page_cache, "cached_fraction", lambda path, libc=None: 0.0)
    result = selfcheck.check_disk(tmp_path, size=4 << 20)
    assert result.status == "SKIP" and result.detail.endswith("(this filesystem keeps no page cache to evict)")


def test_linux_without_psi_says_available_ram_stands_in(monkeypatch: pytest.MonkeyPatch) -> None:
    reading = platform_info.MemoryPressure("normal", 0.42, "psutil.virtual_memory")
    monkeypatch.setattr(platform_info, "memory_pressure", lambda platform: reading)
    result = selfcheck.check_memory_pressure("linux")
    assert result.status == "PASS"
    assert result.detail == "normal (raw 0.42 from psutil.virtual_memory) (this kernel has no PSI; available RAM stands in)"


def test_an_uninstalled_package_is_reported_as_unknown_version() -> None:
    assert selfcheck._version("no-such-package-moebar") == "?"
    assert selfcheck._version("mlx") not in ("", "?")


def test_a_kernel_whose_rows_depend_on_the_batch_fails_row_independence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm.models.switch_layers import SwitchGLU

    real = SwitchGLU.__call__

    def batch_dependent(self: SwitchGLU, x, indices):  # type: ignore[no-untyped-def]
        return real(self, x, indices) + (x.shape[0] - 1) * 1e-3  # each row shifted by the batch size

    monkeypatch.setattr(SwitchGLU, "__call__", batch_dependent)
    result = selfcheck.check_row_independence(tmp_path)
    assert result.status == "FAIL" and result.detail == "rows differ with their batch (max |diff| 0.023)"


def test_a_slot_reuse_check_that_never_evicted_proves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from engine.engine import Engine

    real_load = Engine.load.__func__  # type: ignore[attr-defined]

    def roomy(cls, path, options, **kwargs):  # type: ignore[no-untyped-def]
        return real_load(cls, path, dataclasses.replace(options, cache_mb=1024.0), **kwargs)  # every expert fits

    monkeypatch.setattr(Engine, "load", classmethod(roomy))
    result = selfcheck.check_slot_reuse(tmp_path)
    assert result.status == "FAIL" and result.detail == "the smallest cache never evicted: the check proved nothing"


def test_on_a_gpu_rows_may_differ_alone_but_not_with_the_calls_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm.models.switch_layers import SwitchGLU

    real = SwitchGLU.__call__

    def by_kernel(self: SwitchGLU, x, indices):  # type: ignore[no-untyped-def]
        return real(self, x, indices) + (1e-3 if x.shape[0] * indices.shape[-1] < 8 else 0.0)  # CUDA's vector class

    monkeypatch.setattr(SwitchGLU, "__call__", by_kernel)
    result = selfcheck.check_row_independence(tmp_path, "cuda")
    assert result.status == "PASS" and result.detail.startswith("rows alone and batched differ by 0.001")
    assert selfcheck.check_row_independence(tmp_path, "cpu").status == "FAIL"  # the CPU path relies on it


def test_on_a_gpu_rows_that_change_with_the_calls_length_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm.models.switch_layers import SwitchGLU

    real = SwitchGLU.__call__

    def by_length(self: SwitchGLU, x, indices):  # type: ignore[no-untyped-def]
        return real(self, x, indices) + x.shape[0] * 1e-4

    monkeypatch.setattr(SwitchGLU, "__call__", by_length)
    result = selfcheck.check_row_independence(tmp_path, "cuda")
    assert result.status == "FAIL" and result.detail.startswith("experts: rows change with their call's length (24 against 16 rows")


def test_on_a_gpu_linear_rows_that_change_with_the_calls_length_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.nn as nn

    real = nn.QuantizedLinear.__call__

    def tiled_by_length(self: nn.QuantizedLinear, x):  # type: ignore[no-untyped-def]
        return real(self, x) + (x.shape[-2] >= 64) * 1e-2  # a taller tile from 64 rows

    monkeypatch.setattr(nn.QuantizedLinear, "__call__", tiled_by_length)
    result = selfcheck.check_row_independence(tmp_path, "cuda")
    assert result.status == "FAIL" and result.detail.startswith("quantized linear: rows change with their call's length (64 against 8 rows")
