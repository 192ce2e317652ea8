"""Public model shapes for the estimator's rough mode (``--params 7B --arch llama``).

Each entry is the part of a published config.json that decides memory (from the models' Hugging Face
pages). Rough mode takes the shape of the same architecture nearest in size, scales its weights to the
requested parameter count and keeps its KV-cache layout: good to a few percent for weights, and the
KV cache of a same-family model is the best guess there is without a config.
"""

from __future__ import annotations

import math
import re
from typing import Any

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
              torch_dtype="bfloat16")
_DEEPSEEK_V2 = dict(model_type="deepseek_v2", hidden_act="silu", torch_dtype="bfloat16", tie_word_embeddings=False,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, moe_layer_freq=1,
                    first_k_dense_replace=1, max_position_embeddings=163840, rope_theta=10000,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})

REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "Llama-3.2-3B": dict(_LLAMA, vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "Llama-2-7B": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       torch_dtype="float16"),
    "Llama-3.1-8B": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "Llama-2-13B": dict(_LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                        torch_dtype="float16"),
    "Llama-3.1-70B": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_theta=500000.0),
    "Mistral-7B": dict(_LLAMA, model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096),
    "Mixtral-8x7B": dict(_LLAMA, model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6),
    "Mixtral-8x22B": dict(_LLAMA, model_type="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                          num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8, num_local_experts=8,
                          num_experts_per_tok=2, max_position_embeddings=65536, rope_theta=1e6),
    "Qwen1.5-MoE-A2.7B": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                              num_experts_per_tok=4, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, max_position_embeddings=8192, torch_dtype="bfloat16"),
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
                          max_position_embeddings=40960, rope_theta=1e6, torch_dtype="bfloat16"),
    "OLMoE-1B-7B": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_experts=64, num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, max_position_embeddings=4096, torch_dtype="bfloat16"),
    "DeepSeek-V2-Lite": dict(_DEEPSEEK_V2, vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             q_lora_rank=None, topk_method="greedy"),
    "DeepSeek-V2": dict(_DEEPSEEK_V2, vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                        q_lora_rank=1536, topk_method="group_limited_greedy", n_group=8, topk_group=3),
    "DeepSeek-V3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4,
                        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        routed_scaling_factor=2.5, max_position_embeddings=163840, rope_theta=10000,
                        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                        tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16"),
}

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_params(text: str) -> int:
    """``7B``, ``1.5b``, ``135M``, ``671B``, ``7e9`` -> a parameter count; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgtKMBGT]?)\s*", text)
    if not m:
        raise ValueError(f"--params {text!r}: expected a count like 7B, 1.5B or 135M")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 1e6:
        raise ValueError(f"--params {text!r}: expected at least a million parameters (7B, 135M, ...)")
    return int(value)


def architectures() -> list[str]:
    return sorted({c["model_type"] for c in REFERENCE_CONFIGS.values()})


def candidates(model_type: str) -> dict[str, dict[str, Any]]:
    found = {name: c for name, c in REFERENCE_CONFIGS.items() if c["model_type"] == model_type}
    if not found:
        raise ValueError(f"--arch {model_type!r}: no reference shape; choose one of {', '.join(architectures())}")
    return found


def nearest(sizes: dict[str, int], params: int) -> str:
    """The reference whose parameter count is closest to ``params`` on a log scale."""
    return min(sizes, key=lambda name: abs(math.log(sizes[name] / params)))
