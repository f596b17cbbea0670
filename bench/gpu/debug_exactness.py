"""Where the engine's tokens leave mlx-lm's on this device: logprobs and per-layer outputs.

The self-check's exactness model (qwen3_moe, 4-bit, ``--preset``: kernel-check as on a GPU) is run by mlx-lm (twice: is mlx-lm
itself repeatable here?) and by the engine in several configurations (mlx-lm's shapes on/off,
no cache, 3/8 of the experts cached, every expert cached). For each: the greedy tokens, the
largest |difference| of the step logprobs against mlx-lm's, mlx-lm's top-2 margin at each
step, and for the last prompt token's call (when it runs alone) each decoder layer's and each
MoE block's largest |difference| against mlx-lm's. Prints one JSON object per configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

RECORD: dict[str, list[np.ndarray]] = {"layer": [], "moe": [], "attn": []}
ON = {"on": False}


def _hook(cls: type, kind: str) -> None:
    original = cls.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if ON["on"]:
            arr = out[0] if isinstance(out, tuple) else out
            if arr.ndim == 3 and arr.shape[1] == 1:
                RECORD[kind].append(np.array(arr[0, -1].astype(mx.float32)))
        return out

    cls.__call__ = call


def reference(model_dir: Path, prompt: list[int], n: int, dtype: str) -> dict[str, Any]:
    """mlx-lm's tokens, each step's logprobs and the recorded outputs, the model cast to ``dtype``."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32 if dtype == "float32" else mx.bfloat16)
    [r.clear() for r in RECORD.values()]
    ON["on"] = True
    tokens, logprobs = [], []
    for token, lp in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(temp=0.0)):
        tokens.append(int(token))
        logprobs.append(np.array(lp.astype(mx.float32)))
    ON["on"] = False
    return {"tokens": tokens, "logprobs": logprobs, "layers": list(RECORD["layer"]), "moe": list(RECORD["moe"]),
            "attn": list(RECORD["attn"])}


