"""A DeepSeek-V2-Lite-shaped MoE (~0.4B parameters, random bf16 weights): edge-llm beside mlx-lm.

The model keeps V2-Lite's structure (MLA with q_lora_rank None and kv_lora_rank 512, 16 heads of 128+64 / 128,
64 routed experts top-6 plus 2 shared, first_k_dense_replace 1, its YaRN rope and 102400-token vocabulary)
with fewer layers and narrower hidden/intermediate sizes. It is written once as a bf16 safetensors folder in
the Hub layout (per-expert tensors, old-style config keys, which is all mlx-lm 0.32 reads) with a small
tokenizer, so each tool's own quantizer can convert it: ``edge-llm quantize`` and ``mlx_lm convert -q``.

Each measurement is a fresh process (``--worker``) that loads a folder and runs the tool's own generation
loop at its default settings on the same random prompt: ``edge_llm.generation.generate.generate_tokens`` and
``mlx_lm.generate.generate_step`` (greedy). Prefill tok/s is prompt tokens / time to the first token;
decode tok/s counts the steps after it. MLX's peak allocation covers the whole process (load included, as
mlx-lm reports it); the parent takes the process's peak RSS from ``wait4``.

    python -m benchmarks.moe_bench [--bits 4|16] [--rounds 3] [--context 256] [--decode 16] [--work DIR]

``--bits 16`` compares the bf16 folder: mlx-lm on MLX's CPU backend cannot run it (``gather_mm`` is
float32-only there: "[GatherMM::eval] Currently only supports float32"), so mlx-lm gets a float32 copy.
benchmarks/compare_mlx_lm.py runs the 4-bit case beside the dense ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import OPENBLAS_ENV, Case, alternate, table, write_section
from tests.peak_rss import measure

SHAPE = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=1024,
    intermediate_size=2816, moe_intermediate_size=128, num_hidden_layers=6, num_attention_heads=16,
    num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
    moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=163840,
    rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    attention_bias=False, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
    torch_dtype="bfloat16",
)
TOOLS = ("edge-llm", "mlx-lm")
DESCRIPTION = ("A DeepSeek-V2-Lite-shaped MoE scaled to {params:.2f}B parameters (random weights; 6 layers, hidden "
               "1024, MLA with kv_lora_rank 512 and q_lora_rank None, 16 heads, 64 routed experts top-6 + 2 shared "
               "of width 128, first_k_dense_replace 1, vocab 102400)")


def write_checkpoint(folder: Path, dtype: str = "bfloat16") -> Path:
    """Random weights in the Hub layout (``mlp.experts.{e}.*``), written beside ``folder`` then renamed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from edge_llm.models.deepseek_v2 import Model, ModelArgs
    from tests.tiny_tokenizer import write_tiny_tokenizer

    if (folder / "config.json").is_file():
        if not (folder / "tokenizer.json").is_file():  # folders written before the converters needed one
            write_tiny_tokenizer(folder)
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(0)
    dt = getattr(mx, dtype)
    shapes = {k: v.shape for k, v in tree_flatten(Model(ModelArgs.from_dict(SHAPE)).parameters())}  # not evaluated
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms
            weights[name] = mx.ones(shape, dtype=dt)
        elif ".switch_mlp." in name:
            for e in range(shape[0]):
                weights[name.replace("switch_mlp", f"experts.{e}")] = (mx.random.normal(shape[1:]) * 0.02).astype(dt)
        else:
            weights[name] = (mx.random.normal(shape) * 0.02).astype(dt)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**SHAPE, "torch_dtype": dtype}, indent=2))
    write_tiny_tokenizer(tmp)  # the converters load a tokenizer; the benchmark feeds token ids
    tmp.rename(folder)
    return folder


def float32_copy(src: Path, dst: Path) -> Path:
    import mlx.core as mx

    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.astype(mx.float32) for k, v in mx.load(str(src / "model.safetensors")).items()}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**SHAPE, "torch_dtype": "float32"}, indent=2))
    tmp.rename(dst)
    return dst


def quantize_both(src: Path, work: Path, bits: int = 4, group_size: int = 64) -> tuple[Path, Path]:
    """(ours, theirs): ``src`` converted by each tool's own quantizer CLI, once."""
    ours, theirs = work / f"{src.name}-q{bits}-edge-llm", work / f"{src.name}-q{bits}-mlx-lm"
    if not (ours / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "cli.main", "quantize", str(src), "-o", str(ours), "--bits", str(bits),
                        "--group-size", str(group_size), "--force"], check=True, capture_output=True)
    if not (theirs / "config.json").is_file():
        shutil.rmtree(theirs, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(theirs),
                        "-q", "--q-group-size", str(group_size), "--q-bits", str(bits)],
                       check=True, capture_output=True)
    return ours, theirs


