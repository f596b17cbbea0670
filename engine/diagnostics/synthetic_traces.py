"""Synthetic routing traces calibrated to published statistics of 512-expert top-10 routing.

Real traces of Qwen3.5-397B cannot be recorded here (no download, no Mac), so the policy is also
chosen on synthetic ones. The generator is a model of routing, not of a policy: in each layer an
expert's routing logit is a static popularity (Zipf over a random order, exponent ``zipf_s``)
plus a context term that drifts from token to token (a Gaussian AR(1) process per expert, scale
``drift_sigma`` and time constant ``drift_tokens``); each token takes the top-k of the logits
after Gumbel noise (a sample without replacement). Layers differ: ``drift_sigma`` is spread
linearly from ``drift_sigma_lo`` (first layer) to ``drift_sigma_hi`` (last).

Two generators share that code. ``drift`` is the above alone. ``working-set`` adds a second
timescale: each layer holds a working set of ``ws_size`` experts whose logits get a boost
(``ws_boost_lo`` to ``ws_boost_hi`` over the layers); a member leaves after ``ws_tokens`` tokens on
average and its replacement is drawn by the static popularity, so popular experts come back into
the working set again and again (recurring context), while the per-token Gumbel noise picks among
the members only now and then (reuse two or more tokens back, not only one). With ``ws_size=0`` or
no boost it is the ``drift`` generator, draw for draw (its random stream is separate).

The parameters are fitted (``calibrate``) to the published numbers only:

* consecutive tokens share 8-34% of a layer's experts (the least and most sticky layer);
* LRU hits 49/59/68/71% with 16/32/64/128 experts cached per layer.

The Swift+MLX streamer's 0.556 (6% cached) and 0.837 (35%) are hit rates of its own policy, so they
are shown beside the fit, not fitted. The ``drift`` fit is a coarse then a fine grid over its four
parameters; the ``working-set`` fit is a coordinate search over all eight, started from the
``drift`` fit (so it can only match or improve it on the fitting sample). Both fits and their
residuals are in bench/traces/calibration.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.diagnostics.traces import Trace, TraceHeader

QWEN35_397B = dict(moe_layers=60, experts_per_layer=512, experts_per_token=10, expert_bytes=7_077_888)

# Published statistics the generator is fitted to (see ../shared/DESIGN.md, "Cache policy").
PUBLISHED_LRU = {16: 0.49, 32: 0.59, 64: 0.68, 128: 0.71}  # experts cached per layer -> LRU hit rate
PUBLISHED_OVERLAP = (0.08, 0.34)  # least and most token-to-token overlap among layers
PUBLISHED_OTHER = {"swift_mlx_hit_6pct": 0.556, "swift_mlx_hit_35pct": 0.837}  # not fitted


@dataclass
class RoutingModel:
    """Parameters of the synthetic routing model (see the module docstring)."""

    zipf_s: float = 0.35
    drift_sigma_lo: float = 2.0
    drift_sigma_hi: float = 4.5
    drift_tokens: float = 17.0
    ws_size: int = 0  # working-set members per layer (0: the drift generator)
    ws_boost_lo: float = 0.0  # logit boost of a member, first layer
    ws_boost_hi: float = 0.0  # ... last layer
    ws_tokens: float = 50.0  # mean tokens a member stays in the working set
    moe_layers: int = 60
    experts_per_layer: int = 512
    experts_per_token: int = 10
    expert_bytes: int = 7_077_888
    seed: int = 0


# Fitted by ``moebar-engine synth-trace --calibrate`` (bench/traces/calibration.json): RMS error
# 8.2 points. The fit cannot meet all the published numbers at once: LRU 41/57/67/74% (published
# 49/59/68/71) with overlaps of 18-49% (published 8-34%). A flatter LRU curve needs more reuse
# two or more tokens back than one token back, which no smooth drift produces; see BENCHMARKS.md.
DRIFT_CALIBRATED = RoutingModel()
# The working-set refit (bench/traces/calibration.json, "working-set"; ``synth-trace --calibrate``):
# RMS error 7.6 points (8.0 on another seed; the drift fit: 8.2). Of its two starts, the one with
# no drift won: popularity-drawn working sets of 24 experts whose members stay 5 tokens on average.
# LRU 43/57/66/76% (published 49/59/68/71) with overlaps of 18-47% (published 8-34%). See
# BENCHMARKS.md for why no model of this kind meets LRU's 49% at 16 slots with that little overlap.
CALIBRATED = replace(
    DRIFT_CALIBRATED, zipf_s=0.7, drift_sigma_lo=0.0, drift_sigma_hi=0.0, ws_size=24,
    ws_boost_lo=2.0, ws_boost_hi=7.5, ws_tokens=5.0,
)
GENERATORS = ("working-set", "drift")


def routing(model: RoutingModel, tokens: int, burn_in: int = 200) -> np.ndarray:
    """Routed expert ids ``[tokens, layers, k]`` drawn from ``model``."""
    return _draw(model, tokens, burn_in, None)


def routing_with_state(model: RoutingModel, tokens: int, burn_in: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``routing`` and, per token, each expert's routing state before the noise:
    ``log(k * softmax(logits))`` (float32 ``[tokens, layers, experts]``), the log of its chance of
    being routed to, about (what an online policy could at best know; none of the draw)."""
    state = np.empty((tokens, model.moe_layers, model.experts_per_layer), dtype=np.float32)
    return _draw(model, tokens, burn_in, state), state


