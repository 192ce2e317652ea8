"""The memory estimator against figures computed by hand from public config.json values.

Each expected number below is written out from the published configs (Hugging Face model pages), not
taken from our code: parameters per component, then bytes per format. MLX affine g64 stores per 64
weights one scale and one offset in the float dtype: 4-bit = 4 + 2·16/64 = 4.5 bits, 8-bit = 8.5 bits.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cli.main import app
from quant.estimate import Machine, config_only, estimate_checkpoint
from quant.quantize import quantize
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS

GPU = Machine("metal", 64 * 10**9, "unified", 400e9)  # computes in the checkpoint's dtype
CPU = Machine("cpu", 64 * 10**9, "ram", None)  # computes in float32
Q4, Q8 = 4.5 / 8, 8.5 / 8  # bytes per quantized weight, g64 with 16-bit scales and offsets

LLAMA_2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float16")
DEEPSEEK_LLM_7B = dict(model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       torch_dtype="bfloat16")
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, torch_dtype="bfloat16")
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
DEEPSEEK_V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                        first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy",
                        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                        max_position_embeddings=163840, rope_theta=10000, rope_scaling=YARN,
                        tie_word_embeddings=False, torch_dtype="bfloat16")
DEEPSEEK_V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                   moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                   num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                   first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4,
                   topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                   max_position_embeddings=163840, rope_theta=10000,
                   rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0), num_nextn_predict_layers=1,
                   tie_word_embeddings=False, torch_dtype="bfloat16")


def rows(config, machine=GPU, context=4096, **kw):
    est = estimate_checkpoint(config_only(config, config["model_type"]), context=context, machine=machine, **kw)
    return est, {r.label: r for r in est.rows}


def dense_llama(vocab, hidden, inter, layers, kv_heads, heads=32):
    """(params, norm params) of a Llama-family model with untied embeddings."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    norms = 2 * hidden * layers + hidden
    return layers * per_layer + 2 * vocab * hidden + hidden, norms


def test_llama_2_7b():
    params, norms = dense_llama(32000, 4096, 11008, 32, kv_heads=32)
    assert params == 6_738_415_616  # "7B"
    est, r = rows(LLAMA_2_7B, bits=4)
    assert est.params_total == est.params_active == params
    assert r["fp32"].weights_bytes == params * 4
    assert r["fp16"].weights_bytes == params * 2 == r["fp32"].weights_bytes // 2  # FP16 is half of FP32
    assert r["8-bit"].weights_bytes == (params - norms) * Q8 + norms * 2 == 7_159_816_192
    assert r["4-bit"].weights_bytes == (params - norms) * Q4 + norms * 2 == 3_790_741_504
    # KV cache: 2 (K and V) x 32 layers x 32 heads x 128 head_dim x 2 bytes per token, 4096 tokens
    assert r["4-bit"].kv_cache_bytes == 2 * 32 * 32 * 128 * 2 * 4096 == 2_147_483_648


def test_a_4bit_7b_model_needs_about_4_gb():
    _, r = rows(LLAMA_2_7B, context=256, bits=4)
    assert 3.7e9 < r["4-bit"].weights_bytes < 3.9e9
    assert 3.8e9 < r["4-bit"].total_bytes < 4.5e9  # weights + a short context + the runtime: about 4 GB
    assert r["4-bit"].total_bytes < r["8-bit"].total_bytes < r["fp16"].total_bytes


def test_deepseek_llm_7b():
    params, norms = dense_llama(102400, 4096, 11008, 30, kv_heads=32)
    assert params == 6_910_365_696
    est, r = rows(DEEPSEEK_LLM_7B)
    assert est.params_total == params
    assert r["bf16"].weights_bytes == 2 * params and r["bf16"].requested  # no --bits: the config's dtype
    assert r["4-bit"].weights_bytes == (params - norms) * Q4 + norms * 2
    assert r["bf16"].kv_cache_bytes == 2 * 30 * 32 * 128 * 2 * 4096