def worker(tool: str, folder: Path, context: int, decode: int) -> dict[str, float]:
    """One measurement, in this process: load, then the tool's own generation loop. Prints nothing else."""
    import mlx.core as mx
    import numpy as np

    # ids within the folder's own vocabulary: an id past the embedding table is an out-of-bounds read (MLX's
    # gather does not check; it crashed 1 run in 10 on a 32,000-token model given ids up to 102,400)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, size=context).tolist()
    start = time.perf_counter()
    if tool == "edge-llm":
        import edge_llm
        from edge_llm.generation.generate import generate_tokens
        from edge_llm.generation.sampling import Sampler, SamplingParams

        model = edge_llm.load_model(folder)
        cache = model.make_cache()
        tokens = generate_tokens(model, prompt, cache, Sampler(SamplingParams(temperature=0)), decode + 1)
    else:
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler
        from mlx_lm.utils import load_model

        model, _ = load_model(folder)
        cache = make_prompt_cache(model)
        steps = generate_step(mx.array(prompt), model, max_tokens=decode + 1, sampler=make_sampler(0.0),
                              prompt_cache=cache)
        tokens = (int(t) for t, _ in steps)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    next(tokens)
    first = time.perf_counter()
    count = sum(1 for _ in tokens)
    end = time.perf_counter()
    return {
        "prompt_tps": context / (first - start), "generation_tps": count / (end - first), "load_s": load_s,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9, "kv_cache_mb": sum(c.nbytes for c in cache) / 1e6,
    }


def run_once(tool: str, folder: Path, context: int, decode: int, env: dict[str, str] | None = None) -> dict:
    run = measure([sys.executable, "-m", "benchmarks.moe_bench", "--worker", tool, "--model", str(folder),
                   "--context", str(context), "--decode", str(decode)], env=env)
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "rss_gb": run.max_rss_bytes / 1e9}


def param_count(folder: Path) -> int:
    from edge_llm.formats.open import open_checkpoint

    return sum(t.size for t in open_checkpoint(folder).tensors.values())


METRICS = [("prompt_tps", "prefill tok/s", True), ("generation_tps", "decode tok/s", True),
           ("mlx_peak_gb", "MLX peak memory (GB)", True), ("rss_gb", "peak RSS (GB)", True),
           ("kv_cache_mb", "KV cache (MB)", True), ("load_s", "load (s)", True)]


def moe_case(work: Path, bits: int, context: int, decode: int, openblas_row: bool = True) -> tuple[Case, str]:
    """The MoE comparison at ``bits`` (4: each tool's quantizer; 16: bf16 for us, a float32 copy for mlx-lm)."""
    bf16 = write_checkpoint(work / "v2-lite-shaped-bf16")
    if bits == 16:
        ours, theirs = bf16, float32_copy(bf16, work / "v2-lite-shaped-f32")
        what = "edge-llm reads the bf16 folder; mlx-lm cannot run it on the CPU and reads a float32 copy"
    else:
        ours, theirs = quantize_both(bf16, work, bits)
        what = f"each tool's own {bits}-bit quantizer, group 64 (`edge-llm quantize`, `mlx_lm convert -q`)"
    tools = {"edge-llm": lambda: run_once("edge-llm", ours, context, decode),
             "mlx-lm": lambda: run_once("mlx-lm", theirs, context, decode)}
    if openblas_row:
        tools["mlx-lm + OpenBLAS"] = lambda: run_once("mlx-lm", theirs, context, decode, env=OPENBLAS_ENV)
    notes = (DESCRIPTION.format(params=param_count(bf16) / 1e9) + f"; {what}. A random {context}-token prompt, "
             f"then {decode} greedy tokens, through each tool's own generation loop at its default settings "
             "(edge-llm `generate_tokens`, mlx-lm `generate_step`: prefill step 2048). KV cache: each tool's cache "
             "object (`nbytes`): edge-llm keeps MLA's latent, mlx-lm's deepseek_v2 per-head keys and values.")
    return Case(f"DeepSeek-V2-Lite-shaped MoE (0.4B) {bits if bits < 16 else 'bf16'}"
                f"{'-bit' if bits < 16 else ''}", tools, METRICS), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-llm-moe-bench"))
    parser.add_argument("--worker", choices=TOOLS)
    parser.add_argument("--model", type=Path)
    a = parser.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.context, a.decode)))
        return
    case, notes = moe_case(a.work, a.bits, a.context, a.decode)
    results = alternate(case.tools, a.rounds)
    command = "python -m benchmarks.moe_bench " + " ".join(sys.argv[1:])
    body = f"Command: `{command.strip()}`\n\n{table(results, case.metrics)}\n\n{notes}"
    write_section(f"{case.title} at {a.context}-token context", body)
    print(body)


if __name__ == "__main__":
    main()