def _draw(model: RoutingModel, tokens: int, burn_in: int, state: np.ndarray | None) -> np.ndarray:
    rng = np.random.default_rng(model.seed)
    L, E, K = model.moe_layers, model.experts_per_layer, model.experts_per_token
    base = np.empty((L, E))
    ranks = -model.zipf_s * np.log(np.arange(1, E + 1))
    for l in range(L):
        base[l, rng.permutation(E)] = ranks
    sigma = np.linspace(model.drift_sigma_lo, model.drift_sigma_hi, L)[:, None]
    rho = math.exp(-1.0 / model.drift_tokens)
    step = math.sqrt(1.0 - rho * rho)
    z = rng.standard_normal((L, E)) * sigma
    ws = _WorkingSet(model, base) if model.ws_size > 0 and max(model.ws_boost_lo, model.ws_boost_hi) > 0 else None
    out = np.empty((tokens, L, K), dtype=np.int32)
    for t in range(-burn_in, tokens):
        z = rho * z + step * sigma * rng.standard_normal((L, E))
        if ws is not None:
            ws.step()
        if t < 0:
            continue
        mean = base + z if ws is None else base + z + ws.boost * ws.member
        if state is not None:
            top = mean.max(axis=1, keepdims=True)
            lse = top + np.log(np.exp(mean - top).sum(axis=1, keepdims=True))
            state[t] = mean - lse + math.log(K)
        g = mean + rng.gumbel(size=(L, E))
        out[t] = np.argpartition(-g, K, axis=1)[:, :K]
    return out


class _WorkingSet:
    """The slow component: per layer, ``ws_size`` members that leave at rate 1/``ws_tokens`` and
    are replaced by non-members drawn by static popularity (own random stream)."""

    def __init__(self, model: RoutingModel, base: np.ndarray) -> None:
        L, E = base.shape
        self.rng = np.random.default_rng([model.seed, 1])
        self.base = base
        self.size = min(model.ws_size, E - 1)
        self.leave = 1.0 / max(1.0, model.ws_tokens)
        self.boost = np.linspace(model.ws_boost_lo, model.ws_boost_hi, L)[:, None]
        self.member = np.zeros((L, E), dtype=bool)
        first = np.argsort(-(base + self.rng.gumbel(size=(L, E))), axis=1)[:, : self.size]
        np.put_along_axis(self.member, first, True, axis=1)

    def step(self) -> None:
        """One token: some members leave, as many newcomers (popularity-weighted, Gumbel top-r) join."""
        leaving = self.member & (self.rng.random(self.member.shape) < self.leave)
        counts = leaving.sum(axis=1)
        if not counts.any():
            return
        keys = np.where(self.member, -np.inf, self.base + self.rng.gumbel(size=self.member.shape))
        self.member &= ~leaving
        for layer in np.nonzero(counts)[0]:
            r = int(counts[layer])
            self.member[layer, np.argpartition(-keys[layer], r)[:r]] = True


