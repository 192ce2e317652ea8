"""``edge-llm run`` refuses, before loading, a model that will not fit, and says what would.

The model that does not fit is real on disk: a Llama-shaped checkpoint whose bf16 weights take 1.2 times
this machine's memory (a sparse file: its headers are complete, its data never read); at 4 bits (a
quarter of that and a little more) it fits.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.machine.backend import detect
from quant import fit
from quant.estimate import Machine
from tests.hf_oracle import build_tiny_checkpoint
from tests.tiny_configs import TINY_CONFIGS

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, VOCAB, KV = 4096, 14336, 32000, 8


def llama_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (KV * 128, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV * 128, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTER), f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        })
    return shapes


def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    """The header of a bf16 safetensors file holding ``shapes``, and the file's full size."""
    entries, pos = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + pos


def too_big_config(memory: int) -> tuple[dict, dict[str, tuple[int, ...]]]:
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV * 128 + 3 * HIDDEN * INTER
    layers = max(1, math.ceil((1.2 * memory / 2) / per_layer))  # bf16 weights = 1.2 x the memory
    config = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=KV,
                  max_position_embeddings=8192, torch_dtype="bfloat16", tie_word_embeddings=False)
    return config, llama_tensors(layers)


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    config, shapes = too_big_config(detect().memory_bytes)
    header, size = safetensors_header(shapes)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(size)  # sparse: the data is never read
    (folder / "config.json").write_text(json.dumps(config))
    from tests.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    return folder


def test_run_refuses_a_model_that_does_not_fit(huge):
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", str(huge), "--prompt", "hi"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in line
    assert "short" in line and "KV cache" in line and "--force" in line
    assert "--bits 4" in line or "--bits 8" in line  # what would fit, as a command


def test_estimate_agrees_with_the_refusal(huge):
    result = CliRunner().invoke(app, ["estimate", str(huge), "--json", "--context", "4096"])
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["precision"] == "bf16 (stored)"
    fitting = [r for r in data["rows"] if r["fits"]]
    assert fitting and all(r["bits"] <= 8 for r in fitting)


def test_force_skips_the_check_and_a_fitting_model_runs(tmp_path, monkeypatch):
    src = build_tiny_checkpoint(tmp_path / "tiny", with_tokenizer=True, **TINY_CONFIGS["llama"])
    args = ["run", str(src), "--prompt", "Hello", "--max-tokens", "2", "--temp", "0"]
    assert CliRunner().invoke(app, args).exit_code == 0  # fits: no refusal
    # The same model on a machine with 10 MB of memory (the one thing a test cannot change for real):
    tiny_machine = Machine("cpu", 10 * 10**6, "ram", None)
    monkeypatch.setattr(fit.Machine, "this", classmethod(lambda cls, max_memory=None: tiny_machine))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "10.0 MB of RAM" in refused.stderr and "short" in refused.stderr
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
