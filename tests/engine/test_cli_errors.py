"""Bad model directories: the CLI exits non-zero with one clear line naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.storage.pack import pack_model
from engine.storage.packed_layout import PACKED_DIRNAME, open_packed_layout
from engine.model.loader import inspect_experts


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300
    )


def _generate(model: Path) -> subprocess.CompletedProcess[str]:
    return _run("generate", str(model), "--prompt", "hello", "--max-tokens", "4")


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture()
def model_copy(tiny_model, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4, max_shard_bytes=4 * 2**20), dst)
    return dst


def _edit_config(model: Path, **changes: object) -> None:
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_shard(model_copy: Path) -> None:
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "the fixture must be sharded"
    (model_copy / shards[-1]).unlink()
    _assert_one_line_error(_generate(model_copy), shards[-1], "missing")


def test_truncated_shard(model_copy: Path) -> None:
    shard = sorted(model_copy.glob("model*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    _assert_one_line_error(_generate(model_copy), shard.name, "truncated")


def test_checksum_mismatch(model_copy: Path) -> None:
    pack_model(model_copy)
    layers = inspect_experts(model_copy).layers
    packed = open_packed_layout(model_copy, layers)
    assert packed is not None
    with open(packed[0].file, "r+b") as f:  # damage every expert of layer 0
        for e in range(layers[0].num_experts):
            f.seek(packed[0].blob_offset(e) + 7)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x55]))
    _assert_one_line_error(_generate(model_copy), "checksum mismatch", "layer 0 expert", PACKED_DIRNAME)


def test_unknown_model_type(model_copy: Path) -> None:
    _edit_config(model_copy, model_type="not_a_real_arch")
    _assert_one_line_error(_generate(model_copy), "not_a_real_arch", "config.json")


def test_wrong_model_type(model_copy: Path) -> None:
    _edit_config(model_copy, model_type="qwen3")  # a known dense family: the MoE tensors are not in it
    proc = _generate(model_copy)
    _assert_one_line_error(proc, "config.json", "model_type 'qwen3' does not match the weights")
    assert "model.layers.1." not in proc.stderr  # one example tensor, not the whole list


def test_config_disagrees_with_tensor_shapes(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    _edit_config(model_copy, moe_intermediate_size=cfg["moe_intermediate_size"] * 2)
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())["weight_map"]
    tensor = "model.layers.0.mlp.switch_mlp.gate_proj.weight"
    _assert_one_line_error(_generate(model_copy), "config.json", tensor, f"weights in {index[tensor]}")


def test_empty_tokenizer(model_copy: Path) -> None:
    path = model_copy / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"], tokenizer["model"]["merges"] = {}, []  # well-formed, encodes to nothing
    path.write_text(json.dumps(tokenizer))
    _assert_one_line_error(_generate(model_copy), str(model_copy), "tokenizer is empty")


def test_no_tokenizer_files(model_copy: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    _assert_one_line_error(_generate(model_copy), "tokenizer")


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    _assert_one_line_error(_generate(model_copy), "config.json not found")


def test_model_without_moe_layers(tiny_model, tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model

    src = tiny_model("qwen3_moe", 4)
    cfg = dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=4096,
    )
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.float32)
    out = tmp_path / "dense"
    save_model(out, model)
    save_config(cfg, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    _assert_one_line_error(_generate(out), "no MoE layers")


def test_generate_json_output(tiny_model) -> None:
    proc = _run("generate", str(tiny_model("qwen3_moe", 4)), "--prompt", "hi", "--max-tokens", "5", "--json", "--chat")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in proc.stdout.splitlines()]
    tokens, stats = lines[:-1], lines[-1]["stats"]
    assert 1 <= len(tokens) <= 5 and all(set(t) == {"token", "text"} for t in tokens)
    assert stats["generated_tokens"] == len(tokens)
    assert stats["prompt_tokens"] > 5  # the chat template wrapped the prompt
    for key in ("prompt_tps", "decode_tps", "ttft_s", "bytes_read", "cache_hit_rate"):
        assert key in stats
    assert {"bytes_read", "cache_hits", "cache_misses", "io_wait_s", "sync_s", "compute_s"} <= set(stats["decode"])


def test_plan_json(tiny_model) -> None:
    proc = _run("plan", str(tiny_model("qwen3_moe", 4)), "--json", "--samples", "8")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["expert_bytes_per_token"] == plan["moe_layers"] * plan["experts_per_token"] * plan["expert_bytes"]
    assert plan["disk_read_bytes_per_s"] > 0 and plan["tps_bound_cold"] > 0
    assert plan["dense_bytes"] > 0 and plan["ram_available_bytes"] > 0
