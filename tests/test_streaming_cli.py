"""Expert streaming as people use it: `run`, `bench` and `estimate` with --max-memory, the chat's /stats,
a shard truncated mid-chat, and a real cgroup memory limit whose peak RSS must stay under it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from cli.main import app
from quant.fit import check_fits
from quant.placement import STREAM_HEADROOM
from tests.big_moe import SHAPE, write_checkpoint
from tests.cgroups import in_cgroup, memory_cgroup
from tests.hf_oracle import build_tiny_checkpoint
from tests.peak_rss import measure
from tests.tiny_configs import TINY_CONFIGS

ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
ARGS = ["--prompt", "The capital of France is", "--max-tokens", "12", "--temp", "0", "--json"]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    # many wide experts, so the whole model (about 100 MB) is far more than its resident part plus a small bank
    return build_tiny_checkpoint(tmp_path_factory.mktemp("moe") / "qwen3_moe", with_tokenizer=True,
                                 **{**TINY_CONFIGS["qwen3_moe"], "num_experts": 32, "moe_intermediate_size": 512,
                                    "hidden_size": 128})


def footprint(folder: Path):
    """The model as `run` would hold it (its default context), from the check `run` makes."""
    return check_fits(str(folder), max_memory=10**15).estimate.requested.footprint


def budget_for(folder: Path, slots: int) -> int:
    """A --max-memory that the whole model exceeds but its resident part and ``slots`` experts per layer fit."""
    f = footprint(folder)
    assert f.experts > slots >= f.experts_per_token
    room = f.streamed_fixed_bytes + f.slot_bytes * slots + f.slot_bytes // 2
    return round(room / (1 - STREAM_HEADROOM))  # headroom() takes at most this share


def run_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_run_streams_when_only_that_fits_and_answers_as_resident(tiny_moe):
    resident = run_json(str(tiny_moe), *ARGS)
    budget = budget_for(tiny_moe, slots=2)
    result = CliRunner().invoke(app, ["run", str(tiny_moe), *ARGS, "--max-memory", str(budget)])
    assert result.exit_code == 0, result.output
    streamed = json.loads(result.stdout)
    assert streamed["tokens"] == resident["tokens"] and "experts" not in resident
    experts = streamed["experts"]
    assert experts["slots"] == 2 and experts["misses"] > 0 and experts["bytes_read"] > 0
    assert 0 < experts["hit_rate"] < 1 and experts["read_wait_s"] >= 0
    assert re.search(r"streaming experts: .* a bank of 2 of 32 experts per MoE layer", result.stderr)


def test_a_budget_below_the_resident_part_is_one_line(tiny_moe):
    f = footprint(tiny_moe)
    result = CliRunner().invoke(app, ["run", str(tiny_moe), *ARGS, "--max-memory", str(f.fixed_bytes // 2)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs at least" in lines[0] and "streamed from disk" in lines[0]
    assert "--max-memory" in lines[0]


def test_bench_and_estimate_report_streaming(tiny_moe):
    budget = str(budget_for(tiny_moe, slots=3))
    bench = CliRunner().invoke(app, ["bench", str(tiny_moe), "--max-memory", budget, "--json", "--prompt-lengths",
                                     "16", "--decode-tokens", "8"])
    assert bench.exit_code == 0, bench.output
    experts = json.loads(bench.stdout)["experts"]
    assert experts["slots"] == 3 and experts["hits"] + experts["misses"] > 0
    est = CliRunner().invoke(app, ["estimate", str(tiny_moe), "--max-memory", budget, "--json", "--devices",
                                   "--only", "m4,4090"])
    assert est.exit_code == 0, est.output
    data = json.loads(est.stdout)
    here = data["placement"]
    assert here["mode"] == "streamed" and here["bank_slots"] == 3 and here["experts"] == 32
    assert here["disk_bytes_per_token"] > 0 and here["decode_tokens_per_s_ceiling"] > 0
    assert {d["mode"] for d in data["devices"][:-1]} == {"resident"} and data["devices"][-1]["mode"] == "streamed"


def test_chat_stats_and_a_shard_truncated_mid_chat(tiny_moe, tmp_path):
    folder = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(tiny_moe), str(folder)], check=True)
    budget = str(budget_for(folder, slots=2))
    child = pexpect.spawn(sys.executable, ["-m", "cli.main", "run", str(folder), "--max-memory", budget, "--temp", "0",
                                           "--max-tokens", "8"], encoding="utf-8", timeout=120, env=ENV,
                          dimensions=(40, 250))
    child.expect_exact(">>> ")
    child.sendline("Hello there")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"experts since the start: bank 2 slots/layer .* hits, .* read at .*/s")
    child.expect_exact(">>> ")
    shard = folder / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 3)
    child.sendline("Tell me about experts, mixtures and routers in a long answer")
    child.expect(r"error: .*model\.safetensors")
    child.expect_exact(">>> ")  # the chat goes on
    assert "Traceback" not in child.before
    child.sendline("/bye")
    child.expect(pexpect.EOF)


@pytest.mark.slow
def test_a_real_memory_limit_is_honoured(tmp_path):
    """A MoE about four times larger than the cgroup it runs in: the budget comes from the cgroup's limit (no
    --max-memory), the answer equals the resident one, and the process's peak RSS stays under the limit."""
    shape = {**SHAPE, "hidden_size": 512, "moe_intermediate_size": 512, "num_hidden_layers": 6,  # 0.3B bf16
             "num_attention_heads": 8, "head_dim": 64, "vocab_size": 2048, "num_experts": 64, "num_experts_per_tok": 4}
    folder = write_checkpoint(tmp_path / "moe", shape)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    limit = size * 2 // 5  # the model is 2.5 times the memory it may use
    group = memory_cgroup(f"edge-llm-test-{os.getpid()}", limit)
    if group is None:
        pytest.skip("no writable memory cgroup (needs root)")
    args = [sys.executable, "-m", "cli.main", "run", str(folder), *ARGS, "--context", "256"]
    resident = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert resident.returncode == 0, resident.stderr
    try:
        # raises on a non-zero exit (137: killed at the limit)
        streamed = measure(in_cgroup(group, args), env=ENV, timeout=600)
    finally:
        group.rmdir()
    rss = streamed.max_rss_bytes
    assert json.loads(streamed.stdout)["tokens"] == json.loads(resident.stdout)["tokens"]
    assert "streaming experts" in streamed.stderr and "cgroup limit" in streamed.stderr
    assert rss < limit, f"peak RSS {rss} over the cgroup's {limit}"
