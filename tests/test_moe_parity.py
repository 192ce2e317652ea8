"""Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE logits against transformers; sanitize as a pure function.

Every config is built twice, once with transformers 5's config keys and once with the classic ones
older Hub checkpoints carry (``rope_theta``/``rope_scaling``; ``num_experts`` for Qwen3-MoE). Cached
step-by-step decoding must equal the full forward, with a prefill long enough to take the sorted
(token, expert) path and single-token steps that take the unsorted one.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_llm import load_model
from edge_llm.models import get_architecture
from edge_llm.models.moe import SparseMoeBlock, softmax_topk
from edge_llm.models.switch import SORT_THRESHOLD
from tests.hf_oracle import (
    TOLERANCE,
    build_tiny_checkpoint,
    check_cached_decoding,
    check_logits_match,
    random_tokens,
    reference_logits,
)

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
QWEN_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)

CONFIGS = {
    "mixtral-gqa-untied": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "mixtral-mqa-tied-top3": dict(model_type="mixtral", num_local_experts=6, num_experts_per_tok=3,
                                  num_key_value_heads=1, tie_word_embeddings=True),
    "mixtral-headdim-window": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=24, sliding_window=8),
    "qwen2_moe-shared": dict(QWEN_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=48),
    "qwen2_moe-norm-mqa-tied": dict(QWEN_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=40,
                                    norm_topk_prob=True, num_key_value_heads=1, tie_word_embeddings=True),
    # seed 0 makes layer 3's router send every token to the same two experts: the check below catches it
    "qwen2_moe-sparse-step": dict(QWEN_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=48,
                                  num_hidden_layers=4, decoder_sparse_step=2, qkv_bias=False, seed=1),
    "qwen2_moe-dense-layers-window": dict(QWEN_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=48,
                                          num_hidden_layers=3, mlp_only_layers=[1], use_sliding_window=True,
                                          sliding_window=8, max_window_layers=2),
    "qwen3_moe-headdim": dict(QWEN_MOE, model_type="qwen3_moe", head_dim=24),
    "qwen3_moe-norm-mqa-tied-bias": dict(QWEN_MOE, model_type="qwen3_moe", norm_topk_prob=True,
                                         num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True),
    "qwen3_moe-sparse-step-dense": dict(QWEN_MOE, model_type="qwen3_moe", num_hidden_layers=4,
                                        decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
    "qwen3_moe-yarn-window": dict(QWEN_MOE, model_type="qwen3_moe", use_sliding_window=True, sliding_window=8,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 64}),
    "olmoe-gqa": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "olmoe-norm-mqa-tied": dict(model_type="olmoe", num_experts=6, num_experts_per_tok=3, intermediate_size=48,
                                norm_topk_prob=True, num_key_value_heads=1, tie_word_embeddings=True),
    "olmoe-clip-bias": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=48,
                            clip_qkv=0.05, attention_bias=True),
}


def old_style(folder) -> None:
    """Also the expert-count spelling older configs use (Qwen3-MoE's Hub configs say num_experts)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config["model_type"] != "mixtral" and "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module", params=[(name, style) for name in CONFIGS for style in (False, True)],
                ids=lambda p: f"{p[0]}-{'old' if p[1] else 'new'}-keys")
def checkpoint(request, tmp_path_factory):
    name, old = request.param
    folder = tmp_path_factory.mktemp(name)
    build_tiny_checkpoint(folder, old_style_keys=old, **{**BASE, **CONFIGS[name]})
    if old:
        old_style(folder)
    return name, folder


def test_logits_match_transformers(checkpoint):
    _, folder = checkpoint
    check_logits_match(folder, VOCAB)


def test_cached_decoding_equals_full_forward(checkpoint):
    _, folder = checkpoint
    model = load_model(folder)
    length, prefix = 40, 33  # 33 tokens x top-k >= SORT_THRESHOLD pairs: the prefill sorts by expert
    assert prefix * 2 >= SORT_THRESHOLD
    check_cached_decoding(model, mx.array(random_tokens(VOCAB, length, seed=1)), prefix)


def router_choices(model, tokens: mx.array) -> list[mx.array]:
    """Expert indices each sparse layer picks for ``tokens``, from the hidden states it really sees."""
    h, choices = model.model.embed_tokens(tokens), []
    for layer in model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), None)
        x = layer.post_attention_layernorm(h)
        moe = layer.block_sparse_moe if "block_sparse_moe" in layer else layer.mlp
        if isinstance(moe, SparseMoeBlock):
            choices.append(moe.route(x)[0])
        h = h + moe(x)
    return choices


