"""MCP servers that misbehave, for the tests: python bad_server.py exit|garbage|silent."""

from __future__ import annotations

import sys
import time

mode = sys.argv[1]
if mode == "exit":
    print("bad_server: missing API key, giving up", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "garbage":
    sys.stdin.readline()  # the initialize request
    print("Hello! I am not JSON-RPC at all", flush=True)
    time.sleep(60)
if mode == "silent":
    for _line in sys.stdin:  # read every request, answer none
        pass
