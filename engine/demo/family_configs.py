"""Tiny random configs for every MoE family of the installed mlx-lm, built from its ``ModelArgs``.

``moe_families()`` lists the model types whose module reaches ``mlx_lm.models.switch_layers``
(read from the installed package's imports, not a list kept here). ``tiny_config(family)`` fills
each field of that family's ``ModelArgs`` by what its name means (a hidden size, an expert
count, a K, a head size...) with small values, then applies the few family hints a name cannot
tell (which layers are MoE in a layer-pattern list, a nested ``text_config``'s own type).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx_lm.models

from engine.errors import UnsupportedModelError

TINY_VOCAB = 1024  # token ids below this decode with any of the demo tokenizers
TINY_LAYERS = 3
TINY_EXPERTS = 8
TINY_K = 2

# Field name -> small value, by what the name means across mlx-lm's families.
_BY_NAME: dict[str, Any] = {
    # sizes
    "hidden_size": 64, "model_dim": 64, "dim": 64,
    # multiples of 64 (the affine group size) so that every projection is quantized
    "intermediate_size": 128, "ffn_hidden_size": 128, "shared_intermediate_size": 64,
    "moe_intermediate_size": 64, "expert_ffn_hidden_size": 64, "shared_expert_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64, "share_expert_dim": 64, "moe_latent_size": None,
    "num_hidden_layers": TINY_LAYERS, "num_layers": TINY_LAYERS,
    "num_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "num_attention_groups": 2,
    "head_dim": 16, "swa_head_dim": 16, "swa_v_head_dim": 16, "global_head_dim": 32,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "num_global_key_value_heads": 2,
    "vocab_size": TINY_VOCAB, "num_vocab": TINY_VOCAB, "vocab_size_per_layer_input": TINY_VOCAB,
    "hidden_size_per_layer_input": 16,
    "max_position_embeddings": 4096, "model_max_length": 4096, "original_max_position_embeddings": 4096,
    # experts
    "num_experts": TINY_EXPERTS, "n_routed_experts": TINY_EXPERTS, "num_local_experts": TINY_EXPERTS,
    "moe_num_experts": TINY_EXPERTS,
    "num_experts_per_tok": TINY_K, "num_experts_per_token": TINY_K, "moe_topk": TINY_K, "moe_k": TINY_K,
    "moe_top_k": TINY_K, "top_k_experts": TINY_K, "experts_per_token": TINY_K,
    "n_shared_experts": 1, "num_shared_experts": 1, "num_shared_expert": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "moe_layer_freq": 1, "decoder_sparse_step": 1,
    "moe_layer_start_index": 1, "moe_layer_interval": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "zero_expert_num": 0,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "o_lora_rank": 16, "o_groups": 2,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 16,
    # linear attention / state space
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_n_groups": 1,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "conv_kernel": 4, "n_groups": 1,
    "mamba_expand": 2, "mamba_dt_rank": 4, "conv_L_cache": 3, "layer_group_size": 2, "group_norm_size": 1,
    # numbers that only need to be sane
    "rms_norm_eps": 1e-6, "norm_eps": 1e-6, "layernorm_epsilon": 1e-6, "layer_norm_epsilon": 1e-6,
    "rope_theta": 10000.0, "swa_rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rotary_dim": 16,
    "sliding_window": 8, "sliding_window_size": 8, "attention_chunk_size": 16,
    "logits_scaling": 1.0, "attention_multiplier": 0.25, "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
    "tie_word_embeddings": False, "rope_scaling": None, "rope_parameters": None,
    "attention_bias": False, "use_bias": False, "mlp_bias": False, "use_qkv_bias": False,
    "use_qk_norm": False, "mamba_proj_bias": False, "use_conv_bias": True, "mamba_conv_bias": True,
    "conv_bias": False, "use_expert_bias": True, "use_mixed_mlp_moe": True, "use_cla": False,
    "cla_share_factor": 1, "final_logit_softcapping": None, "num_kv_shared_layers": 0,
    "num_nextn_predict_layers": 0,
}  # fmt: skip

# What a field's name cannot tell: per family (module name), applied after the name rules.
_HINTS: dict[str, dict[str, Any]] = {
    "afmoe": {"layer_types": ["sliding_attention", "full_attention", "full_attention"], "mup_enabled": False},
    "exaone_moe": {"layer_types": ["sliding_attention", "full_attention", "full_attention"],
                   "is_moe_layer": [False, True, True]},
    "gemma4_text": {"enable_moe_block": True, "sliding_window_pattern": 2},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba"], "shared_intermediate_size": 64},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2,
              "num_hidden_layers": 4},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "mellum": {"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
    "mimo_v2_flash": {"hybrid_layer_pattern": [1, 0, 1], "moe_layer_freq": [0, 1, 1],
                      "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
                      "topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "nemotron_h": {"hybrid_override_pattern": ["M", "E", "*", "E"], "num_hidden_layers": 4,
                   "n_routed_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_K},
    "step3p5": {"moe_layers_enum": "1,2", "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
    "longcat_flash": {"attention_method": "MLA", "zero_expert_type": "identity", "zero_expert_num": 2},
    "longcat_flash_ngram": {"zero_expert_num": 2},
    "glm_moe_dsa": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "rope_parameters": {"rope_theta": 10000.0}},
    "glm4_moe": {"partial_rotary_factor": 0.5},
    "kimi_linear": {"linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2],
                                           "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4}},
    "ernie4_5_moe": {"moe_capacity": [TINY_EXPERTS, TINY_EXPERTS, TINY_EXPERTS]},
    "deepseek_v41": {"head_dim": 32, "qk_rope_head_dim": 8},
    "deepseek_v2": {"rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0}},
    "hunyuan": {"rope_scaling": {"alpha": 1.0, "type": "dynamic", "factor": 1.0}, "moe_intermediate_size": 64},
    "minimax_m3_vl": {"moe_layer_freq": [0, 1, 1], "dense_intermediate_size": 128, "rotary_dim": 8},
    "mellum": {"layer_types": ["sliding_attention", "full_attention", "full_attention"],
               "rope_parameters": {"full_attention": {"rope_theta": 10000.0},
                                   "sliding_attention": {"rope_theta": 10000.0}}},
    "mistral4": {"rope_parameters": {"rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                     "original_max_position_embeddings": 4096}},
    "kimi_k3": {"linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2],
                                       "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
                "num_experts": TINY_EXPERTS, "first_k_dense_replace": 1},
    "llama4": {"num_experts_per_tok": 1, "num_hidden_layers": 4, "attention_chunk_size": 16, "interleave_moe_layer_step": 1, "intermediate_size_mlp": 128},
    "muse_spark": {"post_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0},
                   "layer_rope_theta": [10000.0] * TINY_LAYERS,
                   "layer_types": ["full_attention"] * TINY_LAYERS, "final_logit_softcapping": 30.0,
                   "output_multiplier": 1.0, "moe_hidden_size": 64, "num_shared_experts": 0},
}  # fmt: skip

# Nested families' own additions: (top-level fields, text_config fields). A Hadamard pack (prism)
# fixes its quantization (2-bit affine, group 128: widths in multiples of 128) and lists the
# packed modules it replaces (block 0: no rotation, the smallest block mlx-lm accepts is 512).
_NESTED_HINTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "prism_hadamard_qwen35": (
        {"schema_version": 1, "tensor_namespace": "mlx-lm-text", "gdn_activation_layout": "grouped",
         "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
         "modules": [{"path": "model.layers.0.mlp.shared_expert.down_proj", "embedding": False,
                      "dtype": "float16", "block": 0}]},
        {"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128,
         "shared_expert_intermediate_size": 128, "head_dim": 32, "linear_key_head_dim": 32,
         "linear_value_head_dim": 32},
    ),
}  # fmt: skip

# Families whose language model sits in a nested ``text_config`` built by another module's args.
_TEXT_FAMILY: dict[str, str] = {
    "gemma4": "gemma4_text", "kimi_k25": "deepseek_v3", "kimi_vl": "deepseek_v3", "mistral3": "mistral4",
    "qwen3_5": "qwen3_next", "kimi_k3": "kimi_linear", "qwen3_5_moe": "qwen3_next", "qwen3_vl_moe": "qwen3_moe",
    "minimax_m3_vl": "minimax", "muse_spark": "muse_spark", "llama4": "llama4",
    "prism_hadamard_qwen35": "qwen3_next",
}  # fmt: skip


def models_dir() -> Path:
    """The installed mlx-lm's ``models`` package directory."""
    return Path(mlx_lm.models.__file__).parent