def test_routing_is_not_trivial(checkpoint):
    """The random init must exercise routing: tokens go to different experts, all of them used."""
    name, folder = checkpoint
    model = load_model(folder)
    choices = router_choices(model, mx.array(random_tokens(VOCAB, 48)))
    config = {**BASE, **CONFIGS[name]}
    num_experts = config.get("num_local_experts") or config["num_experts"]
    sparse_layers = [i for i in range(config["num_hidden_layers"]) if model.args.is_sparse(i)] \
        if hasattr(model.args, "is_sparse") else list(range(config["num_hidden_layers"]))
    assert len(choices) == len(sparse_layers) > 0
    for idx in choices:
        sets = {tuple(sorted(row)) for row in np.array(idx).reshape(-1, idx.shape[-1]).tolist()}
        assert len(sets) > 1, "every token picked the same experts"
        assert len(np.unique(np.array(idx))) == num_experts, "some expert is never used"


# --- transformers 5's fused expert layout (what its modules hold in memory) ---------------------------

FUSED_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def rewrite_fused(folder, num_experts: int) -> None:
    """Per-expert tensors -> ``mlp.experts.gate_up_proj [E, 2I, D]`` + ``mlp.experts.down_proj [E, D, I]``."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    block, gate, up, down = FUSED_NAMES[model_type]
    state, out = load_file(folder / "model.safetensors"), {}
    layers = sorted({k.split(".")[2] for k in state if f".{block}.experts.0." in k})
    for i in layers:
        p = f"model.layers.{i}.{block}.experts"

        def take(name, p=p):
            return torch.stack([state.pop(f"{p}.{e}.{name}.weight") for e in range(num_experts)])

        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([take(gate), take(up)], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = take(down)
    out.update({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in state.items()})
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["mixtral-gqa-untied", "qwen2_moe-sparse-step", "qwen3_moe-headdim", "olmoe-gqa"])
def test_fused_expert_layout(name, tmp_path):
    config = {**BASE, **CONFIGS[name]}
    folder = build_tiny_checkpoint(tmp_path, **config)
    tokens = random_tokens(VOCAB, 24, batch=2)
    before = reference_logits(folder, tokens)
    rewrite_fused(folder, config.get("num_local_experts") or config["num_experts"])
    assert any(".experts.gate_up_proj" in k for k in load_file(folder / "model.safetensors"))
    # transformers reads the rewritten file as the same model: the layout is the real one
    np.testing.assert_array_equal(reference_logits(folder, tokens), before)
    ours = np.array(load_model(folder)(mx.array(tokens)))
    np.testing.assert_allclose(ours, before, atol=TOLERANCE, rtol=0)


# --- MLX-community files: mlx-lm's quantized output loads unchanged and computes what mlx-lm computes --

@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_mlx_lm_quantized_checkpoint(model_type, tmp_path):
    from mlx_lm import convert
    from mlx_lm import load as mlx_lm_load

    from tests.tiny_configs import TINY_CONFIGS

    # mlx-lm 0.32 reads only the classic config keys, and its qwen3_moe needs head_dim spelled out
    config = {**TINY_CONFIGS[model_type], "head_dim": 16} if model_type == "qwen3_moe" else TINY_CONFIGS[model_type]
    src = build_tiny_checkpoint(tmp_path / "hf", old_style_keys=True, with_tokenizer=True, **config)
    old_style(src)
    dst = tmp_path / "mlx-4bit"
    convert(str(src), str(dst), quantize=True, q_group_size=64, q_bits=4)
    theirs, _ = mlx_lm_load(str(dst))
    ours = load_model(dst)
    moe = ours.layers[0].block_sparse_moe if model_type == "mixtral" else ours.layers[0].mlp
    assert type(moe.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    tokens = mx.array(random_tokens(config["vocab_size"], 40, batch=2))
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(theirs(tokens)), atol=TOLERANCE, rtol=0)


# --- sanitize as a pure function -----------------------------------------------------------------------

def tiny_model(model_type: str, **overrides):
    arch = get_architecture(model_type)
    variant = {k: v for k, v in CONFIGS[overrides.pop("name")].items() if k != "model_type"}
    config = {**BASE, **variant, **overrides}
    return arch.Model(arch.ModelArgs.from_dict(config))


def per_expert(prefix: str, names: tuple[str, str, str], E: int, D: int, I: int, suffixes=("weight",)):
    rng = np.random.default_rng(0)
    shapes = {names[0]: (I, D), names[1]: (I, D), names[2]: (D, I)}
    return {f"{prefix}.experts.{e}.{n}.{s}": mx.array(rng.standard_normal(shapes[n]).astype(np.float32))
            for e in range(E) for n in names for s in suffixes}


def test_sanitize_stacks_mixtral_experts():
    model = tiny_model("mixtral", name="mixtral-gqa-untied")
    src = {}
    for i in range(2):
        src.update(per_expert(f"model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2"), 4, 64, 96))
    src["model.layers.0.block_sparse_moe.gate.weight"] = mx.zeros((4, 64))
    src["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros((8,))
    out = model.sanitize(dict(src))
    prefix = "model.layers.1.block_sparse_moe"
    for name, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        stacked = out[f"{prefix}.switch_mlp.{dst}.weight"]
        assert stacked.shape[0] == 4
        assert mx.array_equal(stacked[2], src[f"{prefix}.experts.2.{name}.weight"])
    assert not any(".experts." in k or "rotary_emb" in k for k in out)
    assert "model.layers.0.block_sparse_moe.gate.weight" in out
    assert out["model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"].shape == (4, 64, 96)
    # MLX-format (already stacked) weights pass through untouched
    again = model.sanitize(dict(out))
    assert again.keys() == out.keys() and all(again[k] is out[k] for k in out)


def test_sanitize_stacks_quantized_per_expert_tensors():
    model = tiny_model("qwen3_moe", name="qwen3_moe-headdim")
    src = per_expert("model.layers.0.mlp", ("gate_proj", "up_proj", "down_proj"), 4, 64, 32,
                     suffixes=("weight", "scales", "biases"))
    out = model.sanitize(dict(src))
    for suffix in ("weight", "scales", "biases"):
        assert mx.array_equal(out[f"model.layers.0.mlp.switch_mlp.up_proj.{suffix}"][3],
                              src[f"model.layers.0.mlp.experts.3.up_proj.{suffix}"])


def test_sanitize_splits_fused_experts_and_skips_dense_layers():
    model = tiny_model("qwen2_moe", name="qwen2_moe-sparse-step")  # layers 1 and 3 sparse
    gate_up = mx.random.normal((4, 64, 64))  # [E, 2I, D], I = 32
    down = mx.random.normal((4, 64, 32))
    src = {"model.layers.1.mlp.experts.gate_up_proj": gate_up, "model.layers.1.mlp.experts.down_proj": down,
           "model.layers.0.mlp.gate_proj.weight": mx.zeros((96, 64)), "lm_head.weight": mx.zeros((VOCAB, 64))}
    out = model.sanitize(dict(src))
    assert mx.array_equal(out["model.layers.1.mlp.switch_mlp.gate_proj.weight"], gate_up[:, :32])
    assert mx.array_equal(out["model.layers.1.mlp.switch_mlp.up_proj.weight"], gate_up[:, 32:])
    assert out["model.layers.1.mlp.switch_mlp.down_proj.weight"] is down
    assert "model.layers.0.mlp.gate_proj.weight" in out and "lm_head.weight" in out
    tied = tiny_model("olmoe", name="olmoe-norm-mqa-tied")
    assert "lm_head.weight" not in tied.sanitize({"lm_head.weight": mx.zeros((VOCAB, 64))})


def test_sanitize_renames_transformers5_mixtral_names():
    model = tiny_model("mixtral", name="mixtral-gqa-untied")
    src = {"model.layers.0.mlp.gate.weight": mx.ones((4, 64)),
           "model.layers.0.mlp.experts.gate_up_proj": mx.zeros((4, 192, 64)),
           "model.layers.0.mlp.experts.down_proj": mx.zeros((4, 64, 96))}
    out = model.sanitize(src)
    assert sorted(out) == [
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight",
        "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight",
        "model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight",
    ]


# --- the router ----------------------------------------------------------------------------------------

def test_softmax_topk_matches_torch_and_mixtral_identity():
    logits = mx.random.normal((5, 7, 8), key=mx.random.key(3))
    t = torch.tensor(np.array(logits))
    for norm in (False, True):
        idx, w = softmax_topk(logits, 3, norm)
        probs = torch.softmax(t, dim=-1)
        top, top_idx = torch.topk(probs, 3, dim=-1)
        if norm:
            top = top / top.sum(-1, keepdim=True)
        order = np.argsort(np.array(idx), axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(np.array(idx), order, -1), np.sort(top_idx.numpy(), -1))
        ref = np.take_along_axis(top.numpy(), np.argsort(top_idx.numpy(), -1), -1)
        np.testing.assert_allclose(np.take_along_axis(np.array(w), order, -1), ref, atol=1e-6)
    # Mixtral's original form: softmax over the chosen logits only
    idx, w = softmax_topk(logits, 3, True)
    direct = mx.softmax(mx.take_along_axis(logits, idx, axis=-1), axis=-1)
    np.testing.assert_allclose(np.array(w), np.array(direct), atol=1e-6)


def test_bad_top_k_is_a_config_error():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_model("mixtral", name="mixtral-gqa-untied", num_experts_per_tok=5)


@pytest.mark.parametrize("tokens", [3, 48], ids=["gathered-decode", "sorted-prefill"])
def test_half_precision_experts_run_on_cpu(tokens):
    """MLX's CPU GatherMM takes only float32; bf16 experts must still run (as float32 products)."""
    from edge_llm.models.switch import SwitchGLU

    mx.random.seed(0)
    glu = SwitchGLU(64, 32, 4)
    glu.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, tokens, 64)).astype(mx.bfloat16)
    indices = mx.random.randint(0, 4, (1, tokens, 2))
    assert (indices.size >= SORT_THRESHOLD) == (tokens == 48)
    half = glu(x, indices)
    assert half.dtype == mx.bfloat16
    glu.set_dtype(mx.float32)  # the same bf16-rounded weights, in float32
    full = glu(x.astype(mx.float32), indices)
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), np.array(full), rtol=2e-2, atol=2e-2)
