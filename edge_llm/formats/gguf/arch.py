"""What each GGUF architecture means in Hugging Face terms: config keys and tensor names.

References: llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2MoeModel``, ``Qwen3MoeModel``,
``OlmoeModel``: which metadata keys they write, how they rename and stack tensors) and
``src/llama-arch.cpp`` (the tensor names); transformers ``integrations/ggml.py`` (its GGUF config
mapping, which our choices agree with).

- ``llama`` is the dense Llama family, or Mixtral when ``llama.expert_count`` is set (llama.cpp writes
  Mixtral as a Llama with experts). Only this architecture has its q/k rows permuted.
- ``qwen2moe``: qkv biases, a shared expert with a sigmoid gate (``ffn_gate_inp_shexp``).
- ``qwen3moe``: per-head q/k RMSNorm, no shared expert, top-k weights renormalised.
- ``olmoe``: full-width q/k RMSNorm.
- ``deepseek2`` (DeepSeek-V2 and V3, ``DeepseekV2Model`` in the converter): MLA tensors, dense first
  layers, shared experts, V3's sigmoid router bias (``exp_probs_b``); newer files split ``kv_b_proj``
  into ``attn_k_b`` (per head, transposed) and ``attn_v_b``, which ``checkpoint.py`` joins back.

Experts come stacked (``ffn_{gate,up,down}_exps``, ``[E, out, in]``) and map straight onto the
architectures' ``switch_mlp``; old Mixtral files with one tensor per expert (``ffn_gate.{e}``) map onto
the Hub's per-expert names, which the model's ``sanitize`` stacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import CheckpointError
from .reader import GGUFFile

Names = list[tuple[str, str]]


def _layer(modules: dict[str, str]) -> Names:
    """``blk.N.<GGUF name>`` -> ``model.layers.N.<HF module path>`` for each pair."""
    return [(rf"blk\.(\d+)\.{gguf}", rf"model.layers.\1.{hf}") for gguf, hf in modules.items()]


# GGUF tensor name (without .weight/.bias) -> HF module path, for what every llama.cpp decoder names alike
# (names are matched whole, so the order of a table does not matter).
DECODER_NAMES: Names = [
    (r"token_embd", "model.embed_tokens"),
    (r"output_norm", "model.norm"),
    (r"output", "lm_head"),
    *_layer({"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}),
]
# the dense decoders' grouped-query attention: its own key and value projections
DENSE_NAMES: Names = [*DECODER_NAMES, *_layer({"attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"})]
QK_NORM_NAMES: Names = _layer({"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"})


def moe_names(block: str) -> Names:
    """Router and stacked experts of a sparse block at ``model.layers.N.{block}``."""
    return _layer({"ffn_gate_inp": f"{block}.gate", "ffn_gate_exps": f"{block}.switch_mlp.gate_proj",
                   "ffn_up_exps": f"{block}.switch_mlp.up_proj", "ffn_down_exps": f"{block}.switch_mlp.down_proj"})


# Mixtral files from before llama.cpp stacked experts (2024): one tensor per expert, Hub names w1/w3/w2.
PER_EXPERT_NAMES: Names = [
    (rf"blk\.(\d+)\.ffn_{part}\.(\d+)", rf"model.layers.\1.block_sparse_moe.experts.\2.{hub}")
    for part, hub in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
]
SHARED_EXPERT_NAMES: Names = _layer({
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
})


DEEPSEEK_NAMES: Names = [
    *DECODER_NAMES,
    *_layer({
        "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
        "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
        # since 2025 llama.cpp splits kv_b_proj per head into k_b (transposed) and v_b: joined back on load
        "attn_k_b": "self_attn.k_b_proj", "attn_v_b": "self_attn.v_b_proj",
        "exp_probs_b": "mlp.gate",  # .bias: e_score_correction_bias
        "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
        "ffn_down_shexp": "mlp.shared_experts.down_proj",
    }),
    *moe_names("mlp"),
]


def _identity(name: str) -> str:
    return name


@dataclass(frozen=True)
class Arch:
    config: Callable[[GGUFFile], dict[str, Any]]
    names: Callable[[GGUFFile], Names]
    permuted_qk: bool = False  # llama.cpp's converter permuted q/k rows (LLM_ARCH_LLAMA only)
    rename: Callable[[str], str] = _identity  # full HF tensor name fixes after the module mapping
    split_modules: tuple[str, ...] = ()  # modules llama.cpp split, joined on load (never model modules)


def _typed(g: GGUFFile, key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """``{arch}.{key}`` if it is one of ``kinds`` (None when absent); one line naming the key if not."""
    arch = g.get("general.architecture")
    if isinstance(g.arch_key(key), list):
        raise CheckpointError(f"{g.path}: {arch}.{key} varies per layer, which edge-llm does not support")
    return g.typed(f"{arch}.{key}", kinds, what)


def meta_int(g: GGUFFile, key: str, default: int | None = None, low: int = 0) -> int | None:
    """``{arch}.{key}`` as an integer of at least ``low`` (``default`` when absent)."""
    value = _typed(g, key, int, "an integer")
    if value is None:
        return default
    if value < low:
        raise CheckpointError(f"{g.path}: GGUF metadata {g.get('general.architecture')}.{key} = {value}, "
                              f"expected at least {low}; re-convert the file with llama.cpp")  # fmt: skip
    return value


def meta_float(g: GGUFFile, key: str, default: float | None = None) -> float | None:
    value = _typed(g, key, (int, float), "a number")
    return default if value is None else float(value)


def meta_flag(g: GGUFFile, key: str, default: bool) -> bool:
    value = _typed(g, key, bool, "true or false")
    return default if value is None else value


def required(g: GGUFFile, key: str) -> int:
    """A size every file of the architecture states: a positive integer."""
    value = meta_int(g, key, low=1)
    if value is None:
        arch = g.get("general.architecture")
        raise CheckpointError(f"{g.path}: GGUF metadata lacks {arch}.{key}; re-convert the file with llama.cpp")
    return value


def _llama3_rope(g: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Llama 3.1+ stores its rope scaling as per-frequency factors (``rope_freqs.weight``), not metadata.

    Rebuild the transformers ``llama3`` parameters from them: ``factor`` is the largest factor; the
    smoothing band is the one every Llama 3.x release uses (low 1, high 4, original context 8192);
    the factors it implies must equal the file's, or we refuse rather than run a wrong rope.
    """
    tensor = g.tensors.get("rope_freqs.weight")
    if tensor is None:
        return None
    if tensor.type_name != "F32":
        raise CheckpointError(f"{g.path}: rope_freqs.weight is {tensor.type_name}, expected F32")
    factors = g.read(tensor).view(np.float32).astype(np.float64)
    if not factors.size or not np.isfinite(factors).all() or factors.min() <= 0:
        raise CheckpointError(f"{g.path}: rope_freqs.weight holds no valid rope factors; re-convert the file")
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / 3.0
    expected = np.where(
        wavelen < 8192 / 4.0, 1.0,
        np.where(wavelen > 8192, scaling["factor"], 1 / ((1 - smooth) / scaling["factor"] + smooth)),
    )  # fmt: skip
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise CheckpointError(
            f"{g.path}: rope_freqs.weight does not match Llama 3 rope scaling; this file's rope is not supported"
        )
    return scaling


