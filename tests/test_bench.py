"""`edge-llm bench --json` reports every figure the issue names, with sane values; doctor remembers bandwidth."""

from __future__ import annotations

import json

from mlx.utils import tree_flatten
from typer.testing import CliRunner

from cli.main import app
from edge_llm.loader import load_model
from edge_llm.machine.bandwidth import remembered_bandwidth
from tests.backend import BACKEND
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS


def test_bench_json_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    folder = build_tiny_checkpoint(tmp_path / "tiny", **TINY_CONFIGS["llama"])
    result = CliRunner().invoke(app, ["bench", str(folder), "--json", "--decode-tokens", "8",
                                      "--prompt-lengths", "16,64"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert set(r["prefill_tps"]) == {"16", "64"} and all(v > 0 for v in r["prefill_tps"].values())
    assert r["load_s"] > 0 and r["time_to_first_token_s"] > 0
    assert r["decode_tps"] > 0 and r["decode_tokens"] == 8
    assert r["peak_memory_bytes"] > 0 and r["backend"] == BACKEND
    # untied tiny llama: a token reads every weight of the loaded model but one row of the embedding table
    loaded = dict(tree_flatten(load_model(folder).parameters()))
    table = loaded["model.embed_tokens.weight"]
    one_row = table.nbytes // len(table)
    assert r["active_weight_bytes"] == sum(p.nbytes for p in loaded.values()) - table.nbytes + one_row
    assert r["achieved_bytes_per_s"] == r["active_weight_bytes"] * r["decode_tps"]
    assert r["bandwidth_bytes_per_s"] > 1e8
    assert r["bandwidth_fraction"] == r["achieved_bytes_per_s"] / r["bandwidth_bytes_per_s"]
    human = CliRunner().invoke(app, ["bench", str(folder), "--decode-tokens", "4", "--prompt-lengths", "16"])
    assert human.exit_code == 0 and "bandwidth" in human.stdout and "%" in human.stdout


def test_bench_context_bounds_prompts_and_kv_bits_quantize_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    # two heads of 32: a quantized cache needs rows that divide into groups of 32
    folder = build_tiny_checkpoint(tmp_path / "tiny", **{**TINY_CONFIGS["llama"], "num_attention_heads": 2,
                                                          "num_key_value_heads": 1})
    args = ["bench", str(folder), "--json", "--decode-tokens", "8", "--prompt-lengths", "16,64,128"]
    result = CliRunner().invoke(app, [*args, "--context", "80", "--kv-bits", "8"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["prefill_tps"]) == {"16", "64"}  # 128 + 8 tokens exceed the context
    refused = CliRunner().invoke(app, [*args, "--kv-bits", "3"])
    assert refused.exit_code == 1 and "--kv-bits must be 8 or 4" in refused.stderr


def test_doctor_measures_bandwidth_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLM_HOME", str(tmp_path / "home"))
    assert remembered_bandwidth() is None
    first = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)["bandwidth_bytes_per_s"]
    assert first > 1e8 and remembered_bandwidth() == first
    again = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).stdout)["bandwidth_bytes_per_s"]
    assert again == first  # remembered, not re-measured