@lru_cache(maxsize=1)
def moe_families() -> tuple[str, ...]:
    """Model modules of the installed mlx-lm whose imports reach ``switch_layers`` (sorted)."""
    imports: dict[str, set[str]] = {}
    for path in models_dir().glob("*.py"):
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    names.add(node.module.split(".")[0])
                else:
                    names.update(alias.name for alias in node.names)
        imports[path.stem] = names

    def reaches(name: str, seen: set[str]) -> bool:
        if name == "switch_layers":
            return True
        if name in seen:
            return False
        seen.add(name)
        return any(reaches(dep, seen) for dep in imports.get(name, ()))

    return tuple(sorted(n for n in imports if n != "switch_layers" and reaches(n, set())))


def _args_class(module_name: str) -> Any:
    try:
        return importlib.import_module(f"mlx_lm.models.{module_name}").ModelArgs
    except (ImportError, AttributeError) as e:
        raise UnsupportedModelError(f"mlx-lm has no ModelArgs for {module_name!r}") from e


def _fill(args_class: Any, hints: dict[str, Any]) -> dict[str, Any]:
    """A flat config for one ``ModelArgs`` class: every field its name (or a hint) sizes."""
    config: dict[str, Any] = {}
    for field in dataclasses.fields(args_class):
        if field.name in _BY_NAME:
            config[field.name] = _BY_NAME[field.name]
    config.update(hints)
    return config


