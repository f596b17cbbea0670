"""How much of Belady's lead any online expert cache policy could take, on synthetic traces.

Belady's optimum knows every future lookup, including the routing noise (the Gumbel draw of the
synthetic model, the sampling-like part of a real router) that nothing can predict. Two offline
bounds, replayed through the engine's cache like the rest (cache_sim), separate the parts:

* ``static-oracle``: LFU by each key's uses over the whole trace: a policy that knows the static
  popularity perfectly (the best a frequency-only policy could learn).
* ``budget-oracle``: per-layer LRU with fixed unequal budgets fitted offline to each layer's own
  LRU hit curve on this trace (greedy by marginal hits): the most that per-layer budgets for LRU
  could add, which ``lru-adaptive`` tries to find online.
* ``state-oracle``: at each token, evicts the resident expert least likely to be routed to, by the
  generator's own noise-free routing state at that token (``routing_with_state``): it knows the
  popularity *and* the drifting context exactly, and nothing of the draw. No online policy can
  know more; what Belady holds beyond it is foresight of the noise.

``python -m engine.diagnostics.cache_bounds --tokens 500 --prompt-tokens 100 --cache-experts 5%``
prints a Markdown table (hit rate, share of the optimum) like ``cache-sim --compare``.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from engine.diagnostics.cache_sim import ReplayResult, parse_size, replay
from engine.diagnostics.synthetic_traces import (
    CALIBRATED, DRIFT_CALIBRATED, GENERATORS, RoutingModel, routing_with_state, trace_of,
)  # fmt: skip
from engine.diagnostics.traces import Trace
from engine.model.cache_policies import Key


class StateOraclePolicy:
    """Evict the resident key with the lowest routing chance at the current token (given up front)."""

    def __init__(self, state: np.ndarray) -> None:
        self.state = state  # [tokens, layers, experts]: log chance of being routed to
        self.resident = np.zeros(state.shape[1:], dtype=bool)
        self.now = 0

    def at_token(self, token: int) -> None:
        """The replay's current token."""
        self.now = token

    def touch(self, key: Key) -> None:
        """Nothing to learn: the state is given."""

    def miss(self, key: Key) -> None:
        """Nothing to learn: the state is given."""

    def insert(self, key: Key) -> None:
        """``key`` is resident."""
        self.resident[key] = True

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""
        self.resident[key] = False

    def victim(self, exclude: set[Key]) -> Key | None:
        """The resident key least likely to be routed to now, not in ``exclude``."""
        score = np.where(self.resident, self.state[self.now], np.inf)
        for key in exclude:
            score[key] = np.inf
        flat = int(np.argmin(score))
        layer, expert = divmod(flat, score.shape[1])
        return (layer, expert) if np.isfinite(score[layer, expert]) else None


class FixedBudgetLRUPolicy:
    """LRU within each layer; a full pool evicts from the incoming key's layer when it holds its
    budget or more, else from the layer furthest over its budget."""

    def __init__(self, budgets: dict[int, int]) -> None:
        self.budget = budgets
        self._order: dict[int, OrderedDict[Key, None]] = {l: OrderedDict() for l in budgets}
        self._incoming: Key | None = None

    def touch(self, key: Key) -> None:
        """Mark ``key`` most recently used in its layer."""
        self._order[key[0]].move_to_end(key)

    def miss(self, key: Key) -> None:
        """Remember whose slot is being sought."""
        self._incoming = key

    def insert(self, key: Key) -> None:
        """Add ``key`` as its layer's most recently used."""
        self._order[key[0]][key] = None

    def remove(self, key: Key) -> None:
        """Forget ``key``."""
        self._order[key[0]].pop(key, None)

    def victim(self, exclude: set[Key]) -> Key | None:
        """The incoming layer's LRU key at its budget, else the LRU key of the layer furthest over."""
        layers = sorted(self._order, key=lambda l: len(self._order[l]) - self.budget[l], reverse=True)
        if self._incoming is not None and len(self._order[self._incoming[0]]) >= self.budget[self._incoming[0]]:
            layers.insert(0, self._incoming[0])
        for layer in layers:
            for key in self._order[layer]:
                if key not in exclude:
                    return key
        return None


