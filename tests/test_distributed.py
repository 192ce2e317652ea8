"""Sharding over MLX's distributed engine, as a person starts it: ``mlx.launch -n 2 --backend ring -- edge-llm ...``
on loopback, two real processes.

Greedy tokens of 2 ranks equal one process's (the real SmolLM2 in a pipeline; a tiny Qwen3-MoE and a DeepSeek-V3
MLA MoE in pipeline and expert mode); each rank holds about half the weights (peak RSS); a rank killed mid-answer
ends the other within seconds with one line naming it; a rank that never joins is named; ``serve`` answers on
rank 0 with batched requests while sharded. The shard plan itself is checked as a pure function.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_llm.distributed.launch import DistributedError
from edge_llm.distributed.plan import ModelBytes, expert_split, model_bytes, plan_shards, split_proportionally
from tests.hf_oracle import build_tiny_checkpoint
from tests.peak_rss import RSS_WRAPPER
from tests.tiny_configs import TINY_CONFIGS

BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring"]
EDGE = [str(BIN / "edge-llm")]
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "EDGE_LLM_JOIN_TIMEOUT": "60"}
PROMPT = ["--prompt", "Tell me about the sea.", "--temp", "0"]


def free_base_port() -> int:
    """A port p with p, p + 1 (the ring) and p + 1000 (the side channel) free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 64000:
            continue
        try:
            for q in (p + 1, p + 1000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launched(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, "-p", str(free_base_port()), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)


def one_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON answer (rank 0's only), got: {stdout!r}"
    return json.loads(lines[0])


def answer(folder: Path, *extra: str, shard: str | None = None, tokens: int = 24) -> dict:
    args = [*EDGE, "run", str(folder), *PROMPT, "-n", str(tokens), "--json", *extra]
    if shard is None:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    else:
        proc = launched([*args, "--shard", shard])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "[ring]" not in proc.stderr, proc.stderr
    return one_json(proc.stdout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for arch in ("llama", "qwen3_moe", "deepseek_v3"):
        cfg = dict(TINY_CONFIGS[arch], num_hidden_layers=4)
        out[arch] = build_tiny_checkpoint(root / arch, with_tokenizer=True, **cfg)
    from typer.testing import CliRunner

    from cli.main import app

    # MLX-format 4-bit: experts stored stacked (sliced per rank), quantized switch layers
    quantized = CliRunner().invoke(app, ["quantize", str(out["qwen3_moe"]), "-o", str(root / "q4"), "--bits", "4",
                                         "--group-size", "32"])
    assert quantized.exit_code == 0, quantized.output
    out["qwen3_moe_4bit"] = root / "q4"
    return out


# --- the plan (pure) ---------------------------------------------------------------------------------------------


def test_pipeline_split_follows_each_ranks_budget():
    sizes = [10] * 8
    assert split_proportionally(sizes, 0, [1, 1]) == [(0, 4), (4, 8)]
    assert split_proportionally(sizes, 0, [3, 1]) == [(0, 6), (6, 8)]  # a rank with 3x the memory holds 3x
    assert split_proportionally(sizes, 20, [1, 1]) == [(0, 3), (3, 8)]  # rank 0 also holds embedding and head
    assert split_proportionally(sizes, 0, [100, 1, 1]) == [(0, 6), (6, 7), (7, 8)]  # at least one layer each
    with pytest.raises(DistributedError, match="3 layers cannot be split over 4 ranks"):
        split_proportionally([1, 1, 1], 0, [1, 1, 1, 1])


def test_expert_split_and_fit():
    assert expert_split(8, 2) == [(0, 4), (4, 8)]
    assert expert_split(7, 3) == [(0, 3), (3, 5), (5, 7)]
    sizes = ModelBytes(layers=(100, 100), routed=(80, 80), outer=40)
    plan = plan_shards("experts", sizes, [1000, 1000], 8)
    assert plan.rank_bytes == (160, 160)  # 80 shared (outer included) + half of 160 routed each
    pipe = plan_shards("pipeline", sizes, [1000, 1000], 8)
    assert pipe.layer_ranges == ((0, 1), (1, 2)) and pipe.rank_bytes == (140, 100)
    with pytest.raises(DistributedError, match="dense"):
        plan_shards("experts", sizes, [1, 1], None)


def test_model_bytes_finds_layers_and_routed_experts():
    tensors = {"model.embed_tokens.weight": 7, "model.layers.0.self_attn.q_proj.weight": 5,
               "model.layers.0.mlp.experts.3.down_proj.weight": 2, "model.layers.1.mlp.switch_mlp.up_proj.weight": 3,
               "model.layers.1.mlp.shared_experts.up_proj.weight": 4, "lm_head.weight": 1}
    b = model_bytes(tensors, 2)
    assert b.layers == (7, 7) and b.routed == (2, 3) and b.outer == 8


# --- two processes on loopback ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_pipeline_answers_as_one_process(smollm2_folder):
    single = answer(smollm2_folder)
    sharded = answer(smollm2_folder, shard="pipeline")
    assert sharded["tokens"] == single["tokens"] and sharded["text"] == single["text"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "qwen3_moe_4bit"])
def test_moe_answers_as_one_process_in_both_modes(tiny, arch):
    single = answer(tiny[arch])["tokens"]
    assert answer(tiny[arch], shard="pipeline")["tokens"] == single
    assert answer(tiny[arch], shard="experts")["tokens"] == single




@pytest.mark.slow
def test_each_rank_holds_about_half_the_weights(smollm2_folder):
    weights = sum(f.stat().st_size for f in smollm2_folder.glob("*.safetensors"))
    args = [sys.executable, "-c", RSS_WRAPPER, *EDGE, "run", str(smollm2_folder), *PROMPT, "-n", "4", "--json"]
    single = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert single.returncode == 0, single.stderr
    sharded = launched([*args, "--shard", "pipeline"])
    assert sharded.returncode == 0, sharded.stderr
    rss = {k: int(v) * 1024 for v, k in re.findall(r"@@max_rss_kb=(\d+) rank=(\w+)", single.stderr + sharded.stderr)}
    assert set(rss) == {"single", "0", "1"}, rss
    for rank in ("0", "1"):  # one process holds all the weights; a rank about half of them
        saved = rss["single"] - rss[rank]
        assert 0.3 * weights < saved < 0.75 * weights, (rank, rss, weights)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in _children(launcher):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env:
            return child
    return None


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["pipeline", "experts"])
def test_a_rank_killed_mid_answer_ends_the_other_with_one_line(tiny, shard):
    cmd = [*LAUNCH, "-p", str(free_base_port()), "--", *EDGE, "run", str(tiny["qwen3_moe"]), *PROMPT, "-n", "100000",
           "--shard", shard]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV)
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        deadline, seen = time.monotonic() + 240, b""
        while len(seen) < 40:  # the answer is streaming
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            seen += proc.stdout.read() or b""
            time.sleep(0.1)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert took < 10, took
    assert "error: rank 1 (127.0.0.1) stopped: its connection closed" in stderr, stderr
    assert "Traceback" not in stderr and "[ring]" not in stderr, stderr


