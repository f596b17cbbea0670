"""`moebar-engine` argument and top-level errors: bad values are refused naming the option and the
value, pack's option combinations name what is missing, an interrupt or an unexpected failure is
one line (a traceback only with MOEBAR_DEBUG), and the plain-text generate and timing report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import engine.cli as cli
from engine.cli import main, timing_report


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--cache-mb", "lots", "expected 'auto' or a size in MiB, got 'lots'"),
        ("--cache-mb", "-1", "must be 'auto' or a finite size >= 0, got '-1'"),
        ("--cache-mb", "nan", "must be 'auto' or a finite size >= 0, got 'nan'"),
        ("--cache-mb", "inf", "must be 'auto' or a finite size >= 0, got 'inf'"),
        ("--memory-limit-mb", "8G", "expected a size in MiB, got '8G'"),
        ("--memory-limit-mb", "0", "must be a positive size in MiB, got '0'"),
        ("--memory-limit-mb", "inf", "must be a positive size in MiB, got 'inf'"),
    ],
)
def test_bad_memory_sizes_are_refused_naming_the_option_and_value(
    option: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "/nowhere", option, value])
    assert info.value.code == 2
    assert f"argument {option}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "mb"), [("auto", None), (" AUTO ", None), ("0", 0.0), ("512.5", 512.5)])
def test_good_cache_sizes(value: str, mb: float | None) -> None:
    assert cli.cache_mb_arg(value) == mb


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rank", "0"], "pack: give --rank and --ranks together"),
        (["--ranks", "2"], "pack: give --rank and --ranks together"),
        (["--out", "/tmp/share"], "pack: --out is for a rank's share (with --rank and --ranks)"),
    ],
)
def test_pack_option_combinations_name_what_is_missing(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pack", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing was written


def _failing(exc: BaseException) -> Any:
    def command(args: Any) -> int:
        raise exc

    return command


def test_an_interrupt_is_one_line_and_status_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "cmd_demo_model", _failing(KeyboardInterrupt()))
    assert main(["demo-model", "/tmp/x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.delenv("MOEBAR_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_demo_model", _failing(ValueError("bad shape (3, 4) for layer 2")))
    assert main(["demo-model", "/tmp/x"]) == 1
    assert capsys.readouterr().err == "error: ValueError: bad shape (3, 4) for layer 2 (set MOEBAR_DEBUG=1 for a traceback)\n"


def test_moebar_debug_gives_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEBAR_DEBUG", "1")
    monkeypatch.setattr(cli, "cmd_demo_model", _failing(ValueError("bad shape")))
    with pytest.raises(ValueError, match="bad shape"):
        main(["demo-model", "/tmp/x"])


def test_demo_model_prints_the_folder_and_warns_it_is_random(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import engine.demo.demo_model as demo_model

    built: list[tuple[Any, ...]] = []

    def build(out_dir: str, preset: str = "tiny", *, overwrite: bool = False) -> Path:
        built.append((out_dir, preset, overwrite))
        return Path(out_dir)

    monkeypatch.setattr(demo_model, "build_demo_model", build)
    assert main(["demo-model", str(tmp_path / "demo"), "--preset", "small", "--overwrite"]) == 0
    assert built == [(str(tmp_path / "demo"), "small", True)]
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'demo'}\n" and "random; it produces gibberish" in err


def test_the_version_without_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as metadata

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.moebar_version() == "unknown (not installed as a package)"


def _figures(decode_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": 12, "prompt_s": 0.5, "prompt_tps": 24.0, "ttft_s": 0.6, "generated_tokens": decode_tokens + 1,
        "decode_tps": 4.0, "cache_hit_rate": 0.25, "peak_rss_bytes": 300 * 2**20,
        "decode": {"tokens": decode_tokens, "compute_s": 0.2 * decode_tokens, "io_wait_s": 0.05 * decode_tokens,
                   "sync_s": 0.01 * decode_tokens, "bytes_read": 3 * 2**20 * decode_tokens},
    }  # fmt: skip


def test_timing_report_per_decode_token() -> None:
    lines = timing_report(_figures(4)).splitlines()
    assert lines == [
        "prompt: 12 tokens in 0.50 s (24.0 tok/s), time to first token 0.60 s",
        "decode: 5 tokens, 4.00 tok/s",
        "per decode token: compute 200.0 ms, expert I/O wait 50.0 ms, host sync 10.0 ms, expert bytes 3.00 MiB",
        "expert cache hit rate: 25.0%, peak RSS 300 MiB",
    ]


def test_timing_report_without_decode_tokens_has_no_per_token_line() -> None:
    text = timing_report(_figures(0))
    assert "per decode token" not in text and text.startswith("prompt: 12 tokens") and "hit rate: 25.0%" in text


def test_generate_as_text_with_timing(tiny_model: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", str(tiny_model("qwen3_moe", 4)), "--prompt", "hello", "--max-tokens", "4", "--timing"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and '{"token"' not in out  # text, not JSON lines
    import re

    decode = re.search(r"^decode: (\d+) tokens, ", err, re.M)
    assert decode and 1 <= int(decode.group(1)) <= 4, err
    assert re.search(r"^prompt: \d+ tokens in ", err, re.M) and "expert cache hit rate: " in err


@pytest.mark.parametrize(
    ("command", "value", "says"),
    [
        (["generate", "/nowhere", "--prompt", "hi"], "-1", "must be >= 0 KiB (0: whole experts), got '-1'"),
        (["generate", "/nowhere", "--prompt", "hi"], "1M", "expected a whole number of KiB, got '1M'"),
        (["bench"], "-4", "must be >= 0 KiB (0: whole experts), got '-4'"),
    ],
)
def test_a_bad_read_piece_size_is_refused_naming_the_option(
    command: list[str], value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--read-piece-kb", value])
    assert info.value.code == 2
    assert f"argument --read-piece-kb: {says}" in capsys.readouterr().err
    assert cli.kib_or_zero("0") == 0 and cli.kib_or_zero("2048") == 2048
