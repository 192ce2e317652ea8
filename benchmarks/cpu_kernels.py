"""edge-llm's CPU kernels on and off (issue 17), on MoE models: the same folder, fresh processes, alternating.

"Off" is ``EDGE_LLM_CPU_KERNELS=0``: MLX's own CPU kernels, i.e. edge-llm as it ran before the kernels. Each
measurement is ``benchmarks.moe_bench``'s worker (load, then edge-llm's generation loop on a random prompt,
greedy), so prefill and decode are timed as that benchmark times them. The folders:

- ``v2-4bit``: the DeepSeek-V2-Lite-shaped MoE (0.4B, MLA, 64 experts top-6) of benchmarks/moe_bench.py,
  quantized by ``edge-llm quantize`` (4-bit, group 64); built there if missing.
- ``v2-bf16``: the same model in bf16.
- ``--folder NAME=PATH`` adds any other model folder (e.g. a Qwen3-MoE of 2B, 4-bit).

    python -m benchmarks.cpu_kernels [--rounds 3] [--cases v2-4bit,v2-bf16] [--folder NAME=PATH]
        [--context 256] [--decode 16] [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import alternate, machine_load, table, write_section
from benchmarks.moe_bench import quantize_both, run_once, write_checkpoint

OFF = {"EDGE_LLM_CPU_KERNELS": "0"}

METRICS = [("prompt_tps", "prefill tok/s", True), ("generation_tps", "decode tok/s", True),
           ("rss_gb", "peak RSS (GB)", True), ("mlx_peak_gb", "MLX peak memory (GB)", True)]
TITLE = "CPU kernels on and off: MoE models (issue 17)"


def folders(work: Path, cases: list[str], extra: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if any(c.startswith("v2") for c in cases):
        bf16 = write_checkpoint(work / "v2-lite-shaped-bf16")
        if "v2-bf16" in cases:
            found["v2-bf16"] = bf16
        if "v2-4bit" in cases:
            found["v2-4bit"] = quantize_both(bf16, work, 4)[0]
    for item in extra:
        name, _, path = item.partition("=")
        found[name] = Path(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="v2-4bit,v2-bf16")
    parser.add_argument("--folder", action="append", default=[], help="NAME=PATH: another model folder")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-llm-moe-bench"))
    parser.add_argument("--write", action="store_true", help="write the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    sections = []
    for name, folder in folders(args.work, [c for c in args.cases.split(",") if c], args.folder).items():
        print(f"{name}: {folder}", flush=True)
        before = machine_load()
        results = alternate({
            "kernels on": lambda f=folder: run_once("edge-llm", f, args.context, args.decode),
            "kernels off (EDGE_LLM_CPU_KERNELS=0)": lambda f=folder: run_once("edge-llm", f, args.context,
                                                                               args.decode, env=OFF),
        }, args.rounds)
        body = (f"### {name}\n\n{table(results, METRICS)}\n\nFolder `{folder.name}`; a random {args.context}-token "
                f"prompt, then {args.decode} greedy tokens; medians of {args.rounds} alternating fresh processes. "
                f"Load average before: {before}, after: {machine_load()}.\n")
        print(body, flush=True)
        sections.append(body)
    if args.write:
        command = "python -m benchmarks.cpu_kernels " + " ".join(
            [f"--rounds {args.rounds}", f"--cases {args.cases}"] + [f"--folder {f}" for f in args.folder])
        write_section(TITLE, f"Command: `{command}`\n\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
