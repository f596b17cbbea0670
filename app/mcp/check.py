"""`moebar mcp check [--config PATH] [--json]`: start each configured MCP server, list its tools, stop it.

No GUI. Exits 0 when every server started; 1 naming each server that failed (and each entry of
the file that could not be read); 2 for bad command-line use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from app import paths
from app.mcp.config import default_config_path, load_config
from app.mcp.hub import McpHub, ServerState
from app.mcp.login_path import login_shell_path


def check_servers(config_path: Path, log_dir: Path) -> dict[str, Any]:
    """Start every server of `config_path` (disabled ones too) at once, wait for each, stop them; a JSON-ready report."""
    config = load_config(config_path)
    hub = McpHub(log_dir, path_for_servers=login_shell_path)
    report: dict[str, Any] = {"config": str(config_path), "problems": list(config.problems), "servers": []}
    try:
        for server in config.servers.values():
            hub.start_server(dataclasses.replace(server, disabled=False))
        while any(state.status == "starting" for state in hub.states().values()):
            time.sleep(0.05)
        states = hub.states()
    finally:
        hub.shutdown()
    for name, server in config.servers.items():
        state = states.get(name, ServerState(name, "failed", reason="it was not started"))
        report["servers"].append({
            "name": name,
            "ok": state.status == "ready",
            "disabled_in_app": server.disabled,
            "target": server.describe(),
            "reason": state.reason,
            "tools": [{"name": t.name, "description": t.description,
                       "enabled": t.name not in server.disabled_tools} for t in state.tools],
            "log": str(hub.log_path(name)),
        })
    report["ok"] = not report["problems"] and all(s["ok"] for s in report["servers"])
    return report


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The report as text for a terminal."""
    if not report["servers"] and not report["problems"]:
        out.write(f"{report['config']}: no MCP servers are configured.\n")
    for server in report["servers"]:
        note = " (disabled in the app)" if server["disabled_in_app"] else ""
        if server["ok"]:
            out.write(f"{server['name']}{note}: ok, {len(server['tools'])} tools ({server['target']})\n")
            for tool in server["tools"]:
                off = "" if tool["enabled"] else " [switched off]"
                first = tool["description"].strip().splitlines()[0] if tool["description"].strip() else ""
                out.write(f"  {tool['name']}{off}: {first}\n")
        else:
            log = f"; log: {server['log']}" if server["log"] else ""
            out.write(f"{server['name']}{note}: FAILED: {server['reason']} ({server['target']}{log})\n")
    for problem in report["problems"]:
        out.write(f"problem: {problem}\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point of `moebar mcp ...`."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(prog="moebar mcp", description="Check the MCP tool servers the app uses.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="start each configured server, list its tools, stop it")
    check.add_argument("--config", type=Path, default=None, help=f"the mcp.json to check (default: {default_config_path()})")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--log-dir", type=Path, default=None,
                       help="where the servers' stderr logs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    config_path = (args.config or default_config_path()).expanduser()
    if args.config is not None and not config_path.exists():
        err.write(f"moebar mcp check: {config_path}: no such file\n")
        return 2
    if args.log_dir is not None:
        report = check_servers(config_path, paths.ensure_dir(args.log_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="moebar-mcp-check-") as temp:
            report = check_servers(config_path, Path(temp))
            for server in report["servers"]:
                server["log"] = ""  # the folder is gone; the reason already quotes the server's stderr
    if args.json:
        out.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        print_report(report, out)
    failed = [s["name"] for s in report["servers"] if not s["ok"]]
    if failed or report["problems"]:
        for server in report["servers"]:
            if not server["ok"]:
                err.write(f"MCP server '{server['name']}' failed: {server['reason']}\n")
        for problem in report["problems"]:
            err.write(f"{problem}\n")
        return 1
    return 0