def write_trace(path: str | Path, model: RoutingModel, tokens: int, prompt_tokens: int = 0) -> Path:
    """Write a trace of ``prompt_tokens`` prefill then ``tokens`` decode tokens."""
    path = Path(path)
    ids = routing(model, prompt_tokens + tokens)
    header = TraceHeader(
        "synthetic", model.moe_layers, model.experts_per_layer, model.experts_per_token, model.expert_bytes
    )
    with path.open("w") as f:
        f.write(header.to_json() + "\n")
        for t in range(ids.shape[0]):
            extra = ', "prefill": true' if t < prompt_tokens else ""
            f.write("".join(
                f'{{"token": {t}, "layer": {l}, "experts": {json.dumps(sorted(ids[t, l].tolist()))}{extra}}}\n'
                for l in range(ids.shape[1])
            ))  # fmt: skip
    return path


def layer_overlap(ids: np.ndarray) -> np.ndarray:
    """Mean share of a layer's experts that the next token routes to again, per layer."""
    T, L, K = ids.shape
    out = np.empty(L)
    for l in range(L):
        rows = ids[:, l, :]
        shared = [len(np.intersect1d(rows[t], rows[t + 1], assume_unique=True)) for t in range(T - 1)]
        out[l] = float(np.mean(shared)) / K
    return out


def reuse_distances(ids: np.ndarray, max_distance: int = 8) -> np.ndarray:
    """Share of all picks whose expert the same layer last routed to exactly ``d`` tokens before,
    for ``d = 1..max_distance`` (index ``d - 1``); the rest were further back or never."""
    T, L, K = ids.shape
    counts = np.zeros(max_distance, dtype=np.int64)
    for l in range(L):
        last = np.full(int(ids[:, l].max()) + 1, -1, dtype=np.int64)
        for t in range(T):
            row = ids[t, l]
            seen = last[row]
            d = t - seen[seen >= 0]
            counts += np.bincount(d[d <= max_distance], minlength=max_distance + 1)[1:]
            last[row] = t
    return counts / ids.size


def trace_of(ids: np.ndarray, model: RoutingModel, prompt_tokens: int = 0, *, sort: bool = True) -> Trace:
    """The routing ``ids`` ``[tokens, layers, K]`` as an in-memory trace, the first ``prompt_tokens``
    marked prefill; ``sort`` orders each row's experts as a written trace does (``write_trace``)."""
    T, L, K = ids.shape
    header = TraceHeader("synthetic", L, model.experts_per_layer, K, model.expert_bytes)
    return Trace(
        header,
        np.repeat(np.arange(T), L),
        np.tile(np.arange(L, dtype=np.int32), T),
        [tuple(sorted(int(e) for e in row) if sort else (int(e) for e in row)) for row in ids.reshape(T * L, K)],
        np.repeat(np.arange(T) < prompt_tokens, L),
    )


def lru_curve(ids: np.ndarray, model: RoutingModel, sizes: list[int]) -> dict[int, float]:
    """LRU hit rate per size (experts per layer), replayed through the engine's cache."""
    from engine.diagnostics.cache_sim import replay

    trace = trace_of(ids, model, sort=False)  # (the calibration replays rows in the generator's order)
    return {n: replay(trace, n, "lru").hit_rate for n in sizes}


def measure(model: RoutingModel, tokens: int = 1500) -> dict[str, Any]:
    """The published statistics as the model produces them."""
    ids = routing(model, tokens)
    overlap = layer_overlap(ids)
    curve = lru_curve(ids, model, list(PUBLISHED_LRU))
    return {"overlap_min": float(overlap.min()), "overlap_max": float(overlap.max()), "lru": curve}


def fit_error(stats: dict[str, Any]) -> float:
    """RMS distance to the published statistics (4 LRU points and the overlap range, equal weight)."""
    errs = [stats["lru"][n] - want for n, want in PUBLISHED_LRU.items()]
    errs += [stats["overlap_min"] - PUBLISHED_OVERLAP[0], stats["overlap_max"] - PUBLISHED_OVERLAP[1]]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


_COARSE_GRID = {
    "zipf_s": [0.2, 0.5, 0.8, 1.1],
    "drift_sigma_lo": [1.0, 2.0, 3.0],
    "drift_sigma_hi": [3.0, 4.0, 5.0],
    "drift_tokens": [10.0, 30.0, 100.0],
}


