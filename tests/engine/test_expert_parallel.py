"""Expert parallelism over mlx.distributed (ring backend on loopback ranks): exact and never hung.

Each rank is a real process (tests/engine/rank_worker.py) joined by mlx.distributed's ring
backend through a hostfile of free 127.0.0.1 ports; per-rank logs are shown when a case fails.
Every rank's greedy tokens must equal mlx-lm's on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.diagnostics.ranks_bench import loopback_hostfile
from engine.model.expert_parallel import DistributedSetupError, hosts_from_file
from exactness import mlx_lm_reference

HERE = Path(__file__).resolve().parent
WORKER = HERE / "rank_worker.py"
PROMPT = [(i * 7919) % 5000 + 100 for i in range(40)]
TOKENS = 16


def _hostfile(tmp: Path, ranks: int) -> Path:
    return loopback_hostfile(tmp / "hosts.json", ranks)


def _env(rank: int | None, hostfile: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    if rank is not None and hostfile is not None:
        env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
    env.update(extra)
    return env


def run_ranks(model: Path | list[Path], tmp: Path, ranks: int, *, per_rank_args: dict[int, list[str]] | None = None,
              timeout: float = 420, **extra_env: str) -> list[tuple[int, dict[str, Any] | None, str]]:
    """Start ``ranks`` workers (rank r on ``model``, or on ``model[r]`` when a list is given);
    return (exit code, result or None, log) per rank."""
    models = model if isinstance(model, list) else [model] * ranks
    hostfile = _hostfile(tmp, ranks)
    procs = []
    for r in range(ranks):
        out = tmp / f"rank{r}.json"
        log = open(tmp / f"rank{r}.log", "w")
        args = [sys.executable, str(WORKER), str(models[r]), str(out), "--prompt", ",".join(map(str, PROMPT)),
                "--max-tokens", str(TOKENS), *(per_rank_args or {}).get(r, [])]
        procs.append((subprocess.Popen(args, env=_env(r, hostfile, **extra_env), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=HERE), out, log))
    results = []
    deadline = time.monotonic() + timeout
    for proc, out, log in procs:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _, _ in procs:
                p.kill()
            code = -9
        log.close()
        text = Path(log.name).read_text()
        results.append((code, json.loads(out.read_text()) if out.exists() else None, text))
    return results


def _logs(results: list[tuple[int, Any, str]]) -> str:
    return "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-2000:]}" for r, (c, _, log) in enumerate(results))


def assert_ranks_match(results: list[tuple[int, Any, str]], reference: list[int]) -> None:
    assert all(code == 0 for code, _, _ in results), _logs(results)
    for r, (_, res, _) in enumerate(results):
        assert res["rank"] == r and res["ranks"] == len(results)
        assert res["tokens"] == reference, f"rank {r}: {res['tokens']} != mlx-lm {reference}"
        assert res["collectives"] > 0


@pytest.mark.parametrize(("model_type", "bits", "ranks"), [
    ("qwen3_moe", 4, 2), ("qwen3_next", 4, 2), ("qwen3_5_moe", 4, 2),
    ("qwen3_moe", 8, 2), ("qwen3_next", 8, 2), ("qwen3_5_moe", 8, 2),
    ("qwen3_moe", 8, 4), ("qwen3_next", 4, 4), ("qwen3_5_moe", 8, 4),
])
def test_ranks_give_mlx_lm_tokens(tiny_model: Any, tmp_path: Path, model_type: str, bits: int, ranks: int) -> None:
    model = tiny_model(model_type, bits)
    reference = mlx_lm_reference(model, PROMPT, TOKENS)
    results = run_ranks(model, tmp_path, ranks)
    assert_ranks_match(results, reference)
    # each rank read only its own experts: together about what one process reads, each less
    alone = [res["bytes_read"] for _, res, _ in results]
    assert all(b > 0 for b in alone)


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "bits", "ranks"), [("qwen3_moe", 4, 4), ("qwen3_next", 8, 4), ("qwen3_5_moe", 4, 4)])
def test_ranks_give_mlx_lm_tokens_more(tiny_model: Any, tmp_path: Path, model_type: str, bits: int, ranks: int) -> None:
    model = tiny_model(model_type, bits)
    assert_ranks_match(run_ranks(model, tmp_path, ranks), mlx_lm_reference(model, PROMPT, TOKENS))


def test_a_cache_on_each_rank_stays_exact(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)
    reference = mlx_lm_reference(model, PROMPT, TOKENS)
    results = run_ranks(model, tmp_path, 2, per_rank_args={0: ["--cache-mb", "0.05"], 1: ["--cache-mb", "1000"]})
    assert_ranks_match(results, reference)


def test_sampling_without_a_seed_still_agrees(tiny_model: Any, tmp_path: Path) -> None:
    """Each process has its own random state; the ranks take rank 0's token, so they never split."""
    model = tiny_model("qwen3_moe", 4)
    results = run_ranks(model, tmp_path, 2, per_rank_args={0: ["--temp", "1.5"], 1: ["--temp", "1.5"]})
    assert all(code == 0 for code, _, _ in results), _logs(results)
    assert results[0][1]["tokens"] == results[1][1]["tokens"]


