"""DeepSeek-V2/V3 against transformers (logits, both attention forms, cached decoding), their routers against
transformers' routers, moe_layer_freq and mlx-community (mlx-lm-converted, quantized) files against mlx-lm,
and `edge-llm run` on a tiny checkpoint of each."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map
from safetensors.torch import load_file, save_file

from edge_llm import load_model
from edge_llm.models.deepseek_gate import MoEGate
from edge_llm.models.deepseek_v2 import Model as V2Model
from edge_llm.models.deepseek_v2 import ModelArgs as V2Args
from edge_llm.tokenizer import Tokenizer
from tests.hf_oracle import (
    TOLERANCE,
    build_tiny_checkpoint,
    greedy_tokens,
    random_tokens,
    reference_logits,
    run_answer,
)
from tests.tiny_configs import TINY_CONFIGS

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, max_position_embeddings=256,
)
YARN_V2 = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64,
           "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
YARN_V3 = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32,
           "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}

CONFIGS = {
    "v2-greedy-biases": dict(model_type="deepseek_v2", attention_bias=True, mlp_bias=True),
    "v2-grouped-qlora": dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             q_lora_rank=24, routed_scaling_factor=1.5, n_shared_experts=2, first_k_dense_replace=0),
    # (no mlp_bias here: transformers would still add the bias of its zero-width shared expert)
    "v2-yarn-noshared-tied": dict(model_type="deepseek_v2", rope_parameters=YARN_V2, n_shared_experts=0,
                                  tie_word_embeddings=True),
    "v3-groups-qlora": dict(model_type="deepseek_v3", n_group=4, topk_group=2, q_lora_rank=24),
    "v3-yarn-rotate-half": dict(model_type="deepseek_v3", n_group=1, topk_group=1, rope_parameters=YARN_V3,
                                rope_interleave=False, norm_topk_prob=False, n_shared_experts=0,
                                first_k_dense_replace=2, max_position_embeddings=512),
    "v3-top1": dict(model_type="deepseek_v3", n_group=2, topk_group=1, num_experts_per_tok=1,
                    routed_scaling_factor=1.0),
}


def sharpen_routers(folder: Path, seed: int) -> None:
    """Random init leaves routers near-uniform and V3's selection bias at zero (a buffer, not perturbed):
    scale routers up and give the bias values that change which experts win."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.weight"):
            tensors[name] = t * 20
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(t.shape, generator=gen) * 0.3
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=[(name, style) for name in CONFIGS for style in (False, True)],
                ids=lambda p: f"{p[0]}-{'old' if p[1] else 'new'}-keys")
def checkpoint(request, tmp_path_factory):
    name, old_style = request.param
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp(name), old_style_keys=old_style, **{**BASE, **CONFIGS[name]})
    sharpen_routers(folder, seed=len(name))
    return folder


def set_absorb(model, absorb: bool | None) -> None:
    for layer in model.layers:
        layer.self_attn.absorb = absorb


def test_logits_match_transformers_in_both_attention_forms(checkpoint):
    tokens = random_tokens(VOCAB, 24, batch=2)
    theirs = reference_logits(checkpoint, tokens)
    model = load_model(checkpoint)
    for absorb in (False, True):
        set_absorb(model, absorb)
        ours = np.array(model(mx.array(tokens)))
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0, err_msg=f"absorb={absorb}")


