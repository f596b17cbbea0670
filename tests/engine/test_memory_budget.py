"""The automatic memory budget: cache size from this machine, the memory limit and its refusal,
one cache figure in every plan, MLX's allocator limits and figures."""

from __future__ import annotations

import dataclasses
import json
import mlx.core as mx
import pytest

from engine.cli import build_parser, engine_options
from engine.model import memory_budget as mb
from engine.model.memory_budget import GIB, MIB, MemoryLimitError, MemoryNeeds, plan_budget

NEEDS = MemoryNeeds(runtime_bytes=300 * MIB, dense_bytes=4 * GIB, kv_bytes=512 * MIB, working_bytes=700 * MIB,
                    prefill_bytes=200 * MIB)  # fmt: skip


def test_auto_splits_the_spare_ram_with_the_page_cache() -> None:
    b = plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=None, memory_limit_mb=None)  # fmt: skip
    usable = 40 * GIB + NEEDS.runtime_bytes - mb.OS_RESERVE_BYTES
    spare = usable - NEEDS.fixed_bytes
    assert b.mode == "auto"
    assert b.cache_bytes == int(mb.CACHE_SHARE_OF_SPARE * spare)
    assert b.page_cache_reserve_bytes == spare - b.cache_bytes
    assert 0 < b.page_cache_reserve_bytes < b.cache_bytes  # 75% / 25% (BENCHMARKS.md: the cgroup sweep)
    assert b.page_cache_reserve_bytes == pytest.approx(spare / 4, abs=1)
    assert "page cache" in b.reason and "spare RAM" in b.reason
    assert b.footprint_bytes == NEEDS.fixed_bytes + b.cache_bytes


def test_auto_never_exceeds_all_experts() -> None:
    b = plan_budget(needs=NEEDS, expert_bytes_total=100 * MIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=None, memory_limit_mb=None)  # fmt: skip
    assert b.cache_bytes == 100 * MIB
    assert "every expert" in b.reason


def test_on_metal_the_cache_stays_under_the_recommended_working_set() -> None:
    # 75% of the spare RAM would put MLX's buffers (11 GiB of dense weights here) above the working set
    ws = 30 * GIB
    needs = dataclasses.replace(NEEDS, dense_bytes=11 * GIB)
    b = plan_budget(needs=needs, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=44 * GIB,
                    cache_mb=None, memory_limit_mb=None, gpu_working_set_bytes=ws)  # fmt: skip
    mlx_fixed = needs.fixed_bytes - needs.runtime_bytes
    assert b.cache_bytes == ws - mlx_fixed and b.mlx_memory_limit_bytes == ws
    assert "recommended working set of 30.00 GiB" in b.reason
    uncapped = plan_budget(needs=needs, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=44 * GIB,
                           cache_mb=None, memory_limit_mb=None)  # fmt: skip
    assert uncapped.cache_bytes > b.cache_bytes
    assert b.page_cache_reserve_bytes == uncapped.page_cache_reserve_bytes + (uncapped.cache_bytes - b.cache_bytes)
    roomy = plan_budget(needs=needs, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=44 * GIB,
                        cache_mb=None, memory_limit_mb=None, gpu_working_set_bytes=100 * GIB)  # fmt: skip
    assert roomy.cache_bytes == uncapped.cache_bytes  # a working set that is not reached changes nothing
    user = plan_budget(needs=needs, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=44 * GIB,
                       cache_mb=25_000, memory_limit_mb=None, gpu_working_set_bytes=ws)  # fmt: skip
    assert user.cache_bytes == 25_000 * MIB  # the user's own size is theirs to choose


def test_recommended_working_set_is_metal_only() -> None:
    from engine.model.array_limits import recommended_working_set_bytes

    info = {"max_recommended_working_set_size": 38_654_705_664, "max_buffer_length": 28 * GIB}
    assert recommended_working_set_bytes("metal", info) == 38_654_705_664
    assert recommended_working_set_bytes("metal", {}) is None
    assert recommended_working_set_bytes("cuda", info) is None
    assert recommended_working_set_bytes("cpu", info) is None


def test_user_size_is_kept_unless_the_limit_cuts_it() -> None:
    b = plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=1024, memory_limit_mb=None)  # fmt: skip
    assert (b.mode, b.cache_bytes) == ("user", 1024 * MIB)
    limit_mb = NEEDS.fixed_bytes / MIB + 100
    b = plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=1024, memory_limit_mb=limit_mb)  # fmt: skip
    assert (b.mode, b.cache_bytes) == ("limit", 100 * MIB)
    assert b.footprint_bytes <= b.limit_bytes  # type: ignore[operator]


