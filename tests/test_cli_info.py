"""`edge-llm info` and `edge-llm doctor` report facts read from the checkpoint and the machine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cli.main import app
from edge_llm.kernels import status
from tests.backend import BACKEND


def test_info_smollm2(smollm2_folder):
    result = CliRunner().invoke(app, ["info", str(smollm2_folder), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    # SmolLM2-135M: 134.5M parameters (tied embeddings counted once), 30 layers, bf16, 8192 context.
    assert 134_000_000 < facts["params_total"] < 135_000_000
    assert facts["params_active"] == facts["params_total"]
    assert facts["model_type"] == "llama" and facts["layers"] == 30
    assert facts["dtype"] == "BF16" and facts["quantization"] is None
    assert facts["context_length"] == 8192
    assert facts["tokenizer"] and facts["vocab_size"] == 49152 and facts["chat_template"]
    human = CliRunner().invoke(app, ["info", str(smollm2_folder)])
    assert human.exit_code == 0 and "134.52M" in human.stdout


def test_doctor():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["backend"] == BACKEND and facts["memory_bytes"] > 1e9
    assert facts["mlx_version"] and facts["blas"]
    assert facts["cpu_kernels"] == status().detail and "\n" not in facts["cpu_kernels"]
    text = CliRunner().invoke(app, ["doctor"]).stdout
    assert f"cpu kernels: {facts['cpu_kernels']}" in text
    from quant import affine_native

    assert facts["quantize_search"] == affine_native.status() and f"quantize search: {affine_native.status()}" in text
    assert facts["quantize_search"].startswith("compiled (") or "MLX ops" in facts["quantize_search"]