def test_a_rank_that_never_joins_is_named(tmp_path):
    port = free_base_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**ENV, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile), "EDGE_LLM_JOIN_TIMEOUT": "2"}
    start = time.monotonic()
    proc = subprocess.run([*EDGE, "run", "/nonexistent", "--prompt", "hi"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and time.monotonic() - start < 30
    assert "rank 1 (127.0.0.1) did not join within the 2 s allowed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_serve_answers_on_rank_0_while_sharded(tiny):
    from http.client import HTTPConnection

    port = free_base_port()
    http = free_base_port() + 7
    cmd = [*LAUNCH, "-p", str(port), "--", *EDGE, "serve", str(tiny["deepseek_v3"]), "--port", str(http),
           "--shard", "experts"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV)

    def complete(prompt: str) -> str:
        conn = HTTPConnection("127.0.0.1", http, timeout=120)
        body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200
        return json.loads(reply.read())["choices"][0]["text"]

    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            try:
                conn = HTTPConnection("127.0.0.1", http, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        alone = [complete("The sea"), complete("A cat")]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # decoded together: BatchRows over the sharded caches
            together = list(pool.map(complete, ["The sea", "A cat"]))
        assert together == alone and all(alone)
    finally:
        rank0 = _rank_pid(proc.pid, 0)
        if rank0 is not None:
            os.kill(rank0, signal.SIGTERM)  # rank 0 stops the server, then the other rank
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 0 and "Traceback" not in stderr and "error" not in stderr, stderr


def test_estimate_says_what_each_rank_holds(tiny, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["estimate", str(tiny["qwen3_moe"]), "--hosts", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    pipeline, experts = data["sharding"]
    assert pipeline["mode"] == "pipeline" and experts["mode"] == "experts"
    assert [r["layers"] for r in pipeline["ranks"]] == [[0, 2], [2, 4]]
    assert [r["experts"] for r in experts["ranks"]] == [[0, 2], [2, 4]]
    assert abs(sum(r["weights_bytes"] for r in pipeline["ranks"]) - data["weights_bytes"]) < 16
    assert pipeline["bytes_per_token"] == 2 * 64 * 4  # the hidden state once around two ranks, float32 on the CPU
    assert experts["bytes_per_token"] == 4 * 2 * 64 * 4 * 2  # 4 MoE layers: k=2 outputs all-summed by 2 ranks
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "big", "ips": ["10.0.0.1"]},
                                    {"ssh": "small", "ips": ["10.0.0.2"], "memory": "1MB"}]))
    result = CliRunner().invoke(app, ["estimate", str(tiny["qwen3_moe"]), "--hostfile", str(hostfile)])
    assert result.exit_code == 0, result.output
    assert "a rank does not fit" in result.stdout and "small" in result.stdout


@pytest.mark.slow
def test_bench_measures_the_sharded_model(tiny):
    proc = launched([*EDGE, "bench", str(tiny["qwen3_moe"]), "--prompt-lengths", "16", "--decode-tokens", "8",
                     "--json", "--shard", "experts"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    result = one_json(proc.stdout)
    assert result["decode_tps"] > 0 and result["decode_tokens"] == 8


@pytest.mark.slow
def test_a_hung_rank_is_named_after_the_peer_timeout(tiny, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, its connections open) is named after EDGE_LLM_PEER_TIMEOUT.
    The ranks are started by hand as mlx.launch would (it waits for a stopped process forever)."""
    port = free_base_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    args = [*EDGE, "run", str(tiny["qwen3_moe"]), *PROMPT, "-n", "100000"]
    env = {**ENV, "MLX_HOSTFILE": str(hostfile), "EDGE_LLM_PEER_TIMEOUT": "3"}
    ranks = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env={**env, "MLX_RANK": str(r)}) for r in (0, 1)]
    try:
        os.set_blocking(ranks[0].stdout.fileno(), False)
        deadline, seen = time.monotonic() + 240, b""
        while len(seen) < 40:
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].stderr.read().decode()
            seen += ranks[0].stdout.read() or b""
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        ranks[0].wait(timeout=60)
        took = time.monotonic() - stopped
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
    stderr = ranks[0].stderr.read().decode()
    assert ranks[0].returncode == 1 and 3 <= took < 10, (took, stderr)
    assert "error: rank 1 (127.0.0.1) stopped: sent nothing for 3 s (hung or unreachable)" in stderr, stderr
    assert "Traceback" not in stderr, stderr
