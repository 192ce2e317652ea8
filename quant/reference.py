"""Public model shapes for the estimator's rough mode (``--params 7B --arch llama``).

Each entry is the part of a published config.json that decides memory (read from the models' Hugging Face
pages: meta-llama, Qwen, mistralai, google, deepseek-ai, allenai). Rough mode takes the shape of the same
family nearest in size, scales its weights to the requested parameter count and keeps its KV-cache layout:
good to a few percent for weights, and the KV cache of a same-family model is the best guess there is
without a config.

Families edge-llm has no runtime architecture for (Qwen2.5 and Qwen3 dense, Gemma 2) are written as the
Llama shape with the same tensors: their memory is that of the Llama tensors plus a few vectors (Qwen's
q/k norms, Gemma's extra norms), well under 0.1% of the weights; ``STAND_INS`` says what each leaves out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
              torch_dtype="bfloat16")
_LLAMA3 = dict(_LLAMA, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
               num_key_value_heads=8)
_LLAMA2 = dict(_LLAMA, vocab_size=32000, max_position_embeddings=4096, torch_dtype="float16")
# Qwen2.5: q/k/v biases (Llama's attention_bias adds o_proj's too: one vector per layer)
_QWEN2 = dict(_LLAMA, attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
              vocab_size=152064)
_QWEN2_SMALL = dict(_QWEN2, vocab_size=151936, tie_word_embeddings=True)
_QWEN3 = dict(_LLAMA, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
              vocab_size=151936, num_key_value_heads=8)
_MISTRAL = dict(_LLAMA, model_type="mistral", num_key_value_heads=8, rope_theta=1e6)
_GEMMA2 = dict(_LLAMA, hidden_act="gelu_pytorch_tanh", head_dim=256, rms_norm_eps=1e-6, vocab_size=256000,
               tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=10000.0)
_MIXTRAL = dict(_LLAMA, model_type="mixtral", num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                rope_theta=1e6)
_DEEPSEEK_V2 = dict(model_type="deepseek_v2", hidden_act="silu", torch_dtype="bfloat16", tie_word_embeddings=False,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, moe_layer_freq=1,
                    first_k_dense_replace=1, max_position_embeddings=163840, rope_theta=10000,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=151936, num_experts=128, num_experts_per_tok=8, head_dim=128,
                  num_key_value_heads=4, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6,
                  torch_dtype="bfloat16")


@dataclass(frozen=True)
class Reference:
    name: str
    family: str  # what --arch names
    config: dict[str, Any]


def _shape(base: dict[str, Any], hidden: int, intermediate: int, layers: int, heads: int,
           **fields: Any) -> dict[str, Any]:
    """A config of the family ``base``: hidden size, feed-forward size, layers and attention heads, then the
    fields it sets otherwise."""
    return dict(base, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, **fields)


def _refs(family: str, shapes: dict[str, dict[str, Any]]) -> list[Reference]:
    return [Reference(name, family, config) for name, config in shapes.items()]


# dense shapes: _shape(family base, hidden size, intermediate size, layers, attention heads, other fields)
REFERENCES: list[Reference] = [
    *_refs("llama", {  # Llama 3.x
        "Llama-3.2-1B": _shape(_LLAMA3, 2048, 8192, 16, 32, head_dim=64, tie_word_embeddings=True),
        "Llama-3.2-3B": _shape(_LLAMA3, 3072, 8192, 28, 24, head_dim=128, tie_word_embeddings=True),
        "Llama-3.1-8B": _shape(_LLAMA3, 4096, 14336, 32, 32),
        "Llama-3.1-70B": _shape(_LLAMA3, 8192, 28672, 80, 64),
        "Llama-3.1-405B": _shape(_LLAMA3, 16384, 53248, 126, 128)}),
    *_refs("llama2", {
        "Llama-2-7B": _shape(_LLAMA2, 4096, 11008, 32, 32, num_key_value_heads=32),
        "Llama-2-13B": _shape(_LLAMA2, 5120, 13824, 40, 40, num_key_value_heads=40),
        "Llama-2-70B": _shape(_LLAMA2, 8192, 28672, 80, 64, num_key_value_heads=8)}),
    *_refs("qwen2", {  # Qwen2.5
        "Qwen2.5-0.5B": _shape(_QWEN2_SMALL, 896, 4864, 24, 14, num_key_value_heads=2),
        "Qwen2.5-1.5B": _shape(_QWEN2_SMALL, 1536, 8960, 28, 12, num_key_value_heads=2),
        "Qwen2.5-3B": _shape(_QWEN2_SMALL, 2048, 11008, 36, 16, num_key_value_heads=2),
        "Qwen2.5-7B": _shape(_QWEN2, 3584, 18944, 28, 28, num_key_value_heads=4),
        "Qwen2.5-14B": _shape(_QWEN2, 5120, 13824, 48, 40, num_key_value_heads=8),
        "Qwen2.5-32B": _shape(_QWEN2, 5120, 27648, 64, 40, num_key_value_heads=8),
        "Qwen2.5-72B": _shape(_QWEN2, 8192, 29568, 80, 64, num_key_value_heads=8)}),
    *_refs("qwen3", {  # dense; the MoE models are qwen3_moe
        "Qwen3-0.6B": _shape(_QWEN3, 1024, 3072, 28, 16, tie_word_embeddings=True),
        "Qwen3-1.7B": _shape(_QWEN3, 2048, 6144, 28, 16, tie_word_embeddings=True),
        "Qwen3-4B": _shape(_QWEN3, 2560, 9728, 36, 32, tie_word_embeddings=True),
        "Qwen3-8B": _shape(_QWEN3, 4096, 12288, 36, 32),
        "Qwen3-14B": _shape(_QWEN3, 5120, 17408, 40, 40),
        "Qwen3-32B": _shape(_QWEN3, 5120, 25600, 64, 64)}),
    *_refs("mistral", {
        "Mistral-7B-v0.3": _shape(_MISTRAL, 4096, 14336, 32, 32, vocab_size=32768, max_position_embeddings=32768),
        "Mistral-Nemo-12B": _shape(_MISTRAL, 5120, 14336, 40, 32, vocab_size=131072, head_dim=128,
                                   max_position_embeddings=131072),
        "Mistral-Small-24B": _shape(_MISTRAL, 5120, 32768, 40, 32, vocab_size=131072, head_dim=128,
                                    max_position_embeddings=32768, rope_theta=1e8)}),
    *_refs("gemma2", {
        "Gemma-2-2B": _shape(_GEMMA2, 2304, 9216, 26, 8, num_key_value_heads=4),
        "Gemma-2-9B": _shape(_GEMMA2, 3584, 14336, 42, 16, num_key_value_heads=8),
        "Gemma-2-27B": _shape(_GEMMA2, 4608, 36864, 46, 32, num_key_value_heads=16, head_dim=128)}),
    *_refs("mixtral", {
        "Mixtral-8x7B": _shape(_MIXTRAL, 4096, 14336, 32, 32, vocab_size=32000, max_position_embeddings=32768),
        "Mixtral-8x22B": _shape(_MIXTRAL, 6144, 16384, 56, 48, vocab_size=32768, max_position_embeddings=65536)}),
    *_refs("qwen2_moe", {
        "Qwen1.5-MoE-A2.7B": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
            intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
            max_position_embeddings=8192, torch_dtype="bfloat16")}),
    *_refs("qwen3_moe", {
        "Qwen3-30B-A3B": dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32),
        "Qwen3-235B-A22B": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
            num_hidden_layers=94, num_attention_heads=64)}),
    *_refs("olmoe", {
        "OLMoE-1B-7B": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
            num_experts=64, num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=4096, torch_dtype="bfloat16")}),
    *_refs("deepseek_v2", {
        "DeepSeek-V2-Lite": dict(_DEEPSEEK_V2, vocab_size=102400, hidden_size=2048, intermediate_size=10944,
            moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
            num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, q_lora_rank=None, topk_method="greedy"),
        "DeepSeek-V2": dict(_DEEPSEEK_V2, vocab_size=102400, hidden_size=5120, intermediate_size=12288,
            moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
            num_key_value_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
            q_lora_rank=1536, topk_method="group_limited_greedy", n_group=8, topk_group=3)}),
    *_refs("deepseek_v3", {
        "DeepSeek-V3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
            moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
            num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
            first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4,
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
            routed_scaling_factor=2.5, max_position_embeddings=163840, rope_theta=10000,
            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16")}),
]
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {r.name: r.config for r in REFERENCES}

# What a family computed as another architecture's shape leaves out.
STAND_INS = {
    "qwen2": "Qwen2.5 computed as its Llama shape (q/k/v biases kept)",
    "qwen3": "Qwen3 computed as its Llama shape (its q/k norms, 256 numbers a layer, left out)",
    "gemma2": "Gemma 2 computed as its Llama shape; its sliding-window layers (every other one, 4096 tokens) "
              "are counted as full attention, so past 4096 tokens the KV cache is an upper bound",
}
# --arch spellings -> family; anything else is matched after dropping case, '-', '_' and '.'
ALIASES = {"llama3": "llama", "llama31": "llama", "llama32": "llama", "llama33": "llama", "qwen25": "qwen2",
           "qwen": "qwen2", "gemma": "gemma2", "deepseek": "deepseek_v3"}

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


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def families() -> list[str]:
    return list(dict.fromkeys(r.family for r in REFERENCES))


def family_of(arch: str) -> str:
    """The family ``--arch`` names (``llama3.1``, ``Qwen2.5``, ``qwen3-moe``, ...); ValueError naming the known ones."""
    key = _key(arch)
    known = {_key(f): f for f in families()}
    family = known.get(key) or ALIASES.get(key)
    if family is None:
        raise ValueError(f"--arch {arch!r}: no reference shape; known: {', '.join(families())} "
                         f"(also {', '.join(sorted(ALIASES))})")
    return family


def candidates(arch: str) -> dict[str, dict[str, Any]]:
    family = family_of(arch)
    return {r.name: r.config for r in REFERENCES if r.family == family}


def describe_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a shape that decide memory, for the notes and --json."""
    heads = config["num_attention_heads"]
    shape = {
        "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"], "attention_heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "vocab_size": config["vocab_size"],
        "tied_embeddings": bool(config.get("tie_word_embeddings")),
    }
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
    if experts:
        shape.update(experts=experts, experts_per_token=config["num_experts_per_tok"])
    if config.get("kv_lora_rank"):  # MLA caches one latent row per token instead of per-head K/V
        shape.update(kv_heads=None, head_dim=None, kv_lora_rank=config["kv_lora_rank"],
                     qk_rope_head_dim=config["qk_rope_head_dim"])
    return shape


def shape_words(shape: dict[str, Any]) -> str:
    """``32 layers, hidden 4096, 32 query / 8 KV heads of 128, vocab 128256``."""
    if shape.get("kv_lora_rank"):
        attention = (f"{shape['attention_heads']} heads, MLA KV latent {shape['kv_lora_rank']}"
                     f"+{shape['qk_rope_head_dim']}")
    else:
        attention = f"{shape['attention_heads']} query / {shape['kv_heads']} KV heads of {shape['head_dim']}"
    words = [f"{shape['layers']} layers", f"hidden {shape['hidden_size']}", attention, f"vocab {shape['vocab_size']}"]
    if shape.get("experts"):
        words.append(f"{shape['experts']} experts, {shape['experts_per_token']} per token")
    return ", ".join(words)


def nearest(sizes: dict[str, int], params: int) -> str:
    """The reference whose parameter count is closest to ``params`` on a log scale."""
    return min(sizes, key=lambda name: abs(math.log(sizes[name] / params)))
