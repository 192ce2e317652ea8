"""``edge-llm info`` and ``run`` on GGUF files, as a person types them (typer's CliRunner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

from cli.main import app
from edge_llm.formats.open import open_checkpoint
from edge_llm.modelinfo import describe
from tests.gguf_files import copy_tokenizer_metadata, write_gguf
from tests.smollm2 import gguf_path
from tests.test_gguf_llama import tiny_llama


def test_info_on_the_smollm2_gguf(smollm2_folder):
    result = CliRunner().invoke(app, ["info", str(gguf_path()), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    converted = describe(open_checkpoint(smollm2_folder))  # transformers' conversion of the same file
    assert facts["architecture"] == "LlamaForCausalLM" and facts["model_type"] == "llama"
    assert facts["params_total"] == converted.params_total == 134_515_008
    assert facts["layers"] == 30 and facts["context_length"] == 8192
    assert facts["quantization"] == "4-bit affine, group 32 (GGUF Q4_1, Q8_0, F32)"
    assert facts["tokenizer"] == "GGUF byte-level BPE" and facts["vocab_size"] == 49152
    assert facts["chat_template"] == "default"
    assert facts["size_bytes"] == pytest.approx(gguf_path().stat().st_size, rel=0.01)


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    """A tiny Llama in Q4_K/Q6_K with SmolLM2's tokenizer (vocab 49152: embedding rows must cover it)."""
    path = tmp_path_factory.mktemp("kq") / "tiny.Q4_K_M.gguf"
    model = tiny_llama(vocab_size=49152, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=1)  # fmt: skip
    write_gguf(path, model, lambda name, shape: Q.Q6_K if "down" in name or "embed" in name else Q.Q4_K,
               tokenizer=copy_tokenizer_metadata(gguf_path()))  # fmt: skip
    return path


def test_info_on_a_k_quant_file(kquant_file):
    """Q4_K_M's layout: Q4_K kept quantized (4-bit, group 32), Q6_K dequantized."""
    result = CliRunner().invoke(app, ["info", str(kquant_file), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["quantization"].startswith("4-bit affine, group 32 (GGUF ")  # Q4_K stays quantized
    assert "Q4_K" in facts["quantization"] and "Q6_K" in facts["quantization"]


def test_run_a_k_quant_file_warns_about_memory(kquant_file):
    """The memory note reaches the user's terminal: a real process, the installed command."""
    command = [sys.executable, "-m", "cli.main", "run", str(kquant_file), "--prompt", "Hello", "--max-tokens", "4",
               "--temp", "0", "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["generation_tokens"] == len(answer["tokens"]) > 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert "Q6_K tensors are dequantized to float16" in warnings[0] and "GB on disk" in warnings[0]


def test_estimate_on_the_smollm2_gguf():
    """The estimator reads the GGUF as it reads a folder: its stored row is what loading really takes."""
    from mlx.utils import tree_flatten

    from edge_llm import load

    result = CliRunner().invoke(app, ["estimate", str(gguf_path()), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["precision"] == "4-bit (stored)" and facts["group_size"] == 32
    assert facts["params_total"] == 134_515_008
    assert facts["file_bytes"] == pytest.approx(gguf_path().stat().st_size, rel=1e-3)
    model, _ = load(gguf_path())
    assert facts["weights_bytes"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_info_on_a_file_without_tokenizer(tmp_path):
    path = tmp_path / "weights-only.gguf"
    write_gguf(path, tiny_llama(), Q.Q8_0)
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["tokenizer"] is None and facts["quantization"] == "8-bit affine, group 32 (GGUF Q8_0, F32)"
    result = CliRunner().invoke(app, ["run", str(path), "--prompt", "hi"])
    assert result.exit_code == 1 and "holds no tokenizer" in result.stderr


def test_quantize_the_smollm2_gguf_to_mlx_safetensors(tmp_path):
    """``quantize FILE.gguf -o OUT`` copies Q4_1/Q8_0 exactly: the folder computes what the file does, in ours
    and in mlx-lm (code we did not write), whose float32 logits must match, and it answers the question."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx.utils import tree_map

    from edge_llm.loader import load_model

    out = tmp_path / "smollm2-q4"
    result = CliRunner().invoke(app, ["quantize", str(gguf_path()), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["source_bytes"] == pytest.approx(gguf_path().stat().st_size, rel=0.01)
    assert summary["output_bytes"] == pytest.approx(summary["source_bytes"], rel=0.02)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 in the file
    model, tokenizer = mlx_lm.load(str(out))
    tokens = tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    ids = mx.array(tokens)[None]
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    theirs = np.array(model(ids))
    mine = np.array(load_model(out)(ids))
    np.testing.assert_array_equal(mine, np.array(load_model(gguf_path())(ids)))
    np.testing.assert_allclose(mine, theirs, atol=2e-3, rtol=0)
    answer = CliRunner().invoke(app, ["run", str(out), "--prompt", "What is the capital of France?", "--temp", "0",
                                      "--max-tokens", "24"])
    assert answer.exit_code == 0 and "Paris" in answer.stdout, answer.output


def test_quantize_the_smollm2_gguf_with_eval(tmp_path):
    """``--eval`` against a GGUF source (no tokenizer.json beside it): the text is tokenized as the output folder's
    tokenizer, the file's own; 8-bit of the file is nearly lossless."""
    out = tmp_path / "smollm2-q8"
    result = CliRunner().invoke(app, ["quantize", str(gguf_path()), "-o", str(out), "--bits", "8", "--eval", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["eval_tokens"] > 100 and summary["kl_divergence"] < 0.01, summary
    assert summary["top1_agreement"] > 0.95 and not summary["verdict"]["poor"], summary


def test_quantize_a_k_quant_file(kquant_file, tmp_path):
    """Q4_K is copied (its float32 scales rounded to float16); Q6_K, which MLX cannot run, becomes 6-bit."""
    import mlx.core as mx
    import numpy as np

    from edge_llm.loader import load_model

    out = tmp_path / "kq"
    result = CliRunner().invoke(app, ["quantize", str(kquant_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["bits"] == 4 and block["group_size"] == 32
    assert block["model.layers.0.mlp.down_proj"]["bits"] == 6 and block["model.embed_tokens"]["bits"] == 6
    ids = mx.array([[1, 504, 3458, 282, 4649, 314]])
    source, converted = np.array(load_model(kquant_file)(ids)), np.array(load_model(out)(ids))
    assert np.corrcoef(source.ravel(), converted.ravel())[0, 1] > 0.999