def rope_scaling(g: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = _typed(g, "rope.scaling.type", str, "a string")
    if kind in (None, "none"):
        return _llama3_rope(g, head_dim, theta)
    factor = meta_float(g, "rope.scaling.factor") or meta_float(g, "rope.scale_linear")
    if kind in ("linear", "yarn") and factor is None:
        raise CheckpointError(f"{g.path}: {kind} rope scaling without rope.scaling.factor; re-convert the file")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        original = meta_int(g, "rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if g.arch_key(key) is not None:
                scaling[hf] = meta_float(g, key)
        return scaling
    raise CheckpointError(f"{g.path}: rope scaling {kind[:40]!r} is not supported (none, linear, yarn are)")


def base_config(g: GGUFFile, model_type: str, architecture: str) -> dict[str, Any]:
    """The keys every decoder shares (transformers' GGUF mapping: context_length -> max_position_embeddings...)."""
    hidden = required(g, "embedding_length")
    heads = required(g, "attention.head_count")
    head_dim = meta_int(g, "attention.key_length") or hidden // heads
    theta = meta_float(g, "rope.freq_base", 10000.0)
    embed = g.tensors.get("token_embd.weight")
    tokens = g.get("tokenizer.ggml.tokens")
    # the embedding is the truth (llama.cpp pads the token list to it); then the metadata
    vocab = (embed.shape[0] if embed else None) or meta_int(g, "vocab_size") \
        or (len(tokens) if isinstance(tokens, list) else None)
    if not vocab:
        raise CheckpointError(f"{g.path}: no token_embd.weight tensor, vocab_size or token list: no vocabulary size")
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_int(g, "feed_forward_length") or None,
        "num_hidden_layers": required(g, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta_int(g, "attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta_float(g, "attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": meta_int(g, "context_length", 2048),
        "rope_theta": theta,
        "rope_scaling": rope_scaling(g, head_dim, theta),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "hidden_act": "silu",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):  # fmt: skip
        value = g.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool):  # the tokenizer reports other values
            config[hf] = value
    return config


def _experts(g: GGUFFile, config: dict[str, Any], experts_key: str = "num_experts") -> dict[str, Any]:
    config[experts_key] = required(g, "expert_count")
    config["num_experts_per_tok"] = required(g, "expert_used_count")
    return config


def _expert_ffn(g: GGUFFile) -> int:
    """The routed experts' hidden size: metadata, else the stacked gate tensor [E, I, D]."""
    size = meta_int(g, "expert_feed_forward_length")
    gate = g.tensors.get("blk.0.ffn_gate_exps.weight")
    return size or (gate.shape[1] if gate and len(gate.shape) == 3 else required(g, "expert_feed_forward_length"))


def _llama(g: GGUFFile) -> dict[str, Any]:
    if meta_int(g, "expert_count"):  # Mixtral
        config = base_config(g, "mixtral", "MixtralForCausalLM")
        return _experts(g, config, "num_local_experts")
    config = base_config(g, "llama", "LlamaForCausalLM")
    config["intermediate_size"] = required(g, "feed_forward_length")
    config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    config["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    return config


def _qwen_moe(g: GGUFFile, model_type: str, architecture: str) -> dict[str, Any]:
    """What Qwen's MoE generations share: routed experts whose width the dense feed-forward defaults to."""
    config = _experts(g, base_config(g, model_type, architecture))
    config["moe_intermediate_size"] = _expert_ffn(g)
    config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    return config


def _qwen2moe(g: GGUFFile) -> dict[str, Any]:
    config = _qwen_moe(g, "qwen2_moe", "Qwen2MoeForCausalLM")
    shared = meta_int(g, "expert_shared_feed_forward_length")
    gate = g.tensors.get("blk.0.ffn_gate_shexp.weight")
    config["shared_expert_intermediate_size"] = shared or (gate.shape[0] if gate else 0)
    config["qkv_bias"] = "blk.0.attn_q.bias" in g.tensors
    config["norm_topk_prob"] = meta_flag(g, "expert_weights_norm", False)
    return config


def _qwen3moe(g: GGUFFile) -> dict[str, Any]:
    config = _qwen_moe(g, "qwen3_moe", "Qwen3MoeForCausalLM")
    config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    # llama.cpp always renormalises Qwen3-MoE's top-k weights (transformers' GGUF reader says so too)
    config["norm_topk_prob"] = meta_flag(g, "expert_weights_norm", True)
    return config


def _olmoe(g: GGUFFile) -> dict[str, Any]:
    config = _experts(g, base_config(g, "olmoe", "OlmoeForCausalLM"))
    config["intermediate_size"] = _expert_ffn(g)
    config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    config["norm_topk_prob"] = meta_flag(g, "expert_weights_norm", False)
    return config


def _deepseek2(g: GGUFFile) -> dict[str, Any]:
    """DeepSeek-V2/V3 (llama.cpp writes both as ``deepseek2``; V3 routes with sigmoid + a score bias)."""
    v3 = meta_int(g, "expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") for n in g.tensors)
    config = base_config(g, "deepseek_v3" if v3 else "deepseek_v2",
                         "DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM")  # fmt: skip
    rope = required(g, "rope.dimension_count")
    # llama.cpp describes MLA as MQA over the latent: head_count_kv 1, key_length kv_lora_rank + rope.
    # The per-head sizes are key/value_length_mla (files before 2025: key/value_length themselves).
    qk = meta_int(g, "attention.key_length_mla") or required(g, "attention.key_length")
    v = meta_int(g, "attention.value_length_mla") or required(g, "attention.value_length")
    n_group = meta_int(g, "expert_group_count") or 1
    config.update(
        num_key_value_heads=config["num_attention_heads"], head_dim=rope, qk_rope_head_dim=rope,
        qk_nope_head_dim=qk - rope, v_head_dim=v,
        q_lora_rank=meta_int(g, "attention.q_lora_rank") or None,
        kv_lora_rank=required(g, "attention.kv_lora_rank"),
        first_k_dense_replace=meta_int(g, "leading_dense_block_count", 0),
        moe_intermediate_size=_expert_ffn(g),
        n_routed_experts=required(g, "expert_count"),
        num_experts_per_tok=required(g, "expert_used_count"),
        n_shared_experts=meta_int(g, "expert_shared_count") or None,
        routed_scaling_factor=meta_float(g, "expert_weights_scale") or 1.0,
        norm_topk_prob=meta_flag(g, "expert_weights_norm", False),
        n_group=n_group, topk_group=meta_int(g, "expert_group_used_count") or 1,
        topk_method="noaux_tc" if v3 else "group_limited_greedy" if n_group > 1 else "greedy",
    )  # fmt: skip
    config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    scaling = config["rope_scaling"]
    if scaling and scaling["rope_type"] == "yarn":
        # llama.cpp keeps 0.1 * mscale_all_dim; DeepSeek's configs set mscale equal to it
        mscale = (meta_float(g, "rope.scaling.yarn_log_multiplier") or 0.0) / 0.1
        if mscale:
            scaling.update(mscale=mscale, mscale_all_dim=mscale)
    return config


def _deepseek_rename(name: str) -> str:
    return name[: -len("bias")] + "e_score_correction_bias" if name.endswith(".mlp.gate.bias") else name


def _llama_names(g: GGUFFile) -> Names:
    return DENSE_NAMES + (moe_names("block_sparse_moe") + PER_EXPERT_NAMES if meta_int(g, "expert_count") else [])


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(_llama, _llama_names, permuted_qk=True),
    "qwen2moe": Arch(_qwen2moe, lambda g: DENSE_NAMES + moe_names("mlp") + SHARED_EXPERT_NAMES),
    "qwen3moe": Arch(_qwen3moe, lambda g: DENSE_NAMES + QK_NORM_NAMES + moe_names("mlp")),
    "olmoe": Arch(_olmoe, lambda g: DENSE_NAMES + QK_NORM_NAMES + moe_names("mlp")),
    "deepseek2": Arch(_deepseek2, lambda g: DEEPSEEK_NAMES, rename=_deepseek_rename,
                      split_modules=(".self_attn.k_b_proj", ".self_attn.v_b_proj")),
}
