"""gather_slots: a streaming layer's decode experts copied into a compact array first, exactly."""

from __future__ import annotations

from typing import Any

import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from engine.engine import Engine
from engine.errors import RequestError
from engine.model import cuda_memory
from engine.model.loader import inspect_experts
from engine.model.streamed_moe import StreamedSwitch
from engine.types import EngineOptions, SamplingParams

PROMPT = "A compact copy of the experts a token routes to"
N_TOKENS = 12


def _reference(path: Any) -> tuple[list[int], list[int]]:
    model, tok = mlx_load(str(path))[:2]
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    out = [r.token for r in stream_generate(model, tok, prompt, max_tokens=N_TOKENS, sampler=make_sampler(0.0))]
    return prompt, out


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_5_moe"])
@pytest.mark.parametrize("experts_cached", [0, 6])
def test_gathered_decode_equals_mlx_lm_and_takes_the_gathered_path(
    tiny_model, monkeypatch, model_type: str, experts_cached: int
) -> None:
    path = tiny_model(model_type, 4)
    prompt, expected = _reference(path)
    one = inspect_experts(path).layers[0].expert_bytes
    calls = {"gathered": 0}
    real = StreamedSwitch._gathered

    def counted(self: StreamedSwitch, *args: Any) -> Any:
        calls["gathered"] += 1
        return real(self, *args)

    monkeypatch.setattr(StreamedSwitch, "_gathered", counted)
    got = {}
    for setting in ("on", "off"):
        before = calls["gathered"]
        options = EngineOptions(cache_mb=experts_cached * one / 2**20, gather_slots=setting)
        engine = Engine.load(path, options, measure_disk=False)
        try:
            got[setting] = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
            switches = engine._loaded.switches
            # after each call the layers point at their slot pools again, not at a token's copy
            for s in switches:
                pool = engine._loaded.streamer.cache_of_layer[s.layer].pool
                for key in s._binding.param_keys:
                    owner_name, attr = key.rsplit(".", 1)
                    owner = s.inner_module
                    for part in owner_name.split("."):
                        owner = getattr(owner, part)
                    assert getattr(owner, attr) is pool.arrays[key]
        finally:
            engine.close()
        used = calls["gathered"] - before
        # every decode step of every layer (the prompt's long call keeps the pool's own path)
        assert used >= (len(switches) * (N_TOKENS - 1) if setting == "on" else 0)
        assert used == 0 or setting == "on"
    assert got["on"] == expected and got["off"] == expected


def test_only_calls_of_few_experts_are_gathered(tiny_model, monkeypatch) -> None:
    """A prefill call over many experts of a large pool keeps the pool's own path (its copy
    would double the pool's memory); decode steps are gathered."""
    from engine.model.streamed_moe import GATHER_MAX_EXPERTS_PER_K

    path = tiny_model("qwen3_moe", 4)
    layers = inspect_experts(path).layers
    sizes = {"gathered": [], "calls": []}
    real_inner, real_gathered = StreamedSwitch._call_inner, StreamedSwitch._gathered

    def inner(self: StreamedSwitch, x: Any, host_slots: Any, slot_idx: Any) -> Any:
        import numpy as np

        sizes["calls"].append(len(np.unique(host_slots)))
        return real_inner(self, x, host_slots, slot_idx)

    def gathered(self: StreamedSwitch, x: Any, used: Any, compact: Any) -> Any:
        sizes["gathered"].append(len(used))
        return real_gathered(self, x, used, compact)

    monkeypatch.setattr(StreamedSwitch, "_call_inner", inner)
    monkeypatch.setattr(StreamedSwitch, "_gathered", gathered)
    half = sum(l.expert_bytes * l.num_experts for l in layers) / 2 / 2**20  # half of every expert: no device routing
    engine = Engine.load(path, EngineOptions(cache_mb=half, gather_slots="on"), measure_disk=False)
    try:
        k = engine._loaded.streamer.k
        prompt = list(range(10, 90))  # 80 tokens route to most of a layer's experts at once
        list(engine.generate(prompt, SamplingParams(max_tokens=4)))
    finally:
        engine.close()
    bound = GATHER_MAX_EXPERTS_PER_K * k
    assert max(sizes["calls"]) > bound  # the prompt's calls
    assert sizes["gathered"] and max(sizes["gathered"]) <= bound
    assert len(sizes["gathered"]) == sum(n <= bound for n in sizes["calls"])


def test_a_pool_that_keeps_every_expert_is_not_gathered(tiny_model, monkeypatch) -> None:
    path = tiny_model("qwen3_moe", 4)
    total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)
    monkeypatch.setattr(StreamedSwitch, "_gathered", lambda *a: pytest.fail("gathered a resident pool"))
    engine = Engine.load(path, EngineOptions(cache_mb=total / 2**20 + 1, gather_slots="on"), measure_disk=False)
    try:
        engine.set_device_routing(False)  # the host path, where the choice is made
        list(engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=4)))
    finally:
        engine.close()


def test_setting_resolves_per_placement_and_refuses_bad_values() -> None:
    assert cuda_memory.gather_slots_enabled("on") and not cuda_memory.gather_slots_enabled("off")
    assert cuda_memory.gather_slots_enabled("auto") == cuda_memory.active()  # off here: no CUDA
    with pytest.raises(RequestError, match="gather_slots.*'sometimes'"):
        cuda_memory.gather_slots_enabled("sometimes")


def test_load_request_names_a_bad_gather_slots_value() -> None:
    from engine.serving.protocol import ProtocolError, decode_request

    line = '{"v": 1, "type": "load", "model_dir": "/m", "options": {"gather_slots": "maybe"}}'
    with pytest.raises(ProtocolError, match="load.options.gather_slots"):
        decode_request(line)
    assert decode_request(line.replace("maybe", "auto")).options.gather_slots == "auto"
