"""Models and runs the memory estimate is checked on: ``tests/test_estimate_calibration.py`` and the
calibration benchmark (``benchmarks/estimate_calibration.py``, which measures more and fits ``CALIBRATION``).

- ``MOE_SHAPES``: a ~0.45B DeepSeek-V2-Lite-shaped MoE (MLA + 32 routed experts + a shared one) and a
  ~0.4B Mixtral-shaped one;
- ``build_random_checkpoint`` / ``build_random_quantized``: such a model with random bf16 weights, or
  straight in 4-bit MLX form (the tensors ``quantize`` writes, random values, in seconds);
- ``run_and_estimate``: a fresh ``edge-llm run MODEL --prompt P --json`` process (peak RSS from ``wait4``)
  and the estimate for the same model at the context the run reached.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from edge_llm.hub.resolve import read_model_headers
from edge_llm.loader import build_model
from edge_llm.tokenizer import Tokenizer
from quant.estimate import Machine, config_only, estimate_checkpoint
from quant.plan import plan_quantized, source_dtype_of
from quant.quality import SAMPLE
from quant.quantize import output_config
from quant.recipes import make_recipe
from quant.writer import ShardWriter, assign_shards
from tests.peak_rss import measure
from tests.tiny_tokenizer import write_tiny_tokenizer

MOE_SHAPES = {
    "deepseek-v2-lite-shaped": dict(
        model_type="deepseek_v2", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        moe_intermediate_size=512, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        kv_lora_rank=256, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        topk_method="greedy", max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
        torch_dtype="bfloat16"),
    "mixtral-shaped": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
        torch_dtype="bfloat16"),
}


def build_random_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """A bf16 checkpoint of ``config`` with random weights (in the loader's names) and the tiny tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(config_only(config, str(folder)))
    mx.random.seed(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if p.ndim == 1:  # norms and biases
            weights[name] = (1 + 0.02 * mx.random.normal(p.shape)).astype(mx.bfloat16)
        else:
            weights[name] = (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(mx.bfloat16)
        mx.eval(weights[name])
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tiny_tokenizer(folder)
    return folder


def build_random_quantized(folder: Path, config: dict, bits: int = 4, group_size: int = 64, seed: int = 0) -> Path:
    """A ``bits``-bit MLX checkpoint of ``config`` with random codes, scales and offsets, written in seconds.

    The tensors are exactly those ``quantize`` writes (the same plan and writer), so its memory at run
    time is that of a real quantized model; only the values are noise.
    """
    checkpoint = config_only(config, str(folder))
    plan = plan_quantized(build_model(checkpoint), make_recipe(bits, group_size), "BF16",
                          source_dtype_of(checkpoint))
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, assign_shards(plan.tensors))
    mx.random.seed(seed)
    for t in plan.tensors:
        if t.dtype == "U32":
            value = mx.random.randint(0, 2**31 - 1, t.shape).astype(mx.uint32)
        elif t.kind == "scales":
            value = mx.random.uniform(0.001, 0.01, t.shape)
        elif t.kind == "biases":
            value = mx.random.uniform(-0.05, -0.01, t.shape)
        elif len(t.shape) == 1:
            value = mx.ones(t.shape)
        else:
            value = mx.random.normal(t.shape) * t.shape[-1] ** -0.5
        writer.write(t.name, value.astype(mx.uint32 if t.dtype == "U32" else {"BF16": mx.bfloat16, "F16": mx.float16,
                                                                               "F32": mx.float32}[t.dtype]))
    writer.close()
    writer.write_index(plan.params_total)
    (folder / "config.json").write_text(json.dumps(output_config(config, plan), indent=2))
    write_tiny_tokenizer(folder)
    return folder


def prompt_of(tokens: int, model: Path) -> str:
    """Text of ``tokens`` tokens in ``model``'s tokenizer (the chat template adds a few dozen)."""
    tokenizer = Tokenizer.load(model)
    text = (SAMPLE + "\n") * (1 + tokens // 100)
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:tokens])


def run_and_estimate(model: Path, prompt_tokens: int, max_tokens: int = 8) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "run", str(model), "--prompt", prompt_of(prompt_tokens, model),
           "--max-tokens", str(max_tokens), "--temp", "0", "--json"]
    run = measure(cmd)
    data = json.loads(run.stdout)
    context = data["prompt_tokens"] + data["generation_tokens"]
    found = read_model_headers(str(model))
    est = estimate_checkpoint(found.named, context=context, machine=Machine.this(), folder=found.folder).requested
    return {"model": str(model), "context": context, "rss": run.max_rss_bytes, "mlx_peak": data["peak_memory_bytes"],
            "estimate": est.total_bytes, "weights": est.weights_bytes, "kv": est.kv_cache_bytes,
            "overhead": est.overhead_bytes, "terms": dataclasses.asdict(est.runtime)}
