"""Helper processes from a source checkout and from a frozen (PyInstaller) bundle.

From source, MoeBar starts its helpers with the interpreter it runs on: the engine is
`python -m engine.serving.stdio_server`, and the model manager runs `python -c ...` (demo model) and
`python -m engine.cli plan ...` (memory plan). In a bundle `sys.executable` is the MoeBar
binary, which is no interpreter, so the binary doubles as one. Its entry script calls
`run_helper(sys.argv)` before anything imports Qt, and a command line that names a helper runs
that helper instead of the app:

    MoeBar --engine-stdio [options]   the engine's JSON-lines loop (engine.serving.stdio_server)
    MoeBar -m MODULE [args]           a bundled module as __main__, like `python -m`
    MoeBar -c CODE [args]             a line of code, like `python -c`
    MoeBar --self-check               import MLX, compute on its default device, print JSON

So the engine runs on the bundle's own Python and libraries, without the GUI's modules.
This module imports nothing heavy at import time: the engine process loads it first.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGINE_STDIO_FLAG = "--engine-stdio"
SELF_CHECK_FLAG = "--self-check"
ENGINE_STDIO_MODULE = "engine.serving.stdio_server"


def is_frozen() -> bool:
    """Whether this process runs from a frozen bundle (PyInstaller sets `sys.frozen`)."""
    return bool(getattr(sys, "frozen", False))


def engine_command(frozen: bool | None = None, executable: str | None = None) -> list[str]:
    """The command that starts the engine's stdio loop with this installation's Python.

    `frozen` and `executable` default to this process's; tests pass them explicitly.
    """
    exe = sys.executable if executable is None else executable
    if is_frozen() if frozen is None else frozen:
        return [exe, ENGINE_STDIO_FLAG]
    return [exe, "-m", ENGINE_STDIO_MODULE]


def helper_kind(argv: Sequence[str]) -> str | None:
    """Which helper a command line (argv[0] is the program) asks for, or None for the app.

    Returns "engine-stdio", "module", "code" or "self-check". `-m` and `-c` count only with
    their argument, as with Python; the app itself takes neither.
    """
    if len(argv) < 2:
        return None
    first = argv[1]
    if first == ENGINE_STDIO_FLAG:
        return "engine-stdio"
    if first == SELF_CHECK_FLAG:
        return "self-check"
    if first == "-m" and len(argv) >= 3:
        return "module"
    if first == "-c" and len(argv) >= 3:
        return "code"
    return None


def run_helper(argv: Sequence[str]) -> int | None:
    """Run the helper `argv` asks for and return its exit status; None when it asks for the app.

    A helper that calls sys.exit ends the process from here, as it would under Python.
    """
    kind = helper_kind(argv)
    if kind is None:
        return None
    rest = list(argv[2:])
    if kind == "engine-stdio":
        from engine.serving.stdio_server import main as engine_main

        return int(engine_main(rest) or 0)
    if kind == "self-check":
        print(json.dumps(self_check(), indent=2, sort_keys=True))
        return 0
    if kind == "module":
        module, args = rest[0], rest[1:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    code, args = rest[0], rest[1:]
    sys.argv = ["-c", *args]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 (what `python -c` does)
    return 0


def self_check() -> dict[str, Any]:
    """Facts showing the bundle can run the engine: MLX computes, data files are in place.

    Raises whatever MLX raises when its native libraries (or, on macOS, mlx.metallib) are
    missing, so a build script running `MoeBar --self-check` fails loudly.
    """
    import mlx.core as mx

    from engine.demo.tokenizer_builder import TOKENIZER_SPECS, chat_template, tiktoken_path

    device = mx.default_device()
    total = mx.sum(mx.arange(10, dtype=mx.float32) * 2.0)
    mx.eval(total)
    root = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parents[1]))
    return {
        "frozen": is_frozen(),
        "python": sys.version.split()[0],
        "mlx_version": str(getattr(mx, "__version__", "unknown")),
        "device": str(device),
        "sum": float(total.item().real),  # 90.0 when MLX computes
        "chat_templates": {kind: len(chat_template(kind)) for kind in TOKENIZER_SPECS},
        "tiktoken_files": {kind: tiktoken_path(kind).is_file() for kind in TOKENIZER_SPECS},
        "app_icon": (root / "resources" / "icons" / "moebar.svg").is_file(),
        "engine_command": engine_command(),
    }
