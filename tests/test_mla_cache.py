"""MLA's cache holds only the latent (kv_lora_rank + qk_rope_head_dim per token and layer), decoding attends
over it in absorbed form (also with a quantized kv_b_proj), and a trimmed cache resumes exactly."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from edge_llm import load_model
from edge_llm.models.cache import LatentCache, cache_nbytes, truncate_cache
from edge_llm.models.deepseek_v2 import Model, ModelArgs
from edge_llm.models.mla import MLAttention
from tests.hf_oracle import TOLERANCE, build_tiny_checkpoint, random_tokens

# DeepSeek-V2-Lite's attention shapes (heads, ranks, head dims), on a two-layer, narrow model
V2_LITE_ATTENTION = dict(
    vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    max_position_embeddings=4096,
)
TINY = dict(
    model_type="deepseek_v2", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=512,
)


def test_cache_after_256_tokens_holds_only_the_latent():
    args = ModelArgs.from_dict(V2_LITE_ATTENTION)
    model = Model(args)
    cache = model.make_cache()
    tokens = mx.array(random_tokens(256, 256))
    model(tokens[:, :200], cache=cache)
    for i in range(200, 256):  # decode steps grow the cache too
        model(tokens[:, i : i + 1], cache=cache)
    mx.eval([c.state for c in cache])
    assert all(isinstance(c, LatentCache) and c.offset == 256 for c in cache)
    latent_formula = args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * 256 * 4  # float32
    assert cache_nbytes(cache) <= 1.3 * latent_formula
    # what a per-head K/V cache (mlx-lm's deepseek_v2) would hold: 16 heads x (192 + 128) values per token
    per_head = args.num_hidden_layers * args.num_attention_heads * (128 + 64 + 128) * 256 * 4
    assert per_head / cache_nbytes(cache) > 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("mla"), **TINY)


def test_prefill_expands_and_decoding_absorbs(tiny, monkeypatch):
    calls = []
    for form in ("_absorbed", "_expanded"):
        original = getattr(MLAttention, form)

        def spy(self, *a, _form=form, _original=original):
            calls.append((_form, a[0].shape[2], a[2].shape[2]))  # (form, queries, keys)
            return _original(self, *a)

        monkeypatch.setattr(MLAttention, form, spy)
    model = load_model(tiny)
    cache = model.make_cache()
    tokens = mx.array(random_tokens(128, 65, seed=3))
    model(tokens[:, :64], cache=cache)
    model(tokens[:, 64:], cache=cache)
    layers = len(model.layers)
    assert calls == [("_expanded", 64, 64)] * layers + [("_absorbed", 1, 65)] * layers


@pytest.mark.parametrize("bits", [4, 8])
def test_absorbed_form_with_quantized_kv_b_proj(tiny, bits):
    model = load_model(tiny)
    nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda path, _: path.endswith("kv_b_proj"))
    assert isinstance(model.layers[0].self_attn.kv_b_proj, nn.QuantizedLinear)
    tokens = mx.array(random_tokens(128, 24, seed=4))
    for layer in model.layers:
        layer.self_attn.absorb = False
    expanded = model(tokens)  # runs the QuantizedLinear itself
    for layer in model.layers:
        layer.self_attn.absorb = None
    cache = model.make_cache()
    steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 24)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(expanded), atol=TOLERANCE, rtol=0)


def test_trimmed_cache_resumes_like_a_fresh_one(tiny):
    """Chat reuses a shared prefix: cut the cache back, feed a different continuation."""
    model = load_model(tiny)
    a = mx.array(random_tokens(128, 30, seed=5))
    b = mx.array(random_tokens(128, 30, seed=6))
    b = mx.concatenate([a[:, :12], b[:, 12:]], axis=1)
    cache = model.make_cache()
    model(a[:, :20], cache=cache)
    model(a[:, 20:21], cache=cache)
    truncate_cache(cache, 12)
    assert all(c.offset == 12 for c in cache)
    resumed = [model(b[:, 12:25], cache=cache)] + [model(b[:, i : i + 1], cache=cache) for i in range(25, 30)]
    np.testing.assert_allclose(np.array(mx.concatenate(resumed, axis=1)), np.array(model(b)[:, 12:]),
                               atol=TOLERANCE, rtol=0)
