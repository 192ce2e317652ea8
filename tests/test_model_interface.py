"""The model interface (``CausalLM.experts``, ``tied_embeddings``, ``context_length``, ``kv_bytes_per_token``,
``active_parameters_per_token``, ``token_share``) for every architecture, against code we did not write:
the config.json transformers wrote, its module tree and saved tensors, the KV cache its own forward pass
fills, and the bytes our real caches hold after a prefill."""

from __future__ import annotations

import json
from fractions import Fraction

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from edge_llm.formats.folder import normalize_config
from edge_llm.loader import load_model
from edge_llm.models import build
from edge_llm.models.base import ExpertCounts
from edge_llm.models.cache import STEP, cache_nbytes
from tests.hf_oracle import build_tiny_checkpoint, random_tokens
from tests.tiny_configs import TINY_CONFIGS

CASES = {**TINY_CONFIGS, "llama-tied": dict(TINY_CONFIGS["llama"], tie_word_embeddings=True),
         "mixtral-tied": dict(TINY_CONFIGS["mixtral"], tie_word_embeddings=True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(config.json as transformers wrote it, transformers' model, its saved tensors' shapes, the folder)."""
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    config = json.loads((folder / "config.json").read_text())
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    return config, theirs, saved, folder


def _their_experts(config: dict, theirs) -> ExpertCounts | None:
    """Routed experts, their width and the MoE layers as transformers built them; shared experts from its
    shared-expert modules."""
    moe = [(i, layer.mlp) for i, layer in enumerate(theirs.model.layers) if hasattr(layer.mlp, "experts")]
    if not moe:
        return None
    mlp = moe[0][1]
    routed, _, width = mlp.experts.down_proj.shape  # [E, D, I]
    if hasattr(mlp, "shared_expert"):
        shared = 1
    elif hasattr(mlp, "shared_experts"):
        shared = mlp.shared_experts.gate_proj.out_features // width
    else:
        shared = 0
    return ExpertCounts(routed, config["num_experts_per_tok"], shared, tuple(i for i, _ in moe), width)


def test_experts(case):
    config, theirs, _, folder = case
    ours = load_model(folder)
    assert ours.experts == _their_experts(config, theirs)


def test_tied_embeddings_and_context_length(case):
    config, theirs, _, folder = case
    ours = load_model(folder)
    tied = theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert ours.tied_embeddings == tied == config.get("tie_word_embeddings", False)
    assert ours.context_length == config["max_position_embeddings"]


def test_kv_bytes_per_token_is_what_transformers_caches(case):
    """transformers caches, per token and layer, 2 x kv_heads x head_dim values for GQA and the MLA latent
    (kv_lora_rank) plus the rotary key (qk_rope_head_dim) for DeepSeek: the same rows ours holds."""
    config, theirs, _, folder = case
    ours = load_model(folder)
    n = 7
    with torch.no_grad():
        cache = theirs(torch.tensor(random_tokens(config["vocab_size"], n)), use_cache=True).past_key_values
    values = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    layers = config["num_hidden_layers"]
    if "kv_lora_rank" in config:
        from_config = layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"])
    else:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        from_config = 2 * layers * config["num_key_value_heads"] * head_dim
    assert values == n * from_config
    assert ours.kv_bytes_per_token(4) == 4 * from_config and ours.kv_bytes_per_token(2) == 2 * from_config


def test_float_cache_holds_kv_bytes_per_token(case):
    config, _, _, folder = case
    ours = load_model(folder)
    cache = ours.make_cache()
    mx.eval(ours(mx.array(random_tokens(config["vocab_size"], STEP)), cache=cache))
    assert cache_nbytes(cache) == STEP * ours.kv_bytes_per_token(4)


def _their_active_parameters(config: dict, theirs, saved: dict[str, tuple[int, ...]]) -> int:
    """The tensors transformers saved, the routed experts' (``experts.*``, stacked or per expert; Mixtral's under
    ``block_sparse_moe``) counted k / E."""
    experts = _their_experts(config, theirs)
    share = Fraction(experts.active, experts.routed) if experts else 1
    return round(sum(torch.Size(shape).numel() * (share if ".experts." in name else 1)
                     for name, shape in saved.items()))


def test_active_parameters_per_token(case):
    """Float, and quantized to 4 bits (packed weights count their unpacked values, scales none)."""
    config, theirs, saved, folder = case
    ours = load_model(folder)
    expected = _their_active_parameters(config, theirs, saved)
    assert ours.active_parameters_per_token() == expected
    nn.quantize(ours, group_size=64, bits=4,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    assert any("scales" in m for _, m in ours.named_modules())
    assert ours.active_parameters_per_token() == expected


def test_token_share():
    dense, moe = (build(t, normalize_config(TINY_CONFIGS[t])) for t in ("llama", "qwen3_moe"))
    tied = build("llama", normalize_config(CASES["llama-tied"]))
    assert dense.token_share("model.embed_tokens.weight") == Fraction(1, 384)
    assert tied.token_share("model.embed_tokens.weight") == 1  # also the output projection
    assert dense.token_share("model.layers.0.mlp.gate_proj.weight") == 1
    assert moe.token_share("model.layers.1.mlp.switch_mlp.down_proj.scales") == Fraction(2, 4)
    assert moe.token_share("model.layers.1.mlp.gate.weight") == 1


# Rows that quantize: GQA heads of 32 values, DeepSeek's latent 48 + 16 wide.
WIDE = {"deepseek_v2": dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=48),
        "deepseek_v3": dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=48)}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_quantized_caches_hold_kv_bytes_per_token(model_type):
    config = dict(TINY_CONFIGS[model_type], **WIDE.get(model_type, dict(num_attention_heads=2, num_key_value_heads=1)))
    model = build(model_type, normalize_config(config))
    tokens = mx.array(random_tokens(config["vocab_size"], STEP))
    held = {}
    for kv_bits in (None, 8, 4):
        cache = model.make_cache(kv_bits)
        mx.eval(model(tokens, cache=cache))
        held[kv_bits] = cache_nbytes(cache)
        assert held[kv_bits] == STEP * model.kv_bytes_per_token(4, kv_bits)
    # float32 rows; 8 bits: a byte per value plus a float32 scale and offset per 32 or 64 values
    assert held[None] > held[8] > held[4]


def test_half_precision_cache_holds_kv_bytes_per_token():
    config = dict(TINY_CONFIGS["llama"], num_attention_heads=2, num_key_value_heads=1)
    model = build("llama", normalize_config(config))
    model.set_dtype(mx.float16)
    for kv_bits in (None, 8):
        cache = model.make_cache(kv_bits)
        mx.eval(model(mx.array(random_tokens(config["vocab_size"], STEP)), cache=cache))
        assert cache_nbytes(cache) == STEP * model.kv_bytes_per_token(2, kv_bits)
