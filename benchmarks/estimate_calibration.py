"""Memory estimate vs measured peak RSS of ``edge-llm run`` (the estimator's calibration).

For each model and context: run ``edge-llm run MODEL --prompt P --json`` in a fresh process (peak RSS
from ``wait4``), then ask ``quant.estimate`` for the same model at the context the run reached
(prompt + generated tokens) and compare. Models: SmolLM2-135M-Instruct quantized to 4-bit by
``edge-llm quantize``, and a ~0.45B DeepSeek-V2-Lite-shaped MoE (MLA + 32 routed experts + a shared
expert) and a ~0.4B Mixtral-shaped MoE, both random bf16 quantized to 4-bit the same way.

Usage: ``python -m benchmarks.estimate_calibration [--contexts 64 1024 3000] [--no-write]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks.harness import measure, write_section
from edge_llm.loader import build_model
from quant.estimate import Machine, config_only, estimate_checkpoint
from quant.quality import SAMPLE
from quant.quantize import quantize

WORK = Path("/tmp/edge-llm-estimate-calibration")

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
    from tests.tiny_tokenizer import write_tiny_tokenizer

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
    from quant.plan import plan_quantized, source_dtype_of
    from quant.quantize import output_config
    from quant.recipes import make_recipe
    from quant.writer import ShardWriter, assign_shards
    from tests.tiny_tokenizer import write_tiny_tokenizer

    checkpoint = config_only(config, str(folder))
    plan = plan_quantized(build_model(checkpoint), checkpoint.config, make_recipe(bits, group_size), "BF16",
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


def moe_4bit(name: str, work: Path = WORK) -> Path:
    """The 4-bit MoE of shape ``name``, built (random bf16, then ``quantize``) once and kept in ``work``."""
    out = work / f"{name}-4bit"
    if not (out / "config.json").is_file():
        src = build_random_checkpoint(work / f"{name}-bf16", MOE_SHAPES[name])
        quantize(src, out, bits=4, group_size=64, force=True)
    return out


def prompt_of(tokens: int) -> str:
    """About ``tokens`` tokens of text (the chat template adds a few dozen)."""
    text = (SAMPLE + "\n") * (1 + tokens // 300)
    words = text.split(" ")
    return " ".join(words[: max(1, int(tokens * 0.75))])


def run_and_estimate(model: Path, prompt_tokens: int, max_tokens: int = 8) -> dict:
    cmd = [sys.executable, "-m", "cli.main", "run", str(model), "--prompt", prompt_of(prompt_tokens),
           "--max-tokens", str(max_tokens), "--temp", "0", "--json", "--force"]
    run = measure(cmd)
    data = json.loads(run.stdout)
    context = data["prompt_tokens"] + data["generation_tokens"]
    from quant.remote import locate

    checkpoint, folder = locate(str(model))
    est = estimate_checkpoint(checkpoint, context=context, machine=Machine.this(), folder=folder).requested
    return {"context": context, "rss": run.max_rss_bytes, "mlx_peak": data["peak_memory_bytes"],
            "estimate": est.total_bytes, "weights": est.weights_bytes, "kv": est.kv_cache_bytes,
            "overhead": est.overhead_bytes}


def smollm2_4bit(work: Path = WORK) -> Path:
    from tests.smollm2 import convert_to_hf_folder

    out = work / "smollm2-4bit"
    if not (out / "config.json").is_file():
        src = work / "smollm2-bf16"
        if not (src / "config.json").is_file():
            convert_to_hf_folder(src)
        quantize(src, out, bits=4, group_size=64, force=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 3000])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    models = {"SmolLM2-135M 4-bit": smollm2_4bit()}
    models.update({f"{name} 4-bit": moe_4bit(name) for name in MOE_SHAPES})
    lines = ["| model | context | measured peak RSS | estimate | error | MLX peak | weights | KV cache | runtime |",
             "|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for label, path in models.items():
        for tokens in args.contexts:
            r = run_and_estimate(path, tokens)
            err = r["estimate"] / r["rss"] - 1
            errors.append(abs(err))
            print(f"{label} ctx {r['context']}: rss {r['rss'] / 1e6:.1f} MB, estimate {r['estimate'] / 1e6:.1f} MB "
                  f"({err:+.1%}); mlx peak {r['mlx_peak'] / 1e6:.1f}, weights {r['weights'] / 1e6:.1f}, "
                  f"kv {r['kv'] / 1e6:.1f}, runtime {r['overhead'] / 1e6:.1f}", flush=True)
            lines.append(f"| {label} | {r['context']} | {r['rss'] / 1e6:.1f} MB | {r['estimate'] / 1e6:.1f} MB | "
                         f"{err:+.1%} | {r['mlx_peak'] / 1e6:.1f} MB | {r['weights'] / 1e6:.1f} MB | "
                         f"{r['kv'] / 1e6:.1f} MB | {r['overhead'] / 1e6:.1f} MB |")
    summary = f"Largest error: {max(errors):.1%} (target 5%, tested at 10% in tests/test_estimate_calibration.py)."
    print(summary)
    if not args.no_write:
        write_section("Memory estimate vs measured peak RSS (edge-llm run)", "\n".join([
            "Command: `python -m benchmarks.estimate_calibration " + " ".join(sys.argv[1:]) + "`", "",
            *lines, "", summary,
            "Measured: the peak resident set of a fresh `edge-llm run MODEL --prompt P --max-tokens 8 --json` "
            "process (wait4 ru_maxrss). Estimate: `quant.estimate` for the same model at the context the run "
            "reached (prompt + generated tokens), on this machine's backend (CPU: float32 compute).",
        ]))


if __name__ == "__main__":
    main()