def _text_args_class(family: str) -> tuple[Any, str] | None:
    """(args class, hint family) of a family's nested ``text_config``, or None when flat."""
    fields = {f.name for f in dataclasses.fields(_args_class(family))}
    if "text_config" not in fields:
        return None
    module = importlib.import_module(f"mlx_lm.models.{family}")
    for name in ("TextArgs", "TextModelArgs", "TextConfig"):
        if hasattr(module, name):
            return getattr(module, name), family
    inner = _TEXT_FAMILY.get(family)
    if inner is None:
        raise UnsupportedModelError(f"{family}: no tiny text_config known for this family")
    return _args_class(inner), inner


def tiny_config(family: str) -> dict[str, Any]:
    """A tiny config.json dict (unquantized) for ``family``, a module of ``moe_families()``."""
    if family not in moe_families():
        raise UnsupportedModelError(f"{family!r} is not an MoE family of the installed mlx-lm")
    text_args = _text_args_class(family)
    if text_args is None:
        return {"model_type": family, **_fill(_args_class(family), _HINTS.get(family, {}))}
    args_class, hint_family = text_args
    text = {"model_type": _TEXT_FAMILY.get(family, hint_family), **_fill(args_class, _HINTS.get(hint_family, {}))}
    if family in ("qwen3_5_moe", "prism_hadamard_qwen35"):
        text["model_type"] = "qwen3_5_moe_text"
    outer, inner = _NESTED_HINTS.get(family, ({}, {}))
    text.update(inner)
    config: dict[str, Any] = {"model_type": family, "text_config": text, "tie_word_embeddings": False, **outer}
    if family == "gemma4":
        config["vocab_size"] = TINY_VOCAB
    return config


def missing_fields(config: dict[str, Any]) -> list[str]:
    """Required ``ModelArgs`` fields that ``config`` leaves unset (for a clear build error)."""
    from mlx_lm.utils import _get_classes

    _, args_class = _get_classes(config)
    return [
        f.name
        for f in dataclasses.fields(args_class)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in config
    ]