def test_memory_limit_caps_the_automatic_cache() -> None:
    limit_mb = NEEDS.fixed_bytes / MIB + 512
    b = plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=None, memory_limit_mb=limit_mb)  # fmt: skip
    assert b.mode == "limit" and b.cache_bytes == 512 * MIB
    assert b.footprint_bytes == int(limit_mb * MIB)
    assert b.mlx_memory_limit_bytes == b.footprint_bytes - NEEDS.runtime_bytes
    assert "memory limit" in b.reason


def test_a_dense_part_above_the_limit_is_refused_with_the_numbers() -> None:
    with pytest.raises(MemoryLimitError) as info:
        plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=None, memory_limit_mb=4096)  # fmt: skip
    text = str(info.value)
    for figure in ("--memory-limit-mb 4096", f"{NEEDS.fixed_bytes // MIB} MiB before any expert cache", "dense weights 4096 MiB", "KV cache 512 MiB",
                   "limit of 4096 MiB", "smaller model"):  # fmt: skip
        assert figure in text, text


def test_kv_bytes_count_full_attention_layers_and_linear_state() -> None:
    dense = {"num_hidden_layers": 60, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256}
    assert mb.kv_cache_bytes(dense, 1000, 2) == 60 * 2 * 2 * 256 * 1000 * 2
    hybrid = dict(dense, full_attention_interval=4, linear_num_value_heads=64, linear_num_key_heads=16,
                  linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)  # fmt: skip
    kv = mb.kv_cache_bytes({"text_config": hybrid}, 1000, 2)
    state = 45 * (64 * 128 * 128 * 4 + 4 * (2 * 16 * 128 + 64 * 128) * 2)
    assert kv == 15 * 2 * 2 * 256 * 1000 * 2 + state


def test_cli_cache_mb_auto_is_the_default_and_validated(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["generate", "m", "--prompt", "x"])
    assert engine_options(args).cache_mb is None and engine_options(args).memory_limit_mb is None
    args = build_parser().parse_args(["generate", "m", "--prompt", "x", "--cache-mb", "AUTO", "--memory-limit-mb", "900"])
    assert engine_options(args).cache_mb is None and engine_options(args).memory_limit_mb == 900
    assert build_parser().parse_args(["plan", "m", "--cache-mb", "64"]).cache_mb == 64
    for bad in (["--cache-mb", "lots"], ["--cache-mb", "-1"], ["--memory-limit-mb", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "m", "--prompt", "x", *bad])
    assert "expected 'auto' or a size in MiB, got 'lots'" in capsys.readouterr().err


