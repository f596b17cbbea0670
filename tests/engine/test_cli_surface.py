"""The command line a user meets first: --version, help on every option of every subcommand, and
`serve` answering a model name it does not serve the way OpenAI does (404 model_not_found)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import ThreadedServer

from engine import cli
from engine.serving.http_server import create_app
from engine.serving.protocol import LoadRequest
from engine.serving.service import EngineService

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    parsers = {"moebar-engine": top}
    for name, sub in _subparsers(top).items():
        delegated = name in {n for n, _, _ in cli._DELEGATED}  # noqa: SLF001
        parsers[name] = cli.delegated_parser(name) if delegated else sub
    return parsers


def test_every_option_of_every_subcommand_has_help() -> None:
    parsers = _all_parsers()
    assert {"generate", "plan", "pack", "demo-model", "stdio", "serve", "bench"} <= set(parsers)
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in parsers.items()
        for action in parser._actions  # noqa: SLF001
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()  # noqa: SLF001
    ]
    assert missing == []


def test_version_of_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from app.main import parse_args

    version = cli.moebar_version()
    assert version[0].isdigit()
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"moebar-engine {version}"
    with pytest.raises(SystemExit) as done:
        parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"moebar {version}"


def test_delegated_help_goes_to_the_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--api-key" in out.stdout and "--port" in out.stdout


def test_unknown_model_name_is_openais_404() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["hello"] * 4)
    service = EngineService(loader=scripted_loader(engine))
    service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    server = ThreadedServer(create_app(service, "served-name"))
    try:
        url = server.url + "/v1/chat/completions"
        messages = [{"role": "user", "content": "hi"}]
        for stream in (False, True):
            r = httpx.post(url, json={"model": "gpt-4o", "messages": messages, "stream": stream}, timeout=30)
            assert r.status_code == 404
            error = r.json()["error"]
            assert error["code"] == "model_not_found" and error["param"] == "model"
            assert "gpt-4o" in error["message"] and "served-name" in error["message"]
        assert engine.finish_reasons == []  # nothing was generated for a refused name
        for body in ({"model": "served-name"}, {}):
            r = httpx.post(url, json={**body, "messages": messages}, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
    finally:
        server.stop()
