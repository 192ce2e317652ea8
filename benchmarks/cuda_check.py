"""The CUDA path, proven on an NVIDIA GPU: parity with transformers there, then speed and bandwidth use.

Run on a machine with ``mlx[cuda13]`` (see benchmarks/cuda_run.sh, which installs carried wheels):

    python -m benchmarks.cuda_check --fixtures .gpu --out OUT [--quick]

1. Backend facts (edge_llm.machine.backend.detect, mx.device_info).
2. Parity on the GPU: tiny random checkpoints of several architectures, built here on the CPU with
   transformers (``--make-fixtures``), whose transformers fp32 logits travel beside them. On the GPU we
   compare our float32 logits with them, check cached step-by-step decoding against the full forward,
   and report the bfloat16 drift.
3. Speed: a DeepSeek-V2-Lite-shaped 0.4B MoE (benchmarks/moe_bench.py's shape, random bf16 weights)
   and a 1.5B dense Llama, each as bf16 and as our 4-bit (group 64): ``edge-llm bench`` figures
   (prefill 128/512/2048, decode, bandwidth fraction against the GPU's measured bandwidth), and the
   MoE 4-bit beside mlx-lm on the same folder through the same driver (fresh processes, A B A B).
Everything lands in OUT/cuda_results.json and is printed as markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

FIXTURE_CONFIGS = {
    "llama-gqa": dict(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
    "mixtral": dict(model_type="mixtral", vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek-v2": dict(model_type="deepseek_v2", vocab_size=384, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        topk_method="greedy"),
}
DENSE_SHAPE = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                   num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)  # TinyLlama-1.1B's shape


def make_fixtures(folder: Path) -> None:
    """On the CPU, with transformers: tiny checkpoints plus their reference logits."""
    import numpy as np

    from tests.hf_oracle import build_tiny_checkpoint, random_tokens, reference_logits

    for name, config in FIXTURE_CONFIGS.items():
        dst = folder / name
        shutil.rmtree(dst, ignore_errors=True)
        build_tiny_checkpoint(dst, with_tokenizer=True, **config)
        tokens = random_tokens(config["vocab_size"], 24, batch=2)
        np.save(dst / "tokens.npy", tokens)
        np.save(dst / "logits.npy", reference_logits(dst, tokens))


def parity(fixtures: Path) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    from edge_llm import load, load_model
    from edge_llm.generation.generate import stream_generate
    from edge_llm.generation.sampling import SamplingParams

    rows = []
    for folder in sorted(p for p in fixtures.iterdir() if (p / "logits.npy").is_file()):
        tokens, ref = np.load(folder / "tokens.npy"), np.load(folder / "logits.npy")
        model = load_model(folder, dtype="float32")
        full = model(mx.array(tokens))
        cache = model.make_cache()
        steps = [model(mx.array(tokens[:1, :5]), cache=cache)]
        steps += [model(mx.array(tokens[:1, i : i + 1]), cache=cache) for i in range(5, tokens.shape[1])]
        stepped = mx.concatenate(steps, axis=1)
        half = load_model(folder, dtype="bfloat16")(mx.array(tokens)).astype(mx.float32)
        model, tokenizer = load(folder)
        chunks = list(stream_generate(model, tokenizer, tokenizer.encode_chat([{"role": "user", "content": "hi"}]),
                                      params=SamplingParams(temperature=0), max_tokens=8))
        rows.append({
            "fixture": folder.name,
            "fp32_max_abs_diff_vs_transformers": float(np.abs(np.array(full) - ref).max()),
            "cached_vs_full_max_abs_diff": float(np.abs(np.array(stepped) - np.array(full[:1])).max()),
            "bf16_max_abs_diff_vs_transformers": float(np.abs(np.array(half) - ref).max()),
            "generated_tokens": chunks[-1].stats.generation_tokens + (chunks[-1].stats.finish_reason == "stop"),
        })
        print(rows[-1], flush=True)
    return rows


def random_checkpoint(folder: Path, config: dict, arch_module, dtype: str = "bfloat16") -> Path:
    """Random weights of ``config``'s shape (norms at 1), saved as a Hugging Face folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = arch_module.Model(arch_module.ModelArgs.from_dict(config))
    weights = {k: (mx.ones(v.shape) if v.ndim == 1 else mx.random.normal(v.shape) * 0.02).astype(getattr(mx, dtype))
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    return folder


def bench(folder: Path, lengths: tuple[int, ...], decode: int) -> dict:
    """``edge-llm bench`` figures; a failure is recorded (what broke is a finding too), not fatal."""
    from edge_llm.bench import run_bench

    try:
        r = run_bench(folder, lengths, decode).to_dict()
    except RuntimeError as e:
        r = {"model": str(folder), "error": str(e)}
    print(json.dumps(r), flush=True)
    return r


def speed(work: Path, quick: bool, save, cases: set[str]) -> dict:
    from benchmarks import moe_bench
    from benchmarks.harness import alternate
    from edge_llm.models import deepseek_v2, llama
    from quant.quantize import quantize

    lengths, decode = ((128,), 16) if quick else ((128, 512, 2048), 128)
    moe_shape = dict(moe_bench.SHAPE, num_hidden_layers=2) if quick else moe_bench.SHAPE
    dense_shape = dict(DENSE_SHAPE, num_hidden_layers=2) if quick else DENSE_SHAPE
    out = {}
    for name, shape, arch in (("moe", moe_shape, deepseek_v2), ("dense", dense_shape, llama)):
        if not cases & {f"{name}-bf16", f"{name}-4bit"}:
            continue
        bf16 = random_checkpoint(work / f"{name}-bf16", shape, arch)
        q4 = work / f"{name}-4bit"
        if not q4.exists():
            quantize(bf16, q4, bits=4, group_size=64)
        out[name] = {dtype: bench(folder, lengths, decode)
                     for dtype, folder in (("bf16", bf16), ("4bit", q4)) if f"{name}-{dtype}" in cases}
        save(out)
    if "side-by-side" not in cases:
        return out
    context = 128 if quick else 2048
    start = time.perf_counter()
    try:
        side_by_side = alternate({
            "edge-llm": lambda: moe_bench.run_once("edge-llm", work / "moe-4bit", context, decode),
            "mlx-lm": lambda: moe_bench.run_once("mlx-lm", work / "moe-4bit", context, decode),
        }, rounds=1 if quick else 2)
    except RuntimeError as e:  # e.g. mlx-lm missing what it imports on that machine: keep what we have
        out["moe_4bit_vs_mlx_lm"] = {"error": str(e)[-1500:]}
        return out
    out["moe_4bit_vs_mlx_lm"] = {
        "context": context, "decode_steps": decode, "seconds": time.perf_counter() - start,
        **{tool: {k: s.median for k, s in metrics.items()} for tool, metrics in side_by_side.items()},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=Path(".gpu"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/cuda-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cuda-work"))
    parser.add_argument("--make-fixtures", action="store_true", help="build the fixtures here (CPU, transformers)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--cases", default="moe-bf16,moe-4bit,dense-bf16,dense-4bit,side-by-side",
                        help="which speed cases to run (comma-separated)")
    parser.add_argument("--skip-parity", action="store_true")
    a = parser.parse_args()
    if a.make_fixtures:
        make_fixtures(a.fixtures)
        return
    import mlx.core as mx

    from edge_llm.machine.backend import detect

    a.out.mkdir(parents=True, exist_ok=True)
    results = {"backend": asdict(detect()), "device_info": {k: str(v) for k, v in mx.device_info().items()}}
    print(results, flush=True)
    results["parity"] = [] if a.skip_parity else parity(a.fixtures)
    (a.out / "cuda_results.json").write_text(json.dumps(results, indent=2))

    def save(partial: dict) -> None:
        (a.out / "cuda_results.json").write_text(json.dumps({**results, "speed": partial}, indent=2))

    results["speed"] = speed(a.work, a.quick, save, set(a.cases.split(",")))
    save(results["speed"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
