"""In-process A/B of edge-llm's performance choices, to keep what helps (each result goes to RESULTS.md).

Variants of one choice are loaded side by side in one process and run interleaved in small blocks
(A B C A B C ...), so a shared, noisy machine slows them alike; we report each one's total rate.

    python -m benchmarks.variants dtype     # decode: float32 weights / the default policy / a bf16 tied
                                            #   table upcast blockwise / everything in bf16 (as mlx-lm)
    python -m benchmarks.variants qprefill  # 4-bit prefill: dequantize + BLAS vs MLX's quantized matmul
    python -m benchmarks.variants block     # 4-bit prefill: dequantize a block of rows at a time vs whole
    python -m benchmarks.variants upcast    # bf16 MoE decode: output head upcast in chained vs independent blocks
    python -m benchmarks.variants chunk     # prefill chunk size: tok/s and transient memory
    python -m benchmarks.variants mla       # MoE decode: absorbed MLA maps quantized vs dequantized copy
    python -m benchmarks.variants glu       # prefill: mx.compile'd SwiGLU vs eager

Folders default to what benchmarks/compare_mlx_lm.py and moe_bench.py prepared under /tmp.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from benchmarks.harness import machine_load, write_section
from edge_llm.generation.generate import generate_tokens, prefill
from edge_llm.generation.sampling import Sampler, SamplingParams
from edge_llm.loader import load_model
from edge_llm.models import layers, mla

DENSE = Path("/tmp/edge-llm-bench/smollm2-bf16")
DENSE_Q4 = Path("/tmp/edge-llm-bench/smollm2-q4-edge-llm")
MOE_Q4 = Path("/tmp/edge-llm-moe-bench/v2-lite-shaped-bf16-q4-edge-llm")
MOE_BF16 = Path("/tmp/edge-llm-moe-bench/v2-lite-shaped-bf16")


def prompt(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(0, vocab, size=n).tolist()


def interleave(gens: dict[str, Iterator[int]], rounds: int, block: int,
               setup: dict[str, Callable[[], None]] | None = None) -> dict[str, float]:
    """Tokens per second of each generator, advanced ``block`` tokens at a time in turn."""
    times = dict.fromkeys(gens, 0.0)
    for _ in range(rounds):
        for name, it in gens.items():
            if setup:
                setup[name]()
            start = time.perf_counter()
            for _ in range(block):
                next(it)
            times[name] += time.perf_counter() - start
    return {name: rounds * block / t for name, t in times.items()}


def decoder(model, tokens: list[int]) -> Iterator[int]:
    it = generate_tokens(model, tokens, model.make_cache(), Sampler(SamplingParams(temperature=0)), 10**9)
    next(it)
    next(it)
    return it


def dtype_variants(folder: Path, rounds: int, block: int, context: int) -> dict[str, float]:
    half_table = load_model(folder)
    half_table.model.embed_tokens.weight = half_table.model.embed_tokens.weight.astype(mx.bfloat16)
    models = {"float32 weights (--dtype float32)": load_model(folder, dtype="float32"),
              "default: bf16 weights, float32 tied table": load_model(folder),
              "bf16 weights and tied table (blockwise upcast)": half_table,
              "all bf16 (--dtype bfloat16, as mlx-lm computes)": load_model(folder, dtype="bfloat16")}
    tokens = prompt(models["all bf16 (--dtype bfloat16, as mlx-lm computes)"].args.vocab_size, context)
    rates = interleave({k: decoder(m, tokens) for k, m in models.items()}, rounds, block)
    return {k: rates[k] for k in models} | {f"{k} [MB]": weights_mb(m) for k, m in models.items()}


def weights_mb(model) -> float:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6


def prefill_rate(model, tokens: list[int], chunk: int) -> tuple[float, float]:
    """(tok/s, transient MB above weights and cache) of one chunked prefill."""
    cache = model.make_cache()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    prefill(model, tokens, cache, chunk)
    rate = len(tokens) / (time.perf_counter() - start)
    return rate, (mx.get_peak_memory() - base - sum(c.nbytes for c in cache)) / 1e6


def alternate_prefill(variants: dict[str, Callable[[], tuple[float, float]]], rounds: int) -> dict[str, float]:
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, run in variants.items():
            rate, transient = run()
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], rate), max(old[1], transient))
    return {k: v[0] for k, v in best.items()} | {f"{k} [MB]": v[1] for k, v in best.items()}


def qprefill_variants(folder: Path, rounds: int, context: int) -> dict[str, float]:
    model = load_model(folder)
    tokens = prompt(model.args.vocab_size, context)

    def with_rows(rows: int):
        def run():
            layers.DEQUANTIZE_MIN_ROWS = rows
            return prefill_rate(model, tokens, 256)
        return run

    default = layers.DEQUANTIZE_MIN_ROWS
    try:
        return alternate_prefill({"dequantize + BLAS matmul (default)": with_rows(default),
                                  "MLX quantized matmul": with_rows(10**9)}, rounds)
    finally:
        layers.DEQUANTIZE_MIN_ROWS = default


def block_variants(folder: Path, rounds: int, context: int) -> dict[str, float]:
    model = load_model(folder)
    tokens = prompt(model.args.vocab_size, context)
    default = layers.BLOCK_BYTES

    def with_block(size: int):
        def run():
            layers.BLOCK_BYTES = size
            return prefill_rate(model, tokens, 256)
        return run

    try:
        return alternate_prefill({f"blocks of {default >> 20} MiB (default)": with_block(default),
                                  "blocks of 8 MiB": with_block(8 << 20),
                                  "whole matrix at once": with_block(1 << 40)}, rounds)
    finally:
        layers.BLOCK_BYTES = default


def upcast_variants(folder: Path, rounds: int, block: int, context: int) -> dict[str, float]:
    model = load_model(folder)
    tokens = prompt(model.args.vocab_size, context)
    chained = layers.blocked_matmul

    def independent(x, tensors, convert, row_values):  # the blocks with no order between them
        rows = max(1, layers.BLOCK_BYTES // (row_values * x.dtype.size))
        return mx.concatenate([x @ convert(*[t[i : i + rows] for t in tensors]).T
                               for i in range(0, tensors[0].shape[0], rows)], axis=-1)

    def use(f):
        return lambda: setattr(layers, "blocked_matmul", f)

    try:
        gens = {"chained blocks (default)": decoder(model, tokens), "independent blocks": decoder(model, tokens)}
        return interleave(gens, rounds, block, {"chained blocks (default)": use(chained),
                                                "independent blocks": use(independent)})
    finally:
        layers.blocked_matmul = chained


def chunk_variants(folder: Path, rounds: int, context: int, chunks: list[int]) -> dict[str, float]:
    model = load_model(folder)
    tokens = prompt(model.args.vocab_size, context)
    return alternate_prefill({f"chunk {c}": (lambda c=c: prefill_rate(model, tokens, c)) for c in chunks}, rounds)


def mla_variants(folder: Path, rounds: int, block: int, context: int) -> dict[str, float]:
    original = mla.MLAttention._absorbed_maps

    def dense_maps(self):  # the GPU path: kv_b_proj dequantized once and kept
        device = mx.default_device
        mx.default_device = lambda: mx.gpu
        try:
            return original(self)
        finally:
            mx.default_device = device

    maps = {"quantized maps (CPU default)": original, "dequantized kv_b_proj copy": dense_maps}
    gens = {}
    for name, f in maps.items():
        mla.MLAttention._absorbed_maps = f
        model = load_model(folder)
        gens[name] = decoder(model, prompt(model.args.vocab_size, context))
    try:
        return interleave(gens, rounds, block, {k: (lambda f=f: setattr(mla.MLAttention, "_absorbed_maps", f))
                                                for k, f in maps.items()})
    finally:
        mla.MLAttention._absorbed_maps = original


def glu_variants(folder: Path, rounds: int, context: int) -> dict[str, float]:
    model = load_model(folder)
    tokens = prompt(model.args.vocab_size, context)
    eager = layers.MLP.__call__
    glu = mx.compile(lambda g, u: nn.silu(g) * u, shapeless=True)

    def compiled(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))

    def run(call):
        def go():
            layers.MLP.__call__ = call
            return prefill_rate(model, tokens, 256)
        return go

    try:
        return alternate_prefill({"eager SwiGLU": run(eager), "mx.compile'd SwiGLU": run(compiled)}, rounds)
    finally:
        layers.MLP.__call__ = eager


def render(results: dict[str, float], unit: str) -> str:
    names = [k for k in results if not k.endswith(" [MB]")]
    first = results[names[0]]
    lines = [f"| variant | {unit} | vs first | MB |", "|---|---|---|---|"]
    for k in names:
        mb = results.get(f"{k} [MB]")
        lines.append(f"| {k} | {results[k]:.3g} | {results[k] / first:.2f}x | {'' if mb is None else f'{mb:.0f}'} |")
    return "\n".join(lines)


TITLES = {
    "dtype": ("Decode by dtype policy (SmolLM2-135M bf16, in-process A/B)", "decode tok/s",
              "MB = weights in memory."),
    "qprefill": ("4-bit prefill: dequantize + BLAS vs quantized matmul (SmolLM2-135M 4-bit)", "prefill tok/s",
                 "MB = transient above weights and cache."),
    "block": ("4-bit prefill: dequantized block size (0.4B DeepSeek-V2-Lite-shaped MoE 4-bit)", "prefill tok/s",
              "MB = transient above weights and cache (MLX's count)."),
    "upcast": ("bf16 MoE decode: output head upcast in chained vs independent blocks (0.4B MoE bf16)",
               "decode tok/s", ""),
    "chunk": ("Prefill chunk size (SmolLM2-135M bf16)", "prefill tok/s", "MB = transient above weights and cache."),
    "mla": ("MoE decode: MLA absorbed maps on the CPU (0.4B MoE 4-bit)", "decode tok/s", ""),
    "glu": ("Prefill: compiled SwiGLU (SmolLM2-135M bf16)", "prefill tok/s", "MB = transient above weights and cache."),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("choice", choices=sorted(TITLES))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=6, help="decode tokens per turn")
    parser.add_argument("--context", type=int)
    parser.add_argument("--chunks", default="128,256,512,1024")
    parser.add_argument("--no-write", action="store_true")
    a = parser.parse_args()
    before = machine_load()
    if a.choice == "dtype":
        results = dtype_variants(a.model or DENSE, a.rounds, a.block, a.context or 300)
    elif a.choice == "qprefill":
        results = qprefill_variants(a.model or DENSE_Q4, a.rounds, a.context or 512)
    elif a.choice == "block":
        results = block_variants(a.model or MOE_Q4, a.rounds, a.context or 512)
    elif a.choice == "upcast":
        results = upcast_variants(a.model or MOE_BF16, a.rounds, a.block, a.context or 256)
    elif a.choice == "chunk":
        results = chunk_variants(a.model or DENSE, a.rounds, a.context or 1024, [int(c) for c in a.chunks.split(",")])
    elif a.choice == "mla":
        results = mla_variants(a.model or MOE_Q4, a.rounds, a.block, a.context or 256)
    else:
        results = glu_variants(a.model or DENSE, a.rounds, a.context or 512)
    title, unit, note = TITLES[a.choice]
    command = ("python -m benchmarks.variants " + " ".join(sys.argv[1:])).strip()
    body = (f"Command: `{command}`\n\n{render(results, unit)}\n\n{note} Interleaved in one process "
            f"({a.rounds} rounds). Load average before: {before}, after: {machine_load()} (2 cores, shared).")
    if not a.no_write:
        write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