def _search(grid: dict[str, list[float]], layers: int, tokens: int) -> list[tuple[float, dict[str, float], dict[str, Any]]]:
    tried = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        if params["drift_sigma_lo"] > params["drift_sigma_hi"] or min(values) < 0:
            continue
        model = replace(RoutingModel(), moe_layers=layers, **params)  # type: ignore[arg-type]
        stats = measure(model, tokens)
        tried.append((fit_error(stats), params, stats))
        print(f"{params} -> error {tried[-1][0]:.4f}", file=sys.stderr, flush=True)
    return tried


def calibrate(layers: int = 6, tokens: int = 1000) -> dict[str, Any]:
    """Fit the drift generator's four parameters to the published statistics: a coarse grid, then
    a finer grid (half the coarse steps) around its best point; returns the report."""
    tried = _search(_COARSE_GRID, layers, tokens)
    best = min(tried, key=lambda item: item[0])[1]
    fine: dict[str, list[float]] = {}
    for name, values in _COARSE_GRID.items():
        step = (values[1] - values[0]) / 2 if name != "drift_tokens" else None
        v = best[name]
        fine[name] = [v / 1.7, v, v * 1.7] if step is None else [round(v - step, 3), v, round(v + step, 3)]
    tried += _search(fine, layers, tokens)
    tried.sort(key=lambda item: item[0])
    err, params, stats = tried[0]
    return {
        "generator": "drift",
        "fitted": params,
        "rms_error": err,
        "measured": stats,
        "published": {"lru": PUBLISHED_LRU, "overlap": PUBLISHED_OVERLAP, "not_fitted": PUBLISHED_OTHER},
        "setup": {"layers": layers, "tokens": tokens, "coarse_grid": _COARSE_GRID, "fine_grid": fine},
        "runners_up": [{"params": p, "rms_error": e} for e, p, _ in tried[1:6]],
    }


# Coordinate search of the working-set fit: each parameter's first step (additive, or a factor
# for the time constants and the set size) and its bounds; steps halve when a round finds nothing.
_WS_STEPS: dict[str, tuple[str, float, float, float]] = {
    "zipf_s": ("add", 0.15, 0.0, 3.0),
    "drift_sigma_lo": ("add", 0.5, 0.0, 8.0),
    "drift_sigma_hi": ("add", 0.5, 0.0, 8.0),
    "drift_tokens": ("mul", 1.7, 1.0, 1000.0),
    "ws_size": ("mul", 1.5, 10.0, 256.0),
    "ws_boost_lo": ("add", 0.5, 0.0, 10.0),
    "ws_boost_hi": ("add", 0.5, 0.0, 10.0),
    "ws_tokens": ("mul", 2.0, 1.0, 10000.0),
}
WS_STARTS = (  # the drift fit with the working set off; a working set with the drift off
    replace(DRIFT_CALIBRATED, ws_size=24, ws_boost_lo=0.0, ws_boost_hi=0.0, ws_tokens=50.0),
    replace(DRIFT_CALIBRATED, zipf_s=0.7, drift_sigma_lo=0.0, drift_sigma_hi=0.0, ws_size=24,
            ws_boost_lo=2.5, ws_boost_hi=4.5, ws_tokens=5.0),
)


def _neighbours(model: RoutingModel, name: str, scale: float) -> list[RoutingModel]:
    kind, step, lo, hi = _WS_STEPS[name]
    v = getattr(model, name)
    step = step * scale if kind == "add" else step**scale
    values = [v - step, v + step] if kind == "add" else [v / step, v * step]
    if name == "ws_size":
        values = [float(round(x)) for x in values]
    out = []
    for x in values:
        x = min(hi, max(lo, round(x, 4)))
        if x != v:
            cand = replace(model, **{name: int(x) if name == "ws_size" else x})
            if cand.drift_sigma_lo <= cand.drift_sigma_hi and cand.ws_boost_lo <= cand.ws_boost_hi:
                out.append(cand)
    return out


