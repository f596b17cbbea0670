"""engine.fast_blas: a fast BLAS goes under MLX's CPU matmuls on Linux, or a reason is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import fast_blas

ROOT = Path(__file__).resolve().parents[2]


class _Lib:
    def __init__(self, has_sgemm: bool) -> None:
        if has_sgemm:
            self.cblas_sgemm = object()


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_blas, "_loaded", {"path": None, "why_not": "not tried"})


def _load(**kw: Any) -> str | None:
    args: dict[str, Any] = {"platform": "linux", "env": {}, "modules": [], "exists": lambda p: True}
    args.update(kw)
    return fast_blas.load_fast_blas(**args)


def test_picks_the_first_library_that_has_cblas_sgemm() -> None:
    opened: list[str] = []

    def opener(path: str) -> Any:
        opened.append(path)
        if path == fast_blas.CANDIDATES[0]:
            raise OSError("wrong ELF class")
        return _Lib(has_sgemm=path != fast_blas.CANDIDATES[1])

    assert _load(opener=opener) == fast_blas.CANDIDATES[2]
    assert opened == list(fast_blas.CANDIDATES[:3])
    assert fast_blas.fast_blas_status("linux") == (True, fast_blas.CANDIDATES[2])


def test_missing_libraries_are_skipped_and_the_reason_says_what_to_install() -> None:
    assert _load(exists=lambda p: False, opener=lambda p: _Lib(True)) is None
    ok, why = fast_blas.fast_blas_status("linux")
    assert not ok and "libopenblas0-pthread" in why


def test_failures_are_named_in_the_reason() -> None:
    assert _load(opener=lambda p: _Lib(False)) is None
    ok, why = fast_blas.fast_blas_status("linux")
    assert not ok and f"{fast_blas.CANDIDATES[0]}: no cblas_sgemm" in why


def test_too_late_after_mlx_core_is_imported() -> None:
    assert _load(modules=["mlx.core"], opener=lambda p: _Lib(True)) is None
    assert fast_blas.fast_blas_status("linux") == (False, "mlx.core was imported before engine")


def test_off_and_explicit_path_from_the_environment() -> None:
    assert _load(env={"MOEBAR_BLAS": "off"}, opener=lambda p: _Lib(True)) is None
    assert fast_blas.fast_blas_status("linux") == (False, "MOEBAR_BLAS=off")
    opened: list[str] = []
    assert _load(env={"MOEBAR_BLAS": "/opt/blas/libblas.so"}, opener=lambda p: opened.append(p) or _Lib(True)) == "/opt/blas/libblas.so"
    assert opened == ["/opt/blas/libblas.so"]


def test_macos_needs_nothing() -> None:
    assert _load(platform="darwin", opener=lambda p: _Lib(True)) is None
    assert fast_blas.fast_blas_status("darwin") == (True, "Accelerate")


_PROBE = """
import json, engine, numpy as np, mlx.core as mx
from engine.fast_blas import fast_blas_status
a = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((96, 80)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(b))
maps = open('/proc/self/maps').read()
ok, what = fast_blas_status()
print(json.dumps({"ok": ok, "what": what, "mapped": what in maps, "err": float(np.abs(got - a @ b).max())}))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or not any(Path(p).is_file() for p in fast_blas.CANDIDATES),
    reason="no system OpenBLAS here (CI installs libopenblas0-pthread)",
)
def test_importing_engine_puts_openblas_under_mlx() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["ok"] and probe["mapped"], probe
    assert probe["err"] < 1e-3, probe


def test_openblas_kernel_family_follows_the_cpu_flags() -> None:
    skx = "processor : 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n"
    assert fast_blas.openblas_coretype(skx) == "SkylakeX"
    assert fast_blas.openblas_coretype("flags : fpu sse2 avx avx2 fma avx512f\n") == "Haswell"  # not all of SKX's
    assert fast_blas.openblas_coretype("flags : fpu sse2 avx\n") is None
    assert fast_blas.openblas_coretype("Features : fp asimd\n") is None  # aarch64: left to OpenBLAS


def test_an_unreadable_cpuinfo_gives_no_kernel_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoProc(type(Path())):  # type: ignore[misc]
        def read_text(self, *args: Any, **kwargs: Any) -> str:
            raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(fast_blas, "Path", NoProc)
    assert fast_blas._cpuinfo() == ""


def test_a_chosen_library_that_is_not_there_is_named_in_the_reason(tmp_path: Path) -> None:
    missing = str(tmp_path / "libopenblas.so.0")
    opened: list[str] = []
    path = fast_blas.load_fast_blas(platform="linux", env={"MOEBAR_BLAS": missing}, modules=[],
                                    opener=lambda p: opened.append(p) or _Lib(True))  # fmt: skip
    assert path is None and opened == []  # not opened: the file does not exist
    assert fast_blas.fast_blas_status("linux") == (False, f"{missing}: no such file (MOEBAR_BLAS)")


def test_a_second_load_keeps_the_first_library() -> None:
    opened: list[str] = []
    first = _load(opener=lambda p: opened.append(p) or _Lib(True))
    assert first == fast_blas.CANDIDATES[0]
    assert _load(env={"MOEBAR_BLAS": "/opt/other/libblas.so"}, opener=lambda p: opened.append(p) or _Lib(True)) == first
    assert opened == [first]  # loaded once: a BLAS cannot be swapped under a running MLX
