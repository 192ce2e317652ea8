"""``edge-llm quantize --calibrate``: GPTQ on activations, layer by layer, in the same MLX format.

The judges are code we did not write: mlx-lm (``mlx_lm.load`` / ``load_model``) reads the calibrated folders
and must compute the same logits as our loader; the KL divergence from the float source (``quant.quality``)
must fall against the default quantization, on the real SmolLM2-135M and on a tiny random MoE; a routed
expert that saw too few tokens must be exactly what the default path makes of it.
"""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from typer.testing import CliRunner

from cli.main import app
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling import SamplingParams
from edge_llm.loader import load, load_model
from quant.calibrate import MIN_EXPERT_TOKENS
from quant.quality import Quality, compare_log_probs, evaluate, judge, log_probs, sample_tokens
from quant.quantize import quantize
from tests.hf_oracle import build_tiny_checkpoint, random_tokens
from tests.test_cli_behaviour import one_error_line
from tests.tiny_configs import TINY_CONFIGS


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("calibrate") / "mixtral", with_tokenizer=True,
                                 **TINY_CONFIGS["mixtral"])


# --- the text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"), ("empty", "is empty"), ("blank", "is empty"), ("binary", "is binary"),
    ("latin1", "is not UTF-8"), ("folder", "is a folder"), ("short", "only"),
])  # fmt: skip
def test_a_bad_text_file_is_one_line_and_nothing_is_written(kind, message, tiny_moe, tmp_path):
    text = tmp_path / "text.txt"
    contents = {"empty": b"", "blank": b" \n\t\n", "binary": b"\x7fELF\x00\x01\x02", "latin1": "café".encode("latin-1"),
                "short": b"Hello there."}
    if kind in contents:
        text.write_bytes(contents[kind])
    elif kind == "folder":
        text.mkdir()
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(tiny_moe), "-o", str(out), "--calibration-text", str(text)])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: calibration text {text}: ") and message in line, line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["text.txt"] if kind != "missing" else [])


def test_calibrating_a_float_conversion_is_refused(tiny_moe, tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(tiny_moe), "-o", str(tmp_path / "f"), "--bits", "16",
                                      "--calibrate"])
    assert result.exit_code == 1 and "--calibrate needs a quantized output" in one_error_line(result.stderr)
    assert not (tmp_path / "f").exists()


# --- a tiny MoE -------------------------------------------------------------------------------------


