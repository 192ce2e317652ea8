"""Every bad value is one line: option values (dtype, prompt lengths, seeds, an empty MODEL), config values
that must be blamed on the config, the user's output path named instead of a temporary one; and what
``quantize`` says before it writes and after ``--eval``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.generation.sampling import SEED_MAX, SamplingParams
from quant.quality import Quality, judge
from quant.quantize import quantize
from tests.hf_oracle import build_tiny_checkpoint
from tests.test_cli_behaviour import one_error_line
from tests.tiny_configs import TINY_CONFIGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", with_tokenizer=True,
                                 **TINY_CONFIGS["llama"])


@pytest.fixture(scope="module")
def peaky(tiny, tmp_path_factory) -> Path:
    """The tiny llama with its output head scaled 10x: peaked next-token distributions, like a trained model's,
    so 4-bit rounding moves them measurably (KL 0.06, top-1 71%) and 8-bit does not (KL 0.0002, 95%)."""
    folder = tmp_path_factory.mktemp("peaky") / "llama"
    shutil.copytree(tiny, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 10
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("args, says", [
    (["bench", "--dtype", "foo"], "'foo' is not a dtype"),
    (["bench", "--dtype", "float64"], "'float64' is not a dtype"),
    (["quantize", "m", "-o", "x", "--dtype", "float32"], "not a half-precision dtype"),
    (["bench", "--prompt-lengths", "abc"], "'abc' is not a whole number"),
    (["bench", "--prompt-lengths", "0"], "0 is out of range"),
    (["bench", "--prompt-lengths", "-5"], "'-5' is not a whole number"),
    (["bench", "--prompt-lengths", "1e9"], "'1e9' is not a whole number"),
    (["bench", "--prompt-lengths", "128,2000000"], "2000000 is out of range"),
    (["bench", "--prompt-lengths", ","], "at least one prompt length"),
    (["info", ""], "empty model reference"),
    (["estimate", " "], "empty model reference"),
    (["bench", ""], "empty model reference"),
    (["quantize", "", "-o", "x"], "empty model reference"),
])  # fmt: skip
def test_bad_values_are_one_usage_line(args, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty MODEL must not be read as this folder
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in one_error_line(result.stderr)
    assert not (tmp_path / "x").exists()


def test_an_empty_model_reference_is_refused_by_the_library_too(tmp_path, monkeypatch):
    from edge_llm.errors import CheckpointError
    from edge_llm.hub.resolve import resolve_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="empty model reference"):
        resolve_model("")


@pytest.mark.parametrize("seed", [0, 1, 2**32, SEED_MAX])
def test_seeds_mlx_accepts_are_accepted(seed):
    assert SamplingParams(seed=seed).seed == seed
    mx.random.key(seed)


@pytest.mark.parametrize("seed", [-1, -5, SEED_MAX + 1, 2**70, 1.5, "7", True])
def test_seeds_out_of_range_are_one_clear_error(seed):
    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 2\*\*64 - 1"):
        SamplingParams(seed=seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        with pytest.raises(TypeError):  # the bound is MLX's own: one past it, mx.random.key refuses
            mx.random.key(seed)


@pytest.mark.parametrize("seed", ["-5", str(2**70)])
def test_run_seed_out_of_range_is_one_line(tiny, seed):
    result = CliRunner().invoke(app, ["run", str(tiny), "--prompt", "hi", "--seed", seed, "--max-tokens", "2"])
    assert result.exit_code in (1, 2), result.output
    assert "seed" in one_error_line(result.stderr)


@pytest.mark.parametrize("command", [["info"], ["estimate"], ["run", "--prompt", "hi"], ["bench"]])
def test_a_bad_context_length_is_blamed_on_the_config(tiny, tmp_path, command):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    config = json.loads((bad / "config.json").read_text())
    config["max_position_embeddings"] = -5
    (bad / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, [command[0], str(bad), *command[1:]])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert "max_position_embeddings" in line and str(bad / "config.json") in line and "--context" not in line


def test_bench_refuses_prompts_longer_than_the_context(tiny):
    result = CliRunner().invoke(app, ["bench", str(tiny), "--prompt-lengths", "600,100000"])
    assert result.exit_code == 1, result.output
    assert "fits its context of 512 tokens" in one_error_line(result.stderr)


def test_the_users_output_is_named_not_the_temporary_folder(tiny, tmp_path):
    out = tmp_path / ("m" * 250)  # a valid name, too long for the hidden ".NAME.partial-XXXXXXXX" beside it
    result = CliRunner().invoke(app, ["quantize", str(tiny), "-o", str(out)])
    assert result.exit_code == 1, result.output
    announced, line = result.stderr.strip().splitlines()  # what it was about to do, then why it could not
    assert announced.startswith("quantizing ") and line.startswith("error: ") and "Traceback" not in result.output
    assert str(out) in line and not re.search(r"\.partial-(?!X{8})\w{8}", line), line
    assert list(tmp_path.iterdir()) == []


def test_quantize_announces_its_work_before_writing(tiny, tmp_path):
    out = tmp_path / "q4"
    seen = []

    def announce(job):
        seen.append((job, [p for p in tmp_path.rglob("*") if p.suffix == ".safetensors"]))

    result = quantize(tiny, out, bits=4, announce=announce)
    ((job, written_then),) = seen
    assert written_then == [] and job.out == out and job.source == tiny
    assert (job.tensors, job.output_bytes) == (result.tensors, result.output_bytes)
    assert job.recipe == "uniform, 4-bit, group 64" and job.float_dtype == "float16"
    shown = CliRunner().invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "q8"), "--bits", "8"])
    assert shown.exit_code == 0, shown.output
    first, last = shown.stderr.splitlines()[0], shown.stderr.splitlines()[-1]
    assert first.startswith(f"quantizing {tiny} -> {tmp_path / 'q8'}: uniform, 8-bit, group 64"), first
    assert f"{result.tensors} tensors" in first and last.startswith("done:")


@pytest.mark.parametrize("kl, top1, quantization, suggestions", [
    (0.0015, 0.969, {"bits": 8, "group_size": 64}, None),  # SmolLM2 8-bit: fine
    (0.0007, 0.707, {"bits": 4, "group_size": 64}, None),  # near-ties only (flat distributions): fine
    (0.2811, 0.689, {"bits": 4, "group_size": 64}, ["--bits 8", "--group-size 32", "--recipe mixed_4_6"]),
    (0.0591, 0.815, {"bits": 4, "group_size": 32}, ["--bits 8", "--recipe mixed_4_6"]),
    (0.03, 0.85, {"bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": 6, "group_size": 64}},
     ["--bits 8", "--group-size 32"]),
    (0.06, 0.95, {"bits": 3, "group_size": 32}, ["--bits 8", "--recipe mixed_3_6"]),
    (0.2, 0.6, {"bits": 8, "group_size": 64}, ["--bits 16"]),
])  # fmt: skip
def test_quality_verdict_and_what_would_do_better(kl, top1, quantization, suggestions):
    v = judge(Quality(tokens=500, kl_mean=kl, kl_max=kl * 5, ppl_source=15.0, ppl_quantized=16.0,
                      top1_agreement=top1), quantization)
    assert v.poor is (suggestions is not None)
    assert list(v.suggestions) == (suggestions or [])
    assert bool(v.reasons) is v.poor


@pytest.mark.parametrize("bits, poor", [(4, True), (8, False)])
def test_quantize_eval_warns_when_the_result_is_poor(peaky, tmp_path, bits, poor):
    result = CliRunner().invoke(app, ["quantize", str(peaky), "-o", str(tmp_path / "q"), "--bits", str(bits),
                                      "--eval"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: poor quality")]
    assert len(warnings) == int(poor), result.stderr
    if poor:
        assert "--bits 8" in warnings[0] and "--group-size 32" in warnings[0] and "mixed_4_6" in warnings[0]
    as_json = CliRunner().invoke(app, ["quantize", str(peaky), "-o", str(tmp_path / "j"), "--bits", str(bits),
                                       "--eval", "--json"])
    verdict = json.loads(as_json.stdout)["verdict"]
    assert verdict["poor"] is poor and ("--bits 8" in verdict["suggestions"]) is poor
