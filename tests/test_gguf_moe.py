"""Mixture-of-Experts GGUF files (Mixtral as llama.cpp's ``llama`` with experts, ``qwen2moe``, ``qwen3moe``,
``olmoe``) against transformers: stacked expert tensors map onto our ``switch_mlp``.

Each tiny random transformers model is written as llama.cpp's converter writes it (tests/gguf_files.py:
stacked ``ffn_*_exps``, routers in F32, q/k permuted for ``llama`` only). Where transformers reads
that architecture from GGUF itself (Qwen2-MoE, Qwen3-MoE), it checks the writer too.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM

from edge_llm.formats.open import open_checkpoint
from edge_llm.loader import load_checkpoint
from edge_llm.modelinfo import describe
from edge_llm.models import supported_model_types
from tests.gguf_files import write_gguf
from tests.tiny_configs import TINY_CONFIGS

TOKENS = np.array([[1, 17, 250, 3, 99, 4, 380, 42, 7, 7, 150, 0, 201, 33, 64, 12]])
MOE_TYPES = [t for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe") if t in supported_model_types()]


def tiny(model_type: str, seed: int = 0, **overrides):
    config = {**TINY_CONFIGS[model_type], **overrides}
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # routers decisive enough that rounding never flips a choice
                p.mul_(50)
    return model


def logits_of(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def ours(path) -> np.ndarray:
    model = load_checkpoint(open_checkpoint(path), dtype="float32")
    return np.array(model(mx.array(TOKENS)))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0, Q.Q5_0])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_logits_equal_transformers(tmp_path, model_type, qtype):
    path = tmp_path / f"{model_type}.gguf"
    reference = write_gguf(path, tiny(model_type), qtype)
    checkpoint = open_checkpoint(path)
    assert checkpoint.model_type == model_type
    experts = [n for n in checkpoint.tensors if ".switch_mlp." in n]
    assert experts and all(checkpoint.tensors[n].shape[0] == 4 for n in experts)  # stacked [E, ...]
    np.testing.assert_allclose(ours(path), logits_of(reference), atol=1e-4, rtol=0)


@pytest.mark.skipif("qwen3_moe" not in MOE_TYPES, reason="qwen3_moe not supported")
def test_writer_matches_transformers_gguf_reader(tmp_path):
    """transformers reads our Qwen3-MoE file back into the source model: the writer follows llama.cpp.

    (Its GGUF reader ignores ``expert_feed_forward_length`` and keeps the config default, 768, so the
    model uses that size. Its Qwen2-MoE reading also misshapes the shared-expert gate: not usable here.)
    """
    source = tiny("qwen3_moe", seed=1, moe_intermediate_size=768)
    path = tmp_path / "qwen3_moe.gguf"
    write_gguf(path, source, Q.F32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    np.testing.assert_allclose(logits_of(theirs), logits_of(source), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours(path), logits_of(source), atol=1e-4, rtol=0)


@pytest.mark.skipif("mixtral" not in MOE_TYPES, reason="mixtral not supported")
def test_mixtral_per_expert_tensors(tmp_path):
    """Older Mixtral GGUFs store one tensor per expert (blk.N.ffn_gate.E); the model stacks them."""
    path = tmp_path / "mixtral-old.gguf"
    reference = write_gguf(path, tiny("mixtral", seed=2), Q.Q8_0, per_expert=True)
    assert "blk.0.ffn_gate.3.weight" in open_checkpoint(path).gguf.tensors
    np.testing.assert_allclose(ours(path), logits_of(reference), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_parameter_counts(tmp_path, model_type):
    source = tiny(model_type)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(path, source, Q.Q4_0)
    info = describe(open_checkpoint(path))
    assert info.params_total == sum(p.numel() for p in source.parameters())
    assert info.experts == (2, 4)
    assert info.params_active < info.params_total


DEEPSEEK_TYPES = [t for t in ("deepseek_v2", "deepseek_v3") if t in supported_model_types()]


@pytest.mark.parametrize("split_kv_b", [True, False], ids=["k_b+v_b", "kv_b"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
@pytest.mark.parametrize("model_type", DEEPSEEK_TYPES)
def test_deepseek_logits_equal_transformers(tmp_path, model_type, qtype, split_kv_b):
    """llama.cpp's deepseek2: MLA tensors, dense first layer, shared experts, V3's router bias; files from
    2025 on split kv_b_proj into attn_k_b (transposed) + attn_v_b, older ones keep attn_kv_b."""
    source = tiny(model_type)
    if model_type == "deepseek_v3":
        with torch.no_grad():  # a bias that changes which experts win
            for name, p in source.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(torch.randn_like(p))
    path = tmp_path / f"{model_type}.gguf"
    reference = write_gguf(path, source, qtype, split_kv_b=split_kv_b)
    checkpoint = open_checkpoint(path)
    assert checkpoint.model_type == model_type
    assert "attn_k_b" in " ".join(checkpoint.gguf.tensors) if split_kv_b else "attn_kv_b" in " ".join(
        checkpoint.gguf.tensors)
    weights = checkpoint.load_weights()
    assert set(weights) == set(checkpoint.tensors)
    for name, info in checkpoint.tensors.items():
        assert tuple(weights[name].shape) == info.shape, name
    np.testing.assert_allclose(ours(path), logits_of(reference), atol=1e-4, rtol=0)
    # what a safetensors checkpoint of the model holds (V3's router bias is a buffer, not a parameter)
    assert describe(checkpoint).params_total == sum(t.numel() for t in source.state_dict().values())


@pytest.mark.skipif("deepseek_v2" not in DEEPSEEK_TYPES, reason="deepseek_v2 not supported")
def test_deepseek_yarn_and_q_lora(tmp_path):
    """V2-Lite-like rope: yarn with mscale (llama.cpp keeps 0.1 * mscale_all_dim); q through q_a/q_b."""
    rope = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 0.707,
            "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}  # fmt: skip
    source = tiny("deepseek_v2", q_lora_rank=32, rope_parameters=rope, max_position_embeddings=2560)
    path = tmp_path / "v2lite.gguf"
    reference = write_gguf(path, source, Q.Q4_0)
    config = open_checkpoint(path).config
    assert config["rope_scaling"]["mscale_all_dim"] == pytest.approx(0.707)
    assert config["q_lora_rank"] == 32
    np.testing.assert_allclose(ours(path), logits_of(reference), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", MOE_TYPES + DEEPSEEK_TYPES)
def test_quantized_moe_file_converts_to_mlx_safetensors(tmp_path, model_type):
    """``quantize FILE.gguf`` keeps the stacked experts' Q4_0 as they are (a DeepSeek k_b/v_b pair becomes a
    float kv_b_proj, as the runtime joins it); only the float vectors round to float16."""
    from quant.quantize import quantize

    path = tmp_path / f"{model_type}.gguf"
    write_gguf(path, tiny(model_type), Q.Q4_0, **({"split_kv_b": True} if model_type in DEEPSEEK_TYPES else {}))
    result = quantize(path, tmp_path / "out")
    assert result.recipe.startswith("as in the GGUF, 4-bit, group 32")
    assert result.output_bytes < 1.2 * result.source_bytes
    np.testing.assert_allclose(ours(tmp_path / "out"), ours(path), atol=2e-3, rtol=0)