def test_ranks_on_different_options_are_refused_by_name(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)
    results = run_ranks(model, tmp_path, 2, per_rank_args={1: ["--experts-per-token", "1"]}, timeout=300)
    assert [code for code, _, _ in results] == [2, 2], _logs(results)
    assert "rank 1 was started on another model or other options than rank 0" in results[0][2]
    assert "this rank was started on another model or other options than rank 0" in results[1][2]


def test_a_dead_peer_ends_the_other_rank_with_a_named_error(tiny_model: Any, tmp_path: Path) -> None:
    """Rank 1 never starts: rank 0 gives up connecting after the collective timeout, naming the hosts."""
    model = tiny_model("qwen3_moe", 4)
    hostfile = _hostfile(tmp_path, 2)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(model), str(tmp_path / "r0.json"), "--prompt", "1,2,3"],
        env=_env(0, hostfile, MOEBAR_COLLECTIVE_TIMEOUT_S="5"), capture_output=True, text=True, timeout=120, cwd=HERE,
    )
    assert proc.returncode != 0
    assert "rank 0: connecting to the other ranks (127.0.0.1:" in proc.stderr
    assert "a peer rank died or cannot be reached" in proc.stderr
    assert "Timeout" in proc.stderr or "no answer within 5 s" in proc.stderr  # ended by the watchdog


def test_a_peer_that_dies_mid_generation_ends_the_others_with_a_named_error(tiny_model: Any, tmp_path: Path) -> None:
    """Rank 1 is killed during its generation: rank 0 stops with peer_lost naming itself, no hang."""
    model = tiny_model("qwen3_moe", 4)
    results = run_ranks(model, tmp_path, 2, per_rank_args={1: ["--die-after", "3"], 0: ["--max-tokens", "200"]},
                        timeout=300, MOEBAR_COLLECTIVE_TIMEOUT_S="30")
    assert results[1][0] == -9, _logs(results)  # killed
    assert results[0][0] == 2, _logs(results)
    assert "error: rank 0 of 2:" in results[0][2] and "another rank stopped" in results[0][2]