def engine_run(model_dir: Path, prompt: list[int], n: int, dtype: str, prefill_chunk: int = 16, **opts: Any) -> dict[str, Any]:
    """The engine's tokens, each step's logprobs and the recorded outputs, with these EngineOptions."""
    import engine.model.generate as gen
    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    seen: list[np.ndarray] = []
    make = gen._sampler

    def recording(sampling: Any) -> Any:
        inner = make(sampling)

        def sample(lp: mx.array) -> mx.array:
            seen.append(np.array(lp[0].astype(mx.float32)))
            return inner(lp)

        return sample

    gen._sampler = recording
    engine = Engine.load(model_dir, EngineOptions(activation_dtype=dtype, prefill_chunk=prefill_chunk, **opts), measure_disk=False)
    [r.clear() for r in RECORD.values()]
    ON["on"] = True
    try:
        tokens = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=n))]
        counters = engine.expert_counters()
        shapes = bool(getattr(engine, "_mlx_lm_shapes", False))
    finally:
        ON["on"] = False
        gen._sampler = make
        engine.close()
    return {"tokens": tokens, "logprobs": seen, "layers": list(RECORD["layer"]), "moe": list(RECORD["moe"]),
            "attn": list(RECORD["attn"]),
            "counters": counters, "shapes_attr": shapes}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Where ``got`` leaves ``ref``: per-step logprob differences, mlx-lm's margins, layer differences."""
    steps = min(len(ref["logprobs"]), len(got["logprobs"]))
    lp = [float(np.max(np.abs(ref["logprobs"][i].reshape(-1) - got["logprobs"][i].reshape(-1)))) for i in range(steps)]
    margins = []
    for r in ref["logprobs"]:
        top = np.sort(r.reshape(-1))[-2:]
        margins.append(float(top[1] - top[0]))
    layers = [float(np.max(np.abs(a - b))) for a, b in zip(ref["layers"], got["layers"])]
    moe = [float(np.max(np.abs(a - b))) for a, b in zip(ref["moe"], got["moe"])]
    first = {}
    for kind in ("attn", "moe", "layers"):
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(ref[kind], got[kind])]
        hit = next((i for i, d in enumerate(diffs) if d > 0), None)
        first[kind] = None if hit is None else {"call": hit, "diff": diffs[hit], "of": len(diffs)}
    return {"first_nonzero_diff": first, "tokens": got["tokens"], "ref_tokens": ref["tokens"], "equal": got["tokens"] == ref["tokens"],
            "max_dlogprob_per_step": lp, "ref_margin_per_step": margins,
            "layer_diffs_first_single_token_calls": layers[:12], "moe_diffs": moe[:12],
            "ref_layer_absmax": [float(np.max(np.abs(a))) for a in ref["layers"][:4]],
            "nan_steps": [int(np.isnan(g).sum()) for g in got["logprobs"]][:4]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="gpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", default="")
    p.add_argument("--builds", default="gpu", help="where the check model is built (its files' md5 printed)")
    p.add_argument("--preset", default="kernel-check")
    p.add_argument("--prompt-tokens", type=int, default=0, help="0: the self-check's prompt")
    p.add_argument("--configs", default="", help="config names to run, separated by ; (default all)")
    args = p.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    import mlx_lm.models.qwen3_moe as q

    from engine.demo.demo_model import build_random_moe_model
    from engine.diagnostics.selfcheck import GENERATED_TOKENS, _prompt

    _hook(q.Qwen3MoeDecoderLayer, "layer")
    _hook(q.Qwen3MoeSparseMoeBlock, "moe")
    _hook(q.Attention, "attn")
    prompt = _prompt() if not args.prompt_tokens else [int(t) for t in np.random.default_rng(0).integers(100, 50_000, args.prompt_tokens)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for build, dtype in [(b, d) for b in args.builds.split(",") for d in args.dtypes.split(",")]:
            mx.set_default_device(mx.cpu if build == "cpu" else mx.gpu)
            model = Path(tmp) / build / dtype
            build_random_moe_model(model, "qwen3_moe", 4, preset=args.preset, expert_scales_dtype=dtype)
            mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
            files = {f.name: hashlib.md5(f.read_bytes()).hexdigest()[:10] for f in sorted(model.glob("*.safetensors"))}
            print(json.dumps({"build": build, "dtype": dtype, "files": files}), flush=True)
            ref = reference(model, prompt, GENERATED_TOKENS, dtype)
            again = reference(model, prompt, GENERATED_TOKENS, dtype)
            row = {"build": build, "dtype": dtype, "config": "mlx-lm again", **compare(ref, again)}
            print(json.dumps(row), flush=True)
            results.append(row)
            from engine.model.loader import inspect_experts

            total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(model).layers) / 2**20
            configs = [
                ("shapes on, cache 3/8", {"mlx_lm_shapes": "on", "cache_mb": total * 3 / 8}),
                ("shapes off, cache 3/8", {"mlx_lm_shapes": "off", "cache_mb": total * 3 / 8}),
                ("shapes on, cache 0", {"mlx_lm_shapes": "on", "cache_mb": 0}),
                ("shapes on, cache all", {"mlx_lm_shapes": "on", "cache_mb": total * 1.5}),
                ("shapes on, cache 3/8, unpacked", {"mlx_lm_shapes": "on", "cache_mb": total * 3 / 8, "use_packed": False}),
            ]
            for name, opts in configs:
                if args.configs and name not in args.configs.split(";"):
                    continue
                try:
                    got = engine_run(model, prompt, GENERATED_TOKENS, dtype, **opts)
                    row = {"build": build, "dtype": dtype, "config": name, "counters": got["counters"], **compare(ref, got)}
                except Exception as exc:  # noqa: BLE001 - a diagnostic reports and goes on
                    row = {"dtype": dtype, "config": name, "error": repr(exc)}
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