def test_one_cache_size_in_the_plan_and_in_the_loaded_engine(tiny_model, capsys) -> None:  # type: ignore[no-untyped-def]
    from engine.cli import main
    from engine.engine import Engine
    from engine.types import EngineOptions

    model = tiny_model()
    assert main(["plan", str(model), "--json", "--samples", "2", "--device", "cpu"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cache_mode"] == "auto" and plan["cache_reason"]
    engine = Engine.load(model, EngineOptions(cache_mb=None, device="cpu"), measure_disk=False)
    try:
        loaded = engine.plan.to_dict()
    finally:
        engine.close()
    # the tiny model's experts all fit: both choose "every expert", the same figure
    assert plan["cache_budget_bytes"] == loaded["cache_budget_bytes"] == plan["expert_bytes_total"]
    assert plan["dense_bytes"] == loaded["dense_bytes"]  # the estimate from shapes is what loading holds
    assert plan["cache_reason"] == loaded["cache_reason"]


def test_load_refuses_a_model_above_the_limit(tiny_model, capsys) -> None:  # type: ignore[no-untyped-def]
    from engine.cli import main

    assert main(["generate", str(tiny_model()), "--prompt", "hi", "--max-tokens", "1", "--memory-limit-mb", "64"]) == 2
    err = capsys.readouterr().err
    assert "error: --memory-limit-mb 64: the model needs" in err
    assert "more than the limit of 64 MiB" in err


def test_mlx_limits_follow_the_budget() -> None:
    from engine.model.mlx_memory import apply_mlx_limits, mlx_memory

    b = plan_budget(needs=NEEDS, expert_bytes_total=200 * GIB, ram_total=48 * GIB, ram_available=40 * GIB,
                    cache_mb=None, memory_limit_mb=NEEDS.fixed_bytes / MIB + 64)  # fmt: skip
    old_limit, old_cache = apply_mlx_limits(b)
    try:
        assert mx.get_memory_limit() == b.mlx_memory_limit_bytes
        assert mx.set_cache_limit(old_cache) == mb.MLX_CACHE_LIMIT_BYTES
    finally:
        mx.set_memory_limit(old_limit)
        mx.set_cache_limit(old_cache)
    a = mx.ones((1024, 256))
    mx.eval(a)
    m = mlx_memory()
    assert m.active_bytes >= a.nbytes and m.peak_bytes >= m.active_bytes and m.cached_bytes >= 0


def test_prompt_cache_stays_within_the_kv_room_under_a_limit() -> None:
    from types import SimpleNamespace

    from engine.serving.service import prompt_cache_bound

    limited = SimpleNamespace(plan=SimpleNamespace(memory_limit_bytes=2**30, budget={"needs": {"kv_bytes": 64 * MIB}}))
    assert prompt_cache_bound(limited, 1024) == 64 * MIB  # type: ignore[arg-type]
    assert prompt_cache_bound(limited, 16) == 16 * MIB  # type: ignore[arg-type]
    free = SimpleNamespace(plan=SimpleNamespace(memory_limit_bytes=None, budget={"needs": {"kv_bytes": 64 * MIB}}))
    assert prompt_cache_bound(free, 1024) == 1024 * MIB  # type: ignore[arg-type]


def test_shard_files_count_for_the_open_files_limit(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from engine.model.loader import _shard_files, inspect_experts

    layers = inspect_experts(tiny_model("qwen3_moe", 4, max_shard_bytes=200_000)).layers
    files = {s.file for l in layers for s in l.sources}
    assert _shard_files(layers) == len(files) > 1


def test_a_prefill_pass_fits_what_the_budget_set_aside_under_a_limit(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Under --memory-limit-mb a layer-major pass is sized from the budget's prefill share, not RAM/8."""
    from engine.engine import Engine
    from engine.model.layer_prefill import pass_shape, pass_tokens
    from engine.types import EngineOptions

    from engine.platform_info import process_rss_bytes

    model = tiny_model("qwen3_moe", 4)
    limit_mb = process_rss_bytes() / 2**20 + 1024  # the budget counts this process's memory so far
    engine = Engine.load(model, EngineOptions(cache_mb=None, memory_limit_mb=limit_mb, context_tokens=4096),
                         measure_disk=False)
    try:
        needs = engine._loaded.budget.needs
        shape = pass_shape(engine.config, engine.experts_per_token, 4)
        expected = pass_tokens(shape, needs.prefill_bytes, engine.context_length or 32768, True,
                               engine.options.prefill_chunk)
        assert engine.layer_major_prefill and engine.prefill_pass_tokens == expected
    finally:
        engine.close()


def test_as_one_of_several_ranks_every_expert_means_this_ranks_share(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from engine.model.loader import inspect_experts, memory_budget_for
    from engine.types import EngineOptions

    inspected = inspect_experts(tiny_model())
    alone = memory_budget_for(inspected, EngineOptions(cache_mb=None), "cpu")
    two = memory_budget_for(inspected, EngineOptions(cache_mb=None), "cpu", ranks=2)
    three = memory_budget_for(inspected, EngineOptions(cache_mb=None), "cpu", ranks=3)
    assert "every expert" in alone.reason and "every expert" in two.reason  # the tiny model fits either way
    assert two.cache_bytes * 2 == alone.cache_bytes  # an even expert count: exactly half
    per_layer = [l.num_experts for l in inspected.layers]
    assert three.cache_bytes == alone.cache_bytes * sum(-(-n // 3) for n in per_layer) // sum(per_layer)


def test_ranks_in_environment_reads_the_hostfile_or_the_rdma_devices(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from engine.model.expert_parallel import ExpertParallel

    for var in ("MLX_RANK", "JACCL_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "JACCL_IBV_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    assert ExpertParallel.ranks_in_environment() == 1
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5001"], ["127.0.0.1:5002"], ["127.0.0.1:5003"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    assert ExpertParallel.ranks_in_environment() == 1  # a hostfile without a rank: not started as a rank
    monkeypatch.setenv("MLX_RANK", "1")
    assert ExpertParallel.ranks_in_environment() == 3
    monkeypatch.delenv("MLX_HOSTFILE")
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([[None, "rdma_en2"], ["rdma_en2", None]]))
    monkeypatch.setenv("MLX_IBV_DEVICES", str(devices))
    assert ExpertParallel.ranks_in_environment() == 2
    devices.write_text("not json")
    assert ExpertParallel.ranks_in_environment() == 1  # reported when joining, not here