def test_mixtral_8x7b():
    hidden, inter, layers, experts = 4096, 14336, 32, 8
    attn = 2 * hidden * hidden + 2 * hidden * 8 * 128  # q, o; k, v with 8 kv heads
    expert_params = layers * experts * 3 * hidden * inter
    routers = layers * experts * hidden
    norms = 2 * hidden * layers + hidden
    params = layers * attn + expert_params + routers + norms + 2 * 32000 * hidden
    assert params == 46_702_792_704
    est, r = rows(MIXTRAL_8X7B)
    assert est.params_total == params
    assert est.params_active == params - expert_params + expert_params * 2 // 8 == 12_879_925_248
    # routers stay at 8 bits when everything else is 4-bit
    assert r["4-bit"].weights_bytes == (params - norms - routers) * Q4 + routers * Q8 + norms * 2
    assert r["4-bit"].kv_cache_bytes == 2 * 32 * 8 * 128 * 2 * 4096  # GQA: 8 kv heads
    # a decode step reads 2 of 8 experts: far less than the whole model
    assert r["4-bit"].bytes_per_token < 0.35 * r["4-bit"].weights_bytes + r["4-bit"].kv_cache_bytes


def test_deepseek_v2_lite():
    hidden, layers = 2048, 27
    attn = hidden * 16 * 192 + hidden * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * hidden  # q, kv_a, kv_b, o
    norms = layers * (2 * hidden + 512) + hidden  # + kv_a_layernorm
    dense = 3 * hidden * 10944
    routed = 64 * 3 * hidden * 1408
    shared = 3 * hidden * 2 * 1408
    routers = 64 * hidden
    params = 2 * 102400 * hidden + layers * attn + dense + 26 * (routed + shared + routers) + norms
    assert params == 15_706_484_224  # "16B"
    est, r = rows(DEEPSEEK_V2_LITE)
    assert est.params_total == params
    assert est.params_active == params - 26 * routed + 26 * routed * 6 // 64
    floats = norms + 26 * routers  # DeepSeek's router is not a quantizable layer: it stays float
    assert r["4-bit"].weights_bytes == (params - floats) * Q4 + floats * 2
    # MLA caches one latent per token for all heads: 27 x (512 + 64) x 2 bytes
    assert r["4-bit"].kv_cache_bytes == 27 * (512 + 64) * 2 * 4096 == 127_401_984


def test_deepseek_v3():
    hidden, layers, moe_layers = 7168, 61, 58
    attn = (hidden * 1536 + 1536 * 128 * 192 + hidden * (512 + 64) + 512 * 128 * (128 + 128)
            + 128 * 128 * hidden)  # q_a, q_b, kv_a, kv_b, o
    norms = layers * (2 * hidden + 1536 + 512) + hidden  # + q_a_layernorm, kv_a_layernorm
    dense = 3 * hidden * 18432
    routed = 256 * 3 * hidden * 2048
    shared = 3 * hidden * 2048
    routers = 256 * hidden + 256  # + e_score_correction_bias
    params = 2 * 129280 * hidden + layers * attn + 3 * dense + moe_layers * (routed + shared + routers) + norms
    assert params == 671_026_419_200  # "671B" (the 14B multi-token-prediction layer is not loaded)
    est, r = rows(DEEPSEEK_V3, bits=4)
    assert est.params_total == params
    assert est.params_active == params - moe_layers * routed + moe_layers * routed * 8 // 256 == 37_552_297_472
    floats = norms + moe_layers * routers
    assert r["4-bit"].weights_bytes == (params - floats) * Q4 + floats * 2 == 377_606_822_912
    assert r["4-bit"].kv_cache_bytes == 61 * (512 + 64) * 2 * 4096
    assert r["bf16"].weights_bytes * 2 == r["fp32"].weights_bytes
    assert not r["4-bit"].fits  # not on a 64 GB machine