def test_cached_decoding_equals_full_forward(checkpoint):
    model = load_model(checkpoint)
    tokens = mx.array(random_tokens(VOCAB, 20, seed=1))
    full = model(tokens)
    cache = model.make_cache()
    # a prefill, a second multi-token chunk against the cache (causal mask with an offset), then decode
    steps = [model(tokens[:, :5], cache=cache), model(tokens[:, 5:12], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(12, 20)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=TOLERANCE, rtol=0)
    assert cache[0].offset == 20
    # forcing the expanded form on the same chunks agrees too (decode steps then re-expand the latents)
    set_absorb(model, False)
    cache = model.make_cache()
    steps = [model(tokens[:, :12], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(12, 20)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=TOLERANCE, rtol=0)


def routed(indices: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    """Per token {expert: weight}: the order top-k returns experts in is irrelevant."""
    return [dict(zip(i.tolist(), w.tolist(), strict=True)) for i, w in zip(indices, weights, strict=True)]


def assert_same_routing(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs, strict=True):
        assert sorted(o) == sorted(t)
        np.testing.assert_allclose([o[e] for e in sorted(o)], [t[e] for e in sorted(t)], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method,norm,scale,top_k", [
    ("greedy", False, 1.0, 6), ("group_limited_greedy", False, 16.0, 6), ("group_limited_greedy", True, 1.0, 4),
])
def test_v2_router_matches_transformers(method, norm, scale, top_k):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=top_k, topk_method=method,
                           n_group=8, topk_group=3, routed_scaling_factor=scale, norm_topk_prob=norm)
    hf = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(hf.weight, std=1.0)
    x = torch.randn(200, 32)
    with torch.no_grad():
        _, w, i = hf(x)
    if norm:
        # transformers 5 ignores norm_topk_prob for V2; DeepSeek's code normalises the same selection instead
        # of scaling it (scale is 1 here, so transformers' weights are the unscaled ones)
        w = w / w.sum(-1, keepdim=True)
    ours = MoEGate(32, 64, top_k, method, 8, 3, norm, scale)
    ours.weight = mx.array(hf.weight.detach().numpy())
    oi, ow = ours(mx.array(x.numpy()))
    assert_same_routing(routed(np.array(oi), np.array(ow)), routed(i.numpy(), w.numpy()))


@pytest.mark.parametrize("n_group,topk_group,norm", [(8, 4, True), (4, 1, False), (1, 1, True)])
def test_v3_router_matches_transformers(n_group, topk_group, norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=n_group,
                           topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm)
    hf = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(hf.weight, std=0.5)
    hf.e_score_correction_bias.copy_(torch.randn(64) * 0.5)
    x = torch.randn(200, 32)
    with torch.no_grad():
        _, w, i = hf(x)
    ours = MoEGate(32, 64, 8, "noaux_tc", n_group, topk_group, norm, 2.5)
    ours.weight = mx.array(hf.weight.detach().numpy())
    ours.e_score_correction_bias = mx.array(hf.e_score_correction_bias.numpy())
    oi, ow = ours(mx.array(x.numpy()))
    assert_same_routing(routed(np.array(oi), np.array(ow)), routed(i.numpy(), w.numpy()))
    # the bias decides the selection only: without it some choices differ, the weights are plain sigmoids
    unbiased = torch.sigmoid(x @ hf.weight.detach().T).gather(1, i)
    if norm:
        unbiased = unbiased / unbiased.sum(-1, keepdim=True)
    np.testing.assert_allclose(w.numpy(), unbiased.numpy() * 2.5, rtol=1e-5)


def random_model(args: V2Args, seed: int) -> V2Model:
    mx.random.seed(seed)
    model = V2Model(args)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.parameters()))
    model.update(tree_map(lambda p: p + 1.0 if p.ndim == 1 else p, model.parameters()))  # norms near 1
    return model


def test_moe_layer_freq_matches_mlx_lm(tmp_path):
    """transformers ignores moe_layer_freq; DeepSeek's code and mlx-lm put MoE on layers with i % freq == 0."""
    from mlx_lm.utils import load_model as mlx_lm_load

    config = dict(BASE, model_type="deepseek_v2", num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2,
                  n_shared_experts=None, rope_theta=10000.0, rope_scaling={k: v for k, v in YARN_V2.items()
                                                                             if k != "rope_theta"})
    config["rope_scaling"]["type"] = "yarn"
    args = V2Args.from_dict(config)
    assert [args.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    model = random_model(args, seed=3)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs, _ = mlx_lm_load(tmp_path)
    ours = load_model(tmp_path)
    tokens = mx.array(random_tokens(VOCAB, 16, seed=2))
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(theirs(tokens)), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_reads_mlx_lm_quantized_conversion(model_type, tmp_path):
    """What mlx-community repos hold: mlx-lm's own 4-bit conversion (V2 keeps a quantized kv_b_proj, V3 splits
    it into quantized embed_q/unembed_out). Our logits equal mlx-lm's on the same folder."""
    from mlx_lm import convert
    from mlx_lm.utils import load_model as mlx_lm_load

    extra = dict(rope_parameters=YARN_V2) if model_type == "deepseek_v2" else dict(n_group=2, topk_group=1)
    src = build_tiny_checkpoint(tmp_path / "hf", old_style_keys=True, with_tokenizer=True, **{
        **BASE, "vocab_size": 384, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
        "moe_intermediate_size": 64, "intermediate_size": 128, "model_type": model_type, **extra})
    sharpen_routers(src, seed=5)
    dst = tmp_path / "mlx-4bit"
    convert(str(src), str(dst), quantize=True, q_group_size=32, q_bits=4, dtype="float32")
    theirs, _ = mlx_lm_load(dst)
    ours = load_model(dst)
    attn = ours.layers[0].self_attn
    if model_type == "deepseek_v2":
        assert isinstance(attn.kv_b_proj, nn.QuantizedLinear)  # absorbed decoding runs on the packed weight
    tokens = mx.array(random_tokens(384, 16, seed=4))
    full = ours(tokens)
    np.testing.assert_allclose(np.array(full), np.array(theirs(tokens)), atol=1e-4, rtol=0)
    cache = ours.make_cache()
    steps = [ours(tokens[:, :8], cache=cache)] + [ours(tokens[:, i : i + 1], cache=cache) for i in range(8, 16)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_edge_llm_run_chats_with_tiny_checkpoint(model_type, tmp_path):
    """The command a user types works, and its greedy answer is transformers' greedy answer."""
    folder = build_tiny_checkpoint(tmp_path / model_type, with_tokenizer=True, **TINY_CONFIGS[model_type])
    data = run_answer(["run", str(folder), "--prompt", "hi", "--temp", "0", "--max-tokens", "8"])
    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    theirs = greedy_tokens(folder, ids, 8)
    assert data["tokens"] and data["tokens"] == theirs[: len(data["tokens"])]
    if data["finish_reason"] == "stop":
        assert theirs[len(data["tokens"])] in tokenizer.eos_token_ids
    else:
        assert len(data["tokens"]) == 8
