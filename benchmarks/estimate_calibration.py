"""Memory estimate vs measured peak RSS of ``edge-llm run`` (the estimator's calibration).

For each model and context: run ``edge-llm run MODEL --prompt P --json`` in a fresh process (peak RSS
from ``wait4``), then ask ``quant.estimate`` for the same model at the context the run reached
(prompt + generated tokens) and compare. Models: SmolLM2-135M-Instruct quantized to 4-bit by
``edge-llm quantize``, and a ~0.45B DeepSeek-V2-Lite-shaped MoE (MLA + 32 routed experts + a shared
expert) and a ~0.4B Mixtral-shaped MoE, both random bf16 quantized to 4-bit the same way.

Usage: ``python -m benchmarks.estimate_calibration [--contexts 64 1024 3000] [--save runs.json] [--no-write]``
measures and records the errors of the current ``quant.memory.CALIBRATION``;
``python -m benchmarks.estimate_calibration --fit runs.json [more.json ...]`` fits a new one to saved runs
(least squares on the relative error) and prints it with the errors it would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import write_section
from quant.memory import CALIBRATION, MB, Calibration, RuntimeTerms, overhead_bytes
from quant.quantize import quantize
from tests.memory_runs import MOE_SHAPES, build_random_checkpoint, run_and_estimate

WORK = Path("/tmp/edge-llm-estimate-calibration")


def moe_4bit(name: str, work: Path = WORK) -> Path:
    """The 4-bit MoE of shape ``name``, built (random bf16, then ``quantize``) once and kept in ``work``."""
    out = work / f"{name}-4bit"
    if not (out / "config.json").is_file():
        src = build_random_checkpoint(work / f"{name}-bf16", MOE_SHAPES[name])
        quantize(src, out, bits=4, group_size=64, force=True)
    return out


LINEAR = ("base", "scores", "intermediate", "mla", "dequant")  # the Calibration fields overhead is linear in


def _estimate(run: dict, c: Calibration) -> int:
    return run["weights"] + run["kv"] + overhead_bytes(_terms(run), c)


def _terms(run: dict) -> RuntimeTerms:
    return RuntimeTerms(**run["terms"])


def _solve(runs: list[dict], share: float, cap: float, start: Calibration) -> Calibration:
    """The linear fields for a given retained share and cap, by least squares on the relative error.

    ``overhead_bytes`` is linear in them once each run's branch (retained share or cap) is known: take the
    branches of the previous solution and solve again until they settle.
    Fields that come out negative are fixed at zero.
    """
    c = dataclasses.replace(start, retained_share=share, retained_cap=cap)
    free = list(LINEAR)
    for _ in range(10):
        rows, targets = [], []
        for r in runs:
            t = _terms(r)
            act_vec = np.array([0, t.scores, t.intermediate, t.mla, float(t.dequant)])
            act = float(act_vec @ [getattr(c, f) for f in LINEAR])
            capped = share * (t.cast + act + t.kv) >= cap
            known = t.tokenizer + (cap if capped else share * (t.cast + t.kv))
            rows.append((np.eye(len(LINEAR))[0] + (1 if capped else 1 + share) * act_vec) / r["rss"])
            targets.append((r["rss"] - r["weights"] - r["kv"] - known) / r["rss"])
        a = np.array(rows)[:, [LINEAR.index(f) for f in free]]
        solution, *_ = np.linalg.lstsq(a, np.array(targets), rcond=None)
        values = dict.fromkeys(LINEAR, 0.0) | dict(zip(free, solution.tolist(), strict=True))
        negative = [f for f in free if values[f] < 0]
        free = [f for f in free if f not in negative]
        new = dataclasses.replace(c, **{f: max(0.0, v) for f, v in values.items()})
        if new == c and not negative:
            break
        c = new
    return c


def fit(runs: list[dict]) -> Calibration:
    """The calibration with the smallest worst relative error over ``runs``: a grid over the retained share
    and cap, least squares for the rest."""
    candidates = [_solve(runs, share, cap * MB, CALIBRATION)
                  for share in np.linspace(0, 1, 11) for cap in range(0, 129, 16)]
    return min(candidates, key=lambda c: max(abs(_estimate(r, c) / r["rss"] - 1) for r in runs))


def smollm2(work: Path = WORK, bits: int = 4) -> Path:
    """SmolLM2-135M-Instruct as shipped (bf16, ``bits=16``) or quantized by ``quantize``."""
    from tests.smollm2 import convert_to_hf_folder

    src = work / "smollm2-bf16"
    if not (src / "config.json").is_file():
        convert_to_hf_folder(src)
    if bits >= 16:
        return src
    out = work / f"smollm2-{bits}bit"
    if not (out / "config.json").is_file():
        quantize(src, out, bits=bits, group_size=64, force=True)
    return out


def models() -> dict[str, Path]:
    return {"SmolLM2-135M 4-bit": smollm2(), "SmolLM2-135M bf16": smollm2(bits=16),
            **{f"{name} 4-bit": moe_4bit(name) for name in MOE_SHAPES}}


def table(runs: list[dict], c: Calibration) -> tuple[list[str], float]:
    """The Markdown rows of ``runs`` under calibration ``c``, and the largest relative error."""
    lines = ["| model | context | measured peak RSS | estimate | error | MLX peak | weights | KV cache | runtime |",
             "|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for r in runs:
        estimate = _estimate(r, c)
        err = estimate / r["rss"] - 1
        errors.append(abs(err))
        lines.append(f"| {r['label']} | {r['context']} | {r['rss'] / 1e6:.1f} MB | {estimate / 1e6:.1f} MB | "
                     f"{err:+.1%} | {r['mlx_peak'] / 1e6:.1f} MB | {r['weights'] / 1e6:.1f} MB | "
                     f"{r['kv'] / 1e6:.1f} MB | {(estimate - r['weights'] - r['kv']) / 1e6:.1f} MB |")
    return lines, max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[20, 300, 1000, 3000])
    parser.add_argument("--save", type=Path, help="also write the runs (with their RuntimeTerms) to this JSON file")
    parser.add_argument("--fit", type=Path, nargs="+", help="fit a Calibration to saved runs instead of measuring")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.fit:
        runs = [r for f in args.fit for r in json.loads(f.read_text())]
        c = fit(runs)
        lines, worst = table(runs, c)
        print("\n".join(lines))
        fields = ", ".join(f"{f.name}={float(getattr(c, f.name)):.3g}" for f in dataclasses.fields(c))
        print(f"Largest error: {worst:.1%} with\nCALIBRATION = Calibration({fields})")
        return
    runs = []
    for label, path in models().items():
        for tokens in args.contexts:
            runs.append(dict(run_and_estimate(path, tokens), label=label))
            print(table(runs[-1:], CALIBRATION)[0][-1], flush=True)
    if args.save:
        args.save.write_text(json.dumps(runs, indent=1))
    lines, worst = table(runs, CALIBRATION)
    summary = f"Largest error: {worst:.1%} (target 5%, tested at 10% in tests/test_estimate_calibration.py)."
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