def test_cpu_computes_in_float32_over_stored_weights():
    """The CPU loader's policy (edge_llm.machine.backend.DtypePolicy): activations, KV cache, vectors and the
    token embedding's scales in float32; matrices and other quantization scales as stored."""
    params, norms = dense_llama(32000, 4096, 11008, 32, kv_heads=32)
    embed = 32000 * 4096
    _, r = rows(LLAMA_2_7B, machine=CPU)
    assert r["fp32"].weights_bytes == params * 4
    assert r["fp16"].weights_bytes == (params - norms) * 2 + norms * 4
    assert r["fp16"].file_bytes == params * 2
    groups, embed_groups = (params - norms - embed) // 64, embed // 64
    assert r["4-bit"].weights_bytes == (params - norms) // 2 + groups * 2 * 2 + embed_groups * 2 * 4 + norms * 4
    assert r["4-bit"].kv_cache_bytes == 2 * 32 * 32 * 128 * 4 * 4096


def test_context_batch_and_kv_bits():
    _, base = rows(MIXTRAL_8X7B, context=1000)
    per_token = 2 * 32 * 8 * 128 * 2
    assert base["4-bit"].kv_cache_bytes == per_token * 1024  # the cache grows in steps of 256 tokens
    _, batched = rows(MIXTRAL_8X7B, context=1000, batch=3)
    assert batched["4-bit"].kv_cache_bytes == 3 * per_token * 1024
    est, q8 = rows(MIXTRAL_8X7B, context=1024, kv_bits=8)
    elements = per_token // 2 * 1024
    assert q8["4-bit"].kv_cache_bytes == elements + elements // 64 * 2 * 2  # codes + a scale and offset per 64
    assert any("--kv-bits 8" in note for note in est.notes)
    with pytest.raises(ValueError, match="--kv-bits"):
        rows(MIXTRAL_8X7B, kv_bits=3)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_estimate_equals_quantize_output_for_every_architecture(arch, tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src", **TINY_CONFIGS[arch])
    est, r = rows(json.loads((src / "config.json").read_text()), group_size=32)
    from edge_llm.formats.open import open_checkpoint

    for bits in (4, 8):
        result = quantize(src, tmp_path / f"q{bits}", bits=bits, group_size=32, dtype="float16")
        assert r[f"{bits}-bit"].file_bytes == result.output_bytes
    stored = estimate_checkpoint(open_checkpoint(tmp_path / "q4"), machine=GPU).requested
    # read back from the written headers, the stored model is what was planned
    assert stored.label == "4-bit (stored)" and stored.file_bytes == r["4-bit"].file_bytes
    assert stored.weights_bytes == r["4-bit"].weights_bytes and stored.kv_cache_bytes == r["4-bit"].kv_cache_bytes


def test_rough_mode():
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--params", "7B", "--arch", "llama2", "--bits", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["exact"] is False and data["shape_of"] == "Llama-2-7B" and data["params_total"] == 7_000_000_000
    assert math.isclose(data["file_bytes"], 3_790_741_504 * 7e9 / 6_738_415_616, rel_tol=1e-6)
    result = runner.invoke(app, ["estimate", "--params", "lots", "--arch", "llama"])
    assert result.exit_code == 1 and "--params" in result.stderr
    result = runner.invoke(app, ["estimate", "--params", "7B", "--arch", "gpt9"])
    assert result.exit_code == 1 and "--arch" in result.stderr


def test_cli_json_and_table(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src", with_tokenizer=True, **TINY_CONFIGS["mixtral"])
    result = CliRunner().invoke(app, ["estimate", str(src), "--bits", "4", "--context", "512", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes", "fits", "params_total",
                "params_active"):
        assert key in data
    assert data["total_bytes"] == data["weights_bytes"] + data["kv_cache_bytes"] + data["overhead_bytes"]
    assert data["params_active"] < data["params_total"] and data["fits"] is True
    assert [r["label"] for r in data["rows"]] == ["fp32 (stored)", "fp16", "8-bit", "4-bit"]
    assert [r["requested"] for r in data["rows"]] == [False, False, False, True]
    table = CliRunner().invoke(app, ["estimate", str(src), "--context", "512"])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert any(line.lstrip().startswith("▶ fp32 (stored)") for line in lines)  # no --bits: the model as it is
    assert "fits:" in table.stdout and "decode speed ceiling" in table.stdout


def test_missing_model_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such model folder" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["estimate", str(tmp_path), "--params", "7B"])  # no MODEL: the default model
    assert result.exit_code == 1 and "either MODEL or --params" in result.stderr
