"""config.json from a stranger: every bad field ends in one line naming the file and the field, exit 1,
no traceback, and a config that claims more model than its weights hold is refused before anything is built
(issue 13: the memory/time bombs and tracebacks of config.json)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest

from edge_llm.errors import CheckpointError
from edge_llm.formats.open import open_checkpoint
from edge_llm.models import ARCHITECTURES, get_architecture
from edge_llm.models.fields import RULES
from tests.hostile_files import TINY_LLAMA, invoke, one_line_error, tiny_folder
from tests.hostile_files import refused as refused_by_all
from tests.tiny_configs import TINY_CONFIGS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("hostile-config") / "tiny")


def with_config(tiny: Path, dst: Path, **changes) -> Path:
    shutil.copytree(tiny, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def refused(folder: Path, *words: str) -> None:
    """Every command that reads the checkpoint refuses it with one line naming config.json and ``words``."""
    refused_by_all(folder, "config.json", *words, timeout=5)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("num_attention_heads", 0), ("head_dim", 0), ("num_key_value_heads", 0),
    ("num_hidden_layers", -1), ("vocab_size", 10**12), ("intermediate_size", 10**12),
    ("rope_theta", 0), ("sliding_window", 0), ("sliding_window", -1), ("max_position_embeddings", -5),
    ("rms_norm_eps", -1),
    ("num_hidden_layers", "2"), ("num_hidden_layers", 2.5), ("tie_word_embeddings", "yes"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}), ("rope_scaling", {"rope_type": "linear"}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}),
    ("hidden_act", "tanh"), ("head_dim", 7),
])  # fmt: skip
def test_bad_field_is_named(tiny, tmp_path, field, value):
    refused(with_config(tiny, tmp_path / "m", **{field: value}), f"'{field}")


def test_negative_hidden_size_is_not_a_math_domain_error(tiny, tmp_path):
    folder = with_config(tiny, tmp_path / "m", hidden_size=-576)
    line = one_line_error("run", folder, "--prompt", "hi")
    assert "'hidden_size'" in line and "-576" in line and "math domain" not in line


def test_negative_context_blames_the_config_not_an_option(tiny, tmp_path):
    line = one_line_error("run", with_config(tiny, tmp_path / "m", max_position_embeddings=-5), "--prompt", "hi")
    assert "max_position_embeddings" in line and "--context" not in line


@pytest.mark.parametrize("block, word", [({"bits": 4}, "group_size"), ("yes", "quantization"),
                                         ({"group_size": 64, "bits": 7}, "bits"),
                                         ({"group_size": 64, "bits": 4, "lm_head": "yes"}, "lm_head")])
def test_bad_quantization_block(tiny, tmp_path, block, word):
    refused(with_config(tiny, tmp_path / "m", quantization=block), "quantization", word)


def test_mixture_routes_to_more_experts_than_it_has(tmp_path):
    config = dict(TINY_CONFIGS["mixtral"], hidden_size=32, intermediate_size=16, num_experts_per_tok=5)
    folder = tiny_folder(tmp_path / "m", dict(config, num_experts_per_tok=2))
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, "num_experts_per_tok")


def test_mla_rank_zero(tmp_path):
    config = dict(TINY_CONFIGS["deepseek_v2"], hidden_size=32, moe_intermediate_size=16, intermediate_size=32)
    folder = tiny_folder(tmp_path / "m", config)
    assert invoke("run", folder, "--prompt", "hi", "--max-tokens", "1").exit_code == 0
    (folder / "config.json").write_text(json.dumps(dict(config, kv_lora_rank=0)))
    refused(folder, "kv_lora_rank")


@pytest.mark.parametrize("changes", [
    {"num_hidden_layers": 10**9}, {"num_hidden_layers": 1e9}, {"num_hidden_layers": 1000, "hidden_size": 4096},
    {"vocab_size": 2**31 - 1}, {"intermediate_size": 2**31 - 1},
])  # fmt: skip
def test_size_bombs_are_refused_in_milliseconds(tiny, tmp_path, changes):
    folder = with_config(tiny, tmp_path / "m", **changes)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="config"):
        open_checkpoint(folder)
    assert time.monotonic() - start < 0.5
    refused(folder, next(iter(changes)))


def test_config_larger_than_its_weights_names_both(tiny, tmp_path):
    line = one_line_error("info", with_config(tiny, tmp_path / "m", num_hidden_layers=1000, hidden_size=4096))
    assert "parameters" in line and "weights hold" in line and "bytes" in line


def test_deeply_nested_config(tiny, tmp_path):
    folder = with_config(tiny, tmp_path / "m")
    deep = "[" * 200_000 + "]" * 200_000
    (folder / "config.json").write_text('{"model_type": "llama", "rope_scaling": ' + deep + "}")
    refused(folder, "invalid JSON")


def test_valid_config_still_runs(tiny):
    result = invoke("run", tiny, "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 0, result.output


def test_integral_floats_are_integers(tiny, tmp_path):
    folder = with_config(tiny, tmp_path / "m", max_position_embeddings=256.0, num_hidden_layers=2.0)
    assert invoke("run", folder, "--prompt", "hi", "--max-tokens", "2").exit_code == 0


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_field_of_every_architecture_has_a_rule(model_type):
    """A field without a rule would reach the model unchecked: adding one means adding its rule."""
    fields = [f.name for f in dataclasses.fields(get_architecture(model_type).ModelArgs)]
    assert [f for f in fields if f not in RULES] == []


def test_tiny_llama_fields_are_all_checked():
    assert set(TINY_LLAMA) - set(RULES) <= {"model_type", "architectures", "eos_token_id", "torch_dtype"}


def test_products_of_fields_fit_32_bit_shapes(tmp_path):
    """Found by the long fuzz run: 1e9 shared experts of width 16 made a 1.6e10-wide layer (OverflowError)."""
    config = dict(TINY_CONFIGS["deepseek_v3"], hidden_size=32, moe_intermediate_size=16, intermediate_size=32)
    folder = tiny_folder(tmp_path / "m", config)
    (folder / "config.json").write_text(json.dumps(dict(config, n_shared_experts=10**9)))
    refused(folder, "n_shared_experts", "2^31-1")
