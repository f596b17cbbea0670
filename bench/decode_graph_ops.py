"""One decode step's graph, the engine's against mlx-lm's: the primitives each queues, counted.

On a GPU every primitive is a kernel launch, so an op the engine adds per MoE layer costs at
every layer of every token. Builds a tiny random ``family`` model (mlx-lm's classes), loads it
with every expert resident (the warm, device-routed path) and in mlx-lm, runs a 4-token prompt,
then exports the graph of the next step (``mx.export_to_dot``) and counts primitives by name.
The tiny model is stored in fp32 (the default here): with ``--dtype bfloat16`` both sides are
cast, each its own way, so their cast counts differ for reasons a real bf16 model does not have.

Measured (CPU, 2026-12-06): in fp32 the engine's step is mlx-lm's plus one ``Gather`` per MoE
layer (``table[ids]``, device routing; its ``Squeeze`` is a view); before the slot ids were
made uint32 it also cast them to uint32 once per projection (three ``AsType`` per MoE layer).

Usage: python bench/decode_graph_ops.py [--family qwen3_5_moe] [--dtype float32]
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path
from typing import Any

import engine  # noqa: F401  (before mlx: the fast BLAS, see engine.fast_blas)
import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache

from engine.demo.family_models import build_family_model
from engine.engine import Engine
from engine.model.loader import inspect_experts
from engine.model.memory_budget import every_expert_cache_mb
from engine.types import EngineOptions


def step_ops(model: Any, cache: list[Any], work: Path) -> collections.Counter[str]:
    """Primitives of one decode step's graph after a 4-token prompt, by name."""
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    mx.eval([c.state for c in cache])
    y = model(mx.array([[5]]), cache=cache)
    dot = work / "step.dot"
    mx.export_to_dot(str(dot), y)
    return collections.Counter(re.findall(r'label ="?([A-Za-z_]+)', dot.read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_5_moe")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="moebar-graph-") as tmp:
        work = Path(tmp)
        path = build_family_model(work / args.family, args.family)
        total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)
        eng = Engine.load(path, EngineOptions(cache_mb=every_expert_cache_mb(total), device="cpu",
                                              activation_dtype=args.dtype, cpu_split=False),
                          measure_disk=False)  # fmt: skip
        try:
            eng.preload_experts()
            ours = step_ops(eng.model, eng.make_kv_cache(), work)
        finally:
            eng.close()
        ref, _ = mlx_load(str(path))
        ref.set_dtype(getattr(mx, args.dtype))
        theirs = step_ops(ref, make_prompt_cache(ref), work)
    print(f"{args.family} ({args.dtype}): engine {sum(ours.values())} primitives, mlx-lm {sum(theirs.values())}")
    for name in sorted(set(ours) | set(theirs)):
        if ours[name] != theirs[name]:
            print(f"  {name}: engine {ours[name]}, mlx-lm {theirs[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
