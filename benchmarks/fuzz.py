"""The long fuzz run of issue 13: N hostile inputs per file format through ``edge-llm info`` and ``run``.

    python -m benchmarks.fuzz --count 10000 [--formats config,safetensors,gguf,tokenizer] [--seed 1]

Inputs are the same hypothesis strategies the suite samples a few of (tests/fuzz_inputs.py), here drawn
at random, ``--count`` per format. Each input runs in a long-lived worker process (spawned, so a crash
or a hang costs one worker, not the run) under an address-space limit (``--memory-gb``); per input the
worker reports the CLI contract (exit 0 with a result, or exit 1/2 with one line, no traceback, no
uncaught error) and its peak resident memory (Linux VmHWM, reset before each input). The parent kills a
worker that takes longer than ``--seconds`` per command. Counted:

- tracebacks: any break of the contract (a traceback, an uncaught exception, an error of more than one
  line, exit 0 without output from ``info``);
- hangs: an input that took longer than the bound, or a worker killed for it;
- memory blow-ups: peak RSS above ``--rss-gb``, a MemoryError, or a worker that died.

Progress goes to stderr; the summary (counts, slowest and largest inputs, findings with their inputs) is
written as JSON to ``--out`` as the run goes, so a run stopped early still reports how far it got.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, reject, seed, settings

from tests.fuzz_inputs import FORMATS, STRATEGIES, WRITERS, case_summary

OUT = Path(__file__).with_name("fuzz_results.json")


def _worker(conn, memory_bytes: int, seconds: float) -> None:
    """Runs inputs sent by the parent: (model path) -> (problems, exit codes, seconds, peak RSS)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    os.environ.setdefault("EDGE_LLM_LOG", "ERROR")  # warnings about odd files are expected here
    from tests.fuzz_inputs import check_contract, peak_rss, reset_peak_rss

    while True:
        path = conn.recv()
        if path is None:
            return
        reset_peak_rss()
        try:
            verdict = check_contract(Path(path), seconds=seconds)
            result = {"problems": verdict.problems, "exits": [o.exit_code for o in verdict.outcomes],
                      "seconds": max(o.seconds for o in verdict.outcomes),
                      "stderr": [o.stderr[-300:] for o in verdict.outcomes if o.problem]}  # fmt: skip
        except MemoryError:
            result = {"problems": ["MemoryError"], "exits": [], "seconds": 0.0, "stderr": []}
        result["rss"] = peak_rss() or 0
        conn.send(result)


class Pool:
    """One worker process, replaced when it hangs or dies."""

    def __init__(self, memory_gb: float, seconds: float) -> None:
        self.memory, self.seconds = int(memory_gb * 2**30), seconds
        self.ctx = mp.get_context("spawn")
        self.proc = None

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.memory, self.seconds), daemon=True)
        self.proc.start()

    def run(self, path: Path) -> dict[str, Any]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(str(path))
        limit = 2 * self.seconds + 60  # two commands, plus the first input's imports
        if self.conn.poll(limit):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            self.proc = None
            return {"died": True}
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return {"hang": True}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)


class Tally:
    """What the run found, per format, written to ``out`` as it goes."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.started = out, time.time()
        self.meta = {"command": "python -m benchmarks.fuzz " + " ".join(sys.argv[1:]), "count": args.count,
                     "seed": args.seed, "seconds_bound": args.seconds, "rss_bound_gb": args.rss_gb,
                     "memory_limit_gb": args.memory_gb}  # fmt: skip
        self.formats: dict[str, dict[str, Any]] = {}

    def add(self, fmt: str, case: dict, result: dict[str, Any], rss_bound: int) -> None:
        f = self.formats.setdefault(fmt, {"inputs": 0, "exit_0": 0, "refused": 0, "tracebacks": 0, "hangs": 0,
                                          "memory_blowups": 0, "max_seconds": 0.0, "max_rss_gb": 0.0,
                                          "findings": [], "kinds": Counter()})  # fmt: skip
        f["inputs"] += 1
        kind = None
        if result.get("hang") or any(p.split(": ", 1)[-1].startswith("hang") for p in result.get("problems", [])):
            f["hangs"] += 1
            kind = "hang"
        elif result.get("died") or "MemoryError" in " ".join(result.get("problems", [])) \
                or result.get("rss", 0) > rss_bound:
            f["memory_blowups"] += 1
            kind = "memory"
        elif result.get("problems"):
            f["tracebacks"] += 1
            kind = "traceback"
        elif all(code == 0 for code in result["exits"]):
            f["exit_0"] += 1
        else:
            f["refused"] += 1
        f["max_seconds"] = max(f["max_seconds"], result.get("seconds", 0.0))
        f["max_rss_gb"] = max(f["max_rss_gb"], round(result.get("rss", 0) / 1e9, 3))
        if kind:
            f["kinds"][kind] += 1
            if len(f["findings"]) < 50:
                f["findings"].append({"kind": kind, "input": case_summary(case),
                                      **{k: result[k] for k in ("problems", "stderr", "rss") if k in result}})

    def write(self) -> None:
        body = {**self.meta, "elapsed_s": round(time.time() - self.started, 1),
                "formats": {k: {**v, "kinds": dict(v["kinds"])} for k, v in self.formats.items()}}  # fmt: skip
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1, default=str))
        tmp.replace(self.out)


def fuzz_format(fmt: str, args: argparse.Namespace, pool: Pool, tally: Tally, root: Path) -> None:
    done, attempts = [0], itertools.count()
    rss_bound = int(args.rss_gb * 1e9)

    @seed(args.seed)
    @settings(max_examples=args.count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=STRATEGIES[fmt])
    def one(case: dict) -> None:
        dst = root / f"{fmt}-{next(attempts)}"
        try:
            model = WRITERS[fmt](case, dst)
        except Exception as e:  # the mutation cannot be written (a value its field cannot encode): not an input
            print(f"{fmt}: skipped an input the writer cannot encode ({e!r:.80})", file=sys.stderr)
            shutil.rmtree(dst, ignore_errors=True)
            reject()  # not counted: --count inputs really reach the CLI
        try:
            tally.add(fmt, case, pool.run(model), rss_bound)
        finally:
            shutil.rmtree(dst, ignore_errors=True)
        done[0] += 1
        if done[0] % 100 == 0:
            f = tally.formats[fmt]
            print(f"{fmt}: {done[0]} inputs, {f['tracebacks']} tracebacks, {f['hangs']} hangs, "
                  f"{f['memory_blowups']} memory blow-ups", file=sys.stderr, flush=True)  # fmt: skip
            tally.write()

    one()
    tally.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs per format")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0, help="a command taking longer is a hang")
    parser.add_argument("--rss-gb", type=float, default=1.5, help="peak RSS above this is a memory blow-up")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit of the worker")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tally = Tally(args.out, args)
    pool = Pool(args.memory_gb, args.seconds)
    root = Path(tempfile.mkdtemp(prefix="edge-llm-fuzz-"))
    try:
        for fmt in args.formats.split(","):
            fuzz_format(fmt, args, pool, tally, root)
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)
        tally.write()
    bad = sum(f["tracebacks"] + f["hangs"] + f["memory_blowups"] for f in tally.formats.values())
    print(json.dumps({k: {n: v[n] for n in ("inputs", "exit_0", "refused", "tracebacks", "hangs", "memory_blowups")}
                      for k, v in tally.formats.items()}), flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