@pytest.mark.parametrize(("text", "problem"), [
    ("[[\"127.0.0.1:5000\"], ", "not JSON (line 1"),
    ("{\"a\": 1}", "expected a JSON list with one entry per rank"),
    ("[[\"127.0.0.1:5000\"], [\"127.0.0.1\"]]", "rank 1: '127.0.0.1' is not host:port"),
    ("[[\"127.0.0.1:5000\"], [\"host:99999\"]]", "rank 1: 'host:99999' is not host:port"),
    ("[[\"127.0.0.1:5000\"], [3]]", "rank 1: expected a list of \"host:port\" strings"),
])
def test_a_bad_hostfile_is_refused_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(text)
    with pytest.raises(DistributedSetupError) as err:
        hosts_from_file(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_a_good_hostfile_lists_each_rank(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([["10.0.0.1:5000", "10.0.1.1:5000"], "mac2.local:5001"]))
    assert hosts_from_file(path) == ["10.0.0.1:5000", "mac2.local:5001"]


def test_bench_ranks_reports_the_collectives_of_a_token(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe", 4)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench-ranks", "--ranks", "2", "--hidden", "64", "--k", "4",
         "--layers", "3", "--prefill-tokens", "8", "--repeats", "5", "--json", "--model", str(model),
         "--decode-tokens", "4"],
        env=_env(None, None), capture_output=True, text=True, timeout=300, cwd=HERE.parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ranks"] == 2 and report["payload_bytes_per_layer"] == 4 * 64 * 2
    assert len(report["per_rank_layer_all_sum_ms"]) == 2
    assert report["per_token_ms"] == pytest.approx(report["layer_all_sum_ms"] * 3 + report["token_agree_ms"])
    assert report["same_tokens"] is True  # the side-by-side decode: ranks and one process agree
    assert report["decode"]["collectives_per_token"] > 1 and report["single_process_decode"]["collectives_per_token"] == 0
    # the engine's combination side by side: an 8-token pass sends fewer bytes as owned rows
    old, new = report["combine"]["prefill_all_sum"], report["combine"]["prefill_auto"]
    assert old["bytes_sent"] == 8 * 4 * 64 * 2 and 0 < new["bytes_sent"] < old["bytes_sent"]
    assert new["gathered_fraction"] == 1.0 and old["gathered_fraction"] == 0.0 and new["ms"] > 0


def _turns(proc: Any, model: Path) -> list[str]:
    """Load, two turns of one conversation (the second reuses the prompt cache), a stopped turn, a repeat."""
    from engine.serving.protocol import DoneEvent, ErrorEvent, LoadedEvent, TokenTextEvent

    def chat(rid: str, messages: list[dict[str, str]], max_tokens: int = 12) -> tuple[str, str]:
        proc.send({"type": "chat", "id": rid, "messages": messages,
                   "sampling": {"temperature": 0.0, "max_tokens": max_tokens}})
        events = proc.events.until(lambda e: isinstance(e, DoneEvent) and e.id == rid, timeout=300)
        text = "".join(e.text for e in events if isinstance(e, TokenTextEvent) and e.id == rid)
        return text, events[-1].finish_reason

    proc.events.next(timeout=120)  # hello
    proc.send({"type": "load", "model_dir": str(model), "options": {"cache_mb": 0}})
    loading = proc.events.until(lambda e: isinstance(e, (LoadedEvent, ErrorEvent)), timeout=300)
    assert isinstance(loading[-1], LoadedEvent), loading[-1]
    first = [{"role": "user", "content": "Tell me about the sea and the ships"}]
    a1, _ = chat("t1", first)
    a2, _ = chat("t2", [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": "And then?"}])
    proc.send({"type": "chat", "id": "t3", "messages": [{"role": "user", "content": "Count to a thousand"}],
               "sampling": {"temperature": 0.0, "max_tokens": 400}})
    proc.events.until(lambda e: isinstance(e, TokenTextEvent) and e.id == "t3", timeout=300)
    proc.send({"type": "cancel", "id": "t3"})
    done3 = proc.events.until(lambda e: isinstance(e, DoneEvent) and e.id == "t3", timeout=300)[-1]
    a4, _ = chat("t4", first)
    return [a1, a2, done3.finish_reason, a4]


def test_the_app_engine_serves_from_two_ranks(tiny_model: Any, tmp_path: Path) -> None:
    """`moebar-engine stdio` as rank 0 with a follower rank: the same answers as one process, stop included."""
    from stdio_harness import ROOT, Subprocess

    model = tiny_model("qwen3_next", 4)  # linear attention: the prompt cache keeps state snapshots
    alone = Subprocess(env=_env(None, None))
    try:
        expected = _turns(alone, model)
    finally:
        alone.proc.stdin.close()
        alone.proc.wait(timeout=120)
    assert expected[2] == "cancelled" and expected[0] and expected[0] == expected[3]

    hostfile = _hostfile(tmp_path, 2)
    log = open(tmp_path / "rank1.log", "w")
    follower = subprocess.Popen([sys.executable, "-m", "engine.serving.stdio_server"], env=dict(_env(1, hostfile),
                                PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(ROOT))
    leader = Subprocess(env=_env(0, hostfile))
    try:
        got = _turns(leader, model)
        leader.proc.stdin.close()  # end of input: rank 0 unloads, then tells rank 1 to stop
        assert leader.proc.wait(timeout=120) == 0
        assert follower.wait(timeout=120) == 0
    finally:
        for p in (leader.proc, follower):
            if p.poll() is None:
                p.kill()
        log.close()
    assert got == expected, (tmp_path / "rank1.log").read_text()[-3000:] + "".join(leader.stderr)[-3000:]


def test_a_follower_lost_mid_answer_is_a_named_error_from_the_app_engine(tiny_model: Any, tmp_path: Path) -> None:
    from stdio_harness import ROOT, Subprocess

    from engine.serving.protocol import DoneEvent, ErrorEvent, LoadedEvent, TokenTextEvent

    model = tiny_model("qwen3_moe", 4)
    hostfile = _hostfile(tmp_path, 2)
    follower = subprocess.Popen([sys.executable, "-m", "engine.serving.stdio_server"],
                                env=dict(_env(1, hostfile), PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
    leader = Subprocess(env=_env(0, hostfile, MOEBAR_COLLECTIVE_TIMEOUT_S="60"))
    try:
        leader.events.next(timeout=120)
        leader.send({"type": "load", "model_dir": str(model), "options": {"cache_mb": 0}})
        loaded = leader.events.until(lambda e: isinstance(e, (LoadedEvent, ErrorEvent)), timeout=300)[-1]
        assert isinstance(loaded, LoadedEvent) and loaded.ranks == 2  # the app's host states read it
        leader.send({"type": "chat", "id": "x", "messages": [{"role": "user", "content": "Count to a thousand"}],
                     "sampling": {"temperature": 0.0, "max_tokens": 400}})
        leader.events.until(lambda e: isinstance(e, TokenTextEvent) and e.id == "x", timeout=300)
        follower.kill()
        events = leader.events.until(lambda e: isinstance(e, DoneEvent) and e.id == "x", timeout=200)
        errors = [e for e in events if isinstance(e, ErrorEvent)]
        assert errors and errors[0].code == "peer_lost" and not errors[0].usable, events[-5:]
        assert "rank 0 of 2" in errors[0].message and "another rank stopped" in errors[0].message
        assert events[-1].finish_reason == "error"
    finally:
        for p in (leader.proc, follower):
            if p.poll() is None:
                p.kill()


def test_projection_uses_the_busiest_rank_and_the_link() -> None:
    from engine.diagnostics.ranks_bench import busiest_rank_experts, project_decode

    assert busiest_rank_experts(1, 512, 10) == 10.0
    two, four = busiest_rank_experts(2, 512, 10), busiest_rank_experts(4, 512, 10)
    assert 6.0 < two < 6.5 and 4.0 < four < 4.4  # DESIGN.md: the busiest of two reads ~6.2 of 10
    one = project_decode(1, experts=512, k=10, layers=60, expert_bytes=7_077_888, disk_bytes_per_s=5.5e9,
                         hit_rate=0.0, link_ms_per_layer=0.15)
    assert one["read_s"] == pytest.approx(60 * 10 * 7_077_888 / 5.5e9) and one["link_s"] == 0.0
    pair = project_decode(2, experts=512, k=10, layers=60, expert_bytes=7_077_888, disk_bytes_per_s=5.5e9,
                          hit_rate=0.3, link_ms_per_layer=0.15)
    assert pair["read_s"] == pytest.approx(60 * two * 0.7 * 7_077_888 / 5.5e9)
    assert pair["link_s"] == pytest.approx(61 * 0.15e-3)
