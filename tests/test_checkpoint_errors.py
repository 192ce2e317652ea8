"""Bad checkpoints give one clear line (path + what to do), exit 1, and no traceback."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm import load_model
from edge_llm.errors import CheckpointError
from edge_llm.formats.folder import normalize_config
from edge_llm.formats.open import open_checkpoint
from tests.hf_oracle import build_tiny_checkpoint

TINY = dict(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "llama", with_tokenizer=True, **TINY)


@pytest.fixture
def broken(tiny, tmp_path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(tiny, dst)
    return dst


def shard_to_two(folder: Path) -> None:
    """Rewrites a single-file checkpoint as two shards plus model.safetensors.index.json."""
    import mlx.core as mx

    weights = mx.load(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, keys in halves.items():
        mx.save_safetensors(str(folder / file), {k: weights[k] for k in keys}, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def cli_error(folder: Path | str) -> str:
    result = CliRunner().invoke(app, ["run", str(folder), "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_folder(tmp_path):
    line = cli_error(tmp_path / "nope")
    assert "nope" in line and "no such model" in line


def test_no_config(broken):
    (broken / "config.json").unlink()
    assert "no config.json" in cli_error(broken)


def test_invalid_json(broken):
    (broken / "config.json").write_text("{not json")
    line = cli_error(broken)
    assert "config.json" in line and "invalid JSON" in line


def test_unknown_model_type_lists_supported(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (broken / "config.json").write_text(json.dumps(config))
    line = cli_error(broken)
    assert "'frobnicator' is not supported" in line and "llama" in line


def test_no_weights_and_pickles_refused(broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    line = cli_error(broken)
    assert "no *.safetensors" in line and "pickle" in line


def test_truncated_shard(broken):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = cli_error(broken)
    assert "model.safetensors" in line and "truncated" in line


def test_corrupt_header(broken):
    data = bytearray((broken / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"\xff" * 10
    (broken / "model.safetensors").write_bytes(bytes(data))
    line = cli_error(broken)
    assert "corrupt" in line


def test_missing_shard(broken):
    shard_to_two(broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    line = cli_error(broken)
    assert "model-00002-of-00002.safetensors" in line and "missing" in line


def test_missing_tensor(broken):
    import mlx.core as mx

    weights = mx.load(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "pt"})
    line = cli_error(broken)
    assert "model.layers.1.mlp.up_proj.weight" in line


def test_sharded_checkpoint_loads_like_single(tiny, broken):
    import mlx.core as mx
    import numpy as np

    shard_to_two(broken)
    assert len(open_checkpoint(broken).weight_files) == 2
    tokens = mx.array([[1, 5, 9, 3]])
    np.testing.assert_array_equal(np.array(load_model(broken)(tokens)), np.array(load_model(tiny)(tokens)))


def test_invalid_config_value_names_field(broken):
    config = json.loads((broken / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        load_model(broken)


def test_both_config_styles_normalize_alike():
    new = normalize_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0},
                            "num_local_experts": 8})
    old = normalize_config({"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0},
                            "num_experts": 8})
    for cfg in (new, old):
        assert cfg["rope_theta"] == 5e5
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
        assert cfg["num_local_experts"] == cfg["num_experts"] == 8
    plain = normalize_config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.get("rope_scaling") is None