def layer_lru_curves(trace: Trace, max_size: int) -> np.ndarray:
    """Per layer, decode hits of a private LRU of each size ``0..max_size`` (by stack distance)."""
    L = trace.header.moe_layers
    hist = np.zeros((L, max_size + 2), dtype=np.int64)
    stacks: list[list[int]] = [[] for _ in range(L)]
    for row, ids in enumerate(trace.experts):
        layer = int(trace.layers[row])
        stack = stacks[layer]
        for e in ids:
            try:
                d = stack.index(e)
                stack.pop(d)
            except ValueError:
                d = max_size + 1
            stack.insert(0, e)
            if not trace.prefill[row]:
                hist[layer, min(d, max_size) + 1 if d <= max_size else max_size + 1] += 1
    curves = np.cumsum(hist, axis=1)[:, : max_size + 1]  # curves[l, c]: distance < c
    return curves


def fitted_budgets(trace: Trace, slots_per_layer: int) -> dict[int, int]:
    """Unequal per-layer budgets summing to ``slots_per_layer x layers``, each at least the top-k,
    given greedily to the layer whose LRU curve gains most per slot over the next 1-16 slots."""
    h = trace.header
    k = max(len(e) for e in trace.experts)
    total = slots_per_layer * h.moe_layers
    cap = min(h.experts_per_layer, total - k * (h.moe_layers - 1))
    curves = layer_lru_curves(trace, cap).astype(float)
    budget = np.full(h.moe_layers, min(k, cap))
    left = total - int(budget.sum())
    steps = np.arange(1, 17)
    while left > 0:
        ends = budget[:, None] + steps[None, :]
        ok = (ends <= cap) & (steps[None, :] <= left)
        ends = np.minimum(ends, cap)
        gain = (np.take_along_axis(curves, ends, axis=1) - curves[np.arange(len(budget)), budget][:, None]) / steps
        gain[~ok] = -1.0
        layer, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[layer, j] < 0:
            break
        budget[layer] += steps[j]
        left -= int(steps[j])
    return {l: int(b) for l, b in enumerate(budget)}


def synthetic_trace(model: RoutingModel, tokens: int, prompt_tokens: int) -> tuple[Trace, np.ndarray]:
    """A trace of ``prompt_tokens`` prefill then ``tokens`` decode tokens, and its routing state."""
    ids, state = routing_with_state(model, prompt_tokens + tokens)
    return trace_of(ids, model, prompt_tokens), state


def bounds(trace: Trace, state: np.ndarray, size: int, policies: list[str]) -> list[ReplayResult]:
    """Belady, the named policies, the static oracle and the state oracle at one size."""
    out = [replay(trace, size, "belady")]
    out += [replay(trace, size, name) for name in policies]
    out.append(replay(trace, size, "static-oracle"))
    budgets = fitted_budgets(trace, size)
    out.append(replay(trace, size, "budget-oracle", factory=lambda slots, layers: FixedBudgetLRUPolicy(budgets)))
    out.append(replay(trace, size, "state-oracle", factory=lambda slots, layers: StateOraclePolicy(state)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the bounds table for a synthetic trace."""
    p = argparse.ArgumentParser(prog="python -m engine.diagnostics.cache_bounds", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--layers", type=int, default=CALIBRATED.moe_layers)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", choices=GENERATORS, default=GENERATORS[0])
    p.add_argument("--cache-experts", action="append", required=True, help="a count or a percentage per layer; repeat")
    p.add_argument("--compare", default="lru,lru-layer", help="online policies to show beside the bounds")
    args = p.parse_args(argv)
    fitted = CALIBRATED if args.generator == "working-set" else DRIFT_CALIBRATED
    model = replace(fitted, moe_layers=args.layers, seed=args.seed)
    trace, state = synthetic_trace(model, args.tokens, args.prompt_tokens)
    names = [n for n in args.compare.split(",") if n]
    head = ["experts/layer (share)", "belady", *names, "static-oracle", "budget-oracle", "state-oracle"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    for text in args.cache_experts:
        size = parse_size(text, model.experts_per_layer)
        results = bounds(trace, state, size, names)
        best = results[0].hit_rate
        cells = [f"{size} ({100 * size / model.experts_per_layer:.0f}%)", f"{100 * best:.1f}%"]
        cells += [f"{100 * r.hit_rate:.1f}% ({r.hit_rate / best:.2f})" for r in results[1:]]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
