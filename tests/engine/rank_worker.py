"""One engine rank for the expert-parallel tests: greedy tokens for a prompt of ids, as JSON.

Run as ``python rank_worker.py MODEL OUT.json --prompt 1,2,3 --max-tokens N [--cache-mb X]``
with ``MLX_RANK`` and ``MLX_HOSTFILE`` set (or neither, for a single process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.engine import Engine  # noqa: E402
from engine.errors import MoeBarError  # noqa: E402
from engine.types import EngineOptions, SamplingParams  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cache-mb", type=float, default=0.0)
    p.add_argument("--experts-per-token", type=int, default=None)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--die-after", type=int, default=0, help="SIGKILL this rank after N tokens (fault tests)")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--prefill-pass-tokens", type=int, default=0)
    args = p.parse_args()
    try:
        options = EngineOptions(cache_mb=args.cache_mb, experts_per_token=args.experts_per_token,
                                prefill_chunk=args.prefill_chunk, prefill_pass_tokens=args.prefill_pass_tokens)
        engine = Engine.load(args.model, options, measure_disk=False)
    except MoeBarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = [int(t) for t in args.prompt.split(",")]
    tokens = []
    try:
        for ev in engine.generate(prompt, SamplingParams(temperature=args.temp, max_tokens=args.max_tokens)):
            tokens.append(ev.token)
            if args.die_after and len(tokens) >= args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
    except MoeBarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    par = engine.parallel
    Path(args.out).write_text(json.dumps({
        "tokens": tokens,
        "rank": par.rank if par else 0,
        "ranks": par.size if par else 1,
        "collectives": par.collectives if par else 0,
        "gathered_layers": par.gathered_layers if par else 0,
        "summed_layers": par.summed_layers if par else 0,
        "bytes_sent": par.bytes_sent if par else 0,
        "bytes_read": engine.expert_counters()["bytes_read"],
    }))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