def test_moe_calibration_lowers_kl_and_mlx_lm_reads_it(tiny_moe, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load

    plain = quantize(tiny_moe, tmp_path / "plain", bits=4, group_size=32).out
    result = quantize(tiny_moe, tmp_path / "cal", bits=4, group_size=32, calibrate=True)
    c = result.calibration
    assert c.method == "gptq" and c.text == "built-in" and c.tokens > 1000
    assert c.experts_calibrated == 2 * 4 and c.experts_fallback == 0  # 2 layers x 4 experts, all well routed
    config = json.loads((result.out / "config.json").read_text())
    assert config["quantization_calibration"] == c.as_config()
    assert config["quantization"] == json.loads((plain / "config.json").read_text())["quantization"]
    # calibration halves the KL on this model (0.00054 -> 0.00028 measured); ask for a clear drop
    assert evaluate(tiny_moe, result.out).kl_mean < 0.75 * evaluate(tiny_moe, plain).kl_mean
    theirs, _ = mlx_lm_load(result.out)
    tokens = mx.array(random_tokens(TINY_CONFIGS["mixtral"]["vocab_size"], 12))
    np.testing.assert_allclose(np.array(theirs(tokens).astype(mx.float32)), np.array(load_model(result.out)(tokens)),
                               atol=1e-2)


def _expert_slices(folder, names):
    weights = mx.load(str(folder / "model.safetensors"))
    return {n: np.array(weights[n]) for n in names}


def test_rarely_routed_experts_fall_back_and_the_summary_says_so(tmp_path):
    """16 experts, one per token: on 4096 calibration tokens some see fewer than MIN_EXPERT_TOKENS; those are
    quantized exactly as without --calibrate, the others differ, and the summary counts both."""
    src = build_tiny_checkpoint(tmp_path / "rare", with_tokenizer=True,
                                **dict(TINY_CONFIGS["mixtral"], num_local_experts=16, num_experts_per_tok=1))
    runner = CliRunner()
    shown = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "cal"), "-g", "32", "--calibrate"])
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.stderr.splitlines() if line.startswith("calibrated (GPTQ) on "))
    m = re.search(r"routed experts: (\d+) of 32 on their own tokens, (\d+) saw fewer than (\d+)", line)
    assert m, line
    calibrated, fallback = int(m.group(1)), int(m.group(2))
    assert int(m.group(3)) == MIN_EXPERT_TOKENS and calibrated + fallback == 32 and 0 < fallback < 32
    assert runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "plain"), "-g", "32"]).exit_code == 0
    stacks = [f"model.layers.{i}.block_sparse_moe.switch_mlp.{p}.{t}" for i in range(2)
              for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "scales", "biases")]
    cal, plain = _expert_slices(tmp_path / "cal", stacks), _expert_slices(tmp_path / "plain", stacks)
    same = sum(all(np.array_equal(cal[n][e], plain[n][e]) for n in stacks if n.startswith(f"model.layers.{i}."))
               for i in range(2) for e in range(16))
    assert same == fallback
    config = json.loads((tmp_path / "cal" / "config.json").read_text())["quantization_calibration"]
    assert (config["experts_calibrated"], config["experts_fallback"]) == (calibrated, fallback)
    logits = load_model(tmp_path / "cal")(mx.array(random_tokens(384, 8)))
    assert bool(mx.isfinite(logits).all())


# --- the verdict ------------------------------------------------------------------------------------


def test_the_verdict_suggests_calibration_only_where_it_was_not_done():
    poor = Quality(tokens=508, kl_mean=0.2811, kl_max=1.8, ppl_source=15.5, ppl_quantized=20.1, top1_agreement=0.689)
    q4 = {"bits": 4, "group_size": 64}
    assert judge(poor, q4, calibrated=False).suggestions[-1] == "--calibrate"
    assert "--calibrate" not in judge(poor, q4, calibrated=True).suggestions
    assert "--calibrate" not in judge(poor, {"bits": 8, "group_size": 64}, calibrated=False).suggestions


# --- the real SmolLM2-135M --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_4bit(smollm2_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-calibrate")
    plain = quantize(smollm2_folder, root / "plain", bits=4, group_size=64).out
    return plain, quantize(smollm2_folder, root / "cal", bits=4, group_size=64, calibrate=True).out


@pytest.mark.slow
def test_smollm2_calibrated_is_read_by_mlx_lm_with_our_logits(smollm2_4bit, smollm2_folder):
    import mlx_lm

    _, cal = smollm2_4bit
    model, _ = mlx_lm.load(str(cal))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))  # compute in float32, as we do on the CPU
    tokens = mx.array(sample_tokens(smollm2_folder, max_tokens=64))[None]
    theirs, ours = np.array(model(tokens)), np.array(load_model(cal, dtype="float32")(tokens))
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_calibration_lowers_kl_and_keeps_the_answer(smollm2_4bit, smollm2_folder):
    plain, cal = smollm2_4bit
    tokens = sample_tokens(smollm2_folder)
    source = log_probs(load_model(smollm2_folder), tokens)
    kl = {name: compare_log_probs(source, log_probs(load_model(folder), tokens), tokens).kl_mean
          for name, folder in (("plain", plain), ("cal", cal))}
    assert kl["cal"] < 0.75 * kl["plain"], kl  # measured 0.147 vs 0.279
    model, tokenizer = load(str(cal))
    session = ChatSession(model, tokenizer, params=SamplingParams(temperature=0), max_tokens=16)
    answer = "".join(chunk.text for chunk in session.ask("What is the capital of France?"))
    assert "Paris" in answer, answer  # as the float model answers; the plain 4-bit file does not