def calibrate_working_set(layers: int = 6, tokens: int = 1000, rounds: int = 6) -> dict[str, Any]:
    """Fit all eight parameters of the working-set generator by coordinate search from each of
    ``WS_STARTS`` (the drift fit with the working set off; a working set with no drift): each
    round moves every parameter to its best neighbour if that lowers the error, and halves the
    steps when nothing moved; returns the report of the best end point, with the others."""
    runs = [_coordinate_search(replace(start, moe_layers=layers), tokens, rounds) for start in WS_STARTS]
    best = min(runs, key=lambda run: run["rms_error"])
    best["other_starts"] = [run for run in runs if run is not best]
    return best


def _coordinate_search(model: RoutingModel, tokens: int, rounds: int) -> dict[str, Any]:
    start_model = model
    stats = measure(model, tokens)
    err = fit_error(stats)
    start_err = err
    path = [{"params": _params(model), "rms_error": err}]
    scale = 1.0
    for _ in range(rounds):
        moved = False
        for name in _WS_STEPS:
            for cand in _neighbours(model, name, scale):
                cand_stats = measure(cand, tokens)
                cand_err = fit_error(cand_stats)
                print(f"{_params(cand)} -> error {cand_err:.4f}", file=sys.stderr, flush=True)
                if cand_err < err - 1e-4:
                    model, stats, err, moved = cand, cand_stats, cand_err, True
            path.append({"params": _params(model), "rms_error": err})
        if not moved:
            scale /= 2
    check = measure(replace(model, seed=model.seed + 1), tokens)
    return {
        "generator": "working-set",
        "fitted": _params(model),
        "rms_error": err,
        "measured": stats,
        "start": {"params": _params(start_model), "rms_error": start_err},
        "other_seed": {"seed": model.seed + 1, "rms_error": fit_error(check), "measured": check},
        "published": {"lru": PUBLISHED_LRU, "overlap": PUBLISHED_OVERLAP, "not_fitted": PUBLISHED_OTHER},
        "setup": {"layers": model.moe_layers, "tokens": tokens, "rounds": rounds, "steps": _WS_STEPS},
        "path": path,
    }


def _params(model: RoutingModel) -> dict[str, float]:
    names = ["zipf_s", "drift_sigma_lo", "drift_sigma_hi", "drift_tokens", "ws_size", "ws_boost_lo", "ws_boost_hi", "ws_tokens"]
    return {n: getattr(model, n) for n in names}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``moebar-engine synth-trace``."""
    p = argparse.ArgumentParser(prog="moebar-engine synth-trace", description=__doc__.splitlines()[0])
    p.add_argument("out", help="trace file to write (with --calibrate: the calibration report, JSON)")
    p.add_argument("--tokens", type=int, default=1000, help="decode tokens")
    p.add_argument("--prompt-tokens", type=int, default=0, help="prefill tokens before them")
    p.add_argument("--layers", type=int, default=QWEN35_397B["moe_layers"],
                   help="MoE layers in the trace (default: Qwen3.5-397B's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same trace)")
    p.add_argument("--generator", choices=GENERATORS, default=GENERATORS[0],
                   help="working-set (default: two timescales) or drift (the first fit: one timescale)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the generator to the published statistics (its entry in OUT is replaced, others kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``moebar-engine synth-trace OUT [--tokens N] [--prompt-tokens N] [--layers L] [--seed S]``."""
    args = build_parser().parse_args(argv)
    if args.calibrate:
        report = calibrate() if args.generator == "drift" else calibrate_working_set()
        out = Path(args.out)
        reports = json.loads(out.read_text()) if out.exists() else {}
        if "generator" in reports or "fitted" in reports:  # the first fit's file: drift alone
            reports = {"drift": reports}
        reports[args.generator] = report
        out.write_text(json.dumps(reports, indent=2) + "\n")
        print(json.dumps({"fitted": report["fitted"], "rms_error": report["rms_error"], "measured": report["measured"]}))
        return 0
    if args.tokens < 2 or args.layers < 1:
        print("error: --tokens must be at least 2 and --layers at least 1", file=sys.stderr)
        return 2
    fitted = CALIBRATED if args.generator == "working-set" else DRIFT_CALIBRATED
    model = replace(fitted, moe_layers=args.layers, seed=args.seed)
    write_trace(args.out, model, args.tokens, args.prompt_tokens)
    print(json.dumps({"trace": args.out, **asdict(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
