"""The real engine (`engine.stdio_server` on a real model) with one injected fault, for app tests
of running out of memory: a chat whose last user message is "oom" raises MemoryError inside the
engine after three answer pieces, as a failed allocation mid-answer does. Everything else, the
protocol included, is the real engine's. Run as ``python tests/app/oom_engine.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.serving import service  # noqa: E402
from engine.serving.protocol import TokenTextEvent  # noqa: E402
from engine.serving.stdio_server import main  # noqa: E402

FAIL_AFTER_PIECES = 3
_real_turn_of = service.EngineService._turn_of


def _turn_of(self: service.EngineService, engine: Any, req: Any, emit: Any, cancelled: Any, turn: Any) -> Any:
    """The service's own turn, with memory running out after a few pieces when asked to."""
    if req.messages[-1].content != "oom":
        return _real_turn_of(self, engine, req, emit, cancelled, turn)
    pieces = 0

    def emit_then_run_out(event: Any) -> None:
        nonlocal pieces
        emit(event)
        if isinstance(event, TokenTextEvent):
            pieces += 1
            if pieces == FAIL_AFTER_PIECES:
                raise MemoryError("std::bad_alloc while growing the KV cache")

    return _real_turn_of(self, engine, req, emit_then_run_out, cancelled, turn)


service.EngineService._turn_of = _turn_of  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
