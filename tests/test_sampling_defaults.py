"""Per-model sampling defaults: generation_config.json, GGUF ``general.sampling.*``, the embedded default's
model card, then edge-llm's own; flags override; ``info`` and the chat's ``/show`` say where each came from."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.default_model import CARD_SAMPLING, CARD_SOURCE, TUNED_SAMPLING, TUNED_SOURCE, default_model_path
from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.sampling_defaults import EDGE_LLM_DEFAULTS, EDGE_LLM_SOURCE, model_settings
from tests.gguf_files import copy_tokenizer_metadata, write_gguf
from tests.hf_oracle import build_tiny_checkpoint
from tests.test_gguf_llama import tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", with_tokenizer=True,
                                 hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)  # fmt: skip


def with_generation_config(folder, tmp_path, generation: dict):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **generation}))
    return copy


def settings_of(path) -> dict[str, tuple[float, str]]:
    return {k: (s.value, s.source) for k, s in model_settings(open_checkpoint(path)).settings.items()}


def test_generation_config_values_win_and_the_rest_are_edge_llm_defaults(tiny_folder, tmp_path):
    folder = with_generation_config(tiny_folder, tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.8,
                                                            "top_k": 20, "repetition_penalty": 1.05})
    got = settings_of(folder)
    assert got["temperature"] == (0.7, "generation_config.json")
    assert got["top_p"] == (0.8, "generation_config.json")
    assert got["top_k"] == (20, "generation_config.json")
    assert got["repetition_penalty"] == (1.05, "generation_config.json")
    assert got["min_p"] == (EDGE_LLM_DEFAULTS["min_p"], EDGE_LLM_SOURCE)


def test_do_sample_false_means_greedy(tiny_folder, tmp_path):
    folder = with_generation_config(tiny_folder, tmp_path, {"do_sample": False, "temperature": 0.9})
    assert settings_of(folder)["temperature"] == (0.0, "generation_config.json")


def test_a_file_with_only_token_ids_says_nothing(tiny_folder, tmp_path):
    folder = with_generation_config(tiny_folder, tmp_path, {})
    got = settings_of(folder)
    assert got == {k: (v, EDGE_LLM_SOURCE) for k, v in EDGE_LLM_DEFAULTS.items()}


def test_invalid_values_in_the_file_fall_back_with_a_warning(tiny_folder, tmp_path, caplog):
    folder = with_generation_config(tiny_folder, tmp_path, {"temperature": -1, "top_p": "high", "top_k": 2.5,
                                                            "min_p": True, "repetition_penalty": 1.2})
    got = settings_of(folder)
    assert got["repetition_penalty"] == (1.2, "generation_config.json")
    for name in ("temperature", "top_p", "top_k", "min_p"):
        assert got[name] == (EDGE_LLM_DEFAULTS[name], EDGE_LLM_SOURCE)
        assert name in caplog.text


def test_gguf_sampling_keys(tmp_path):
    def sampling_keys(w):
        w.add_float32("general.sampling.temp", 0.6)
        w.add_uint32("general.sampling.top_k", 20)
        w.add_float32("general.sampling.top_p", 0.95)
        w.add_float32("general.sampling.min_p", 0.0)
        w.add_float32("general.sampling.penalty_repeat", 1.1)

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=1),
               tokenizer=copy_tokenizer_metadata(default_model_path()), extra_metadata=sampling_keys)
    got = settings_of(path)
    assert got["temperature"] == (pytest.approx(0.6), "GGUF metadata")
    assert got["top_k"] == (20, "GGUF metadata")
    assert got["top_p"] == (pytest.approx(0.95), "GGUF metadata")
    assert got["min_p"] == (0.0, "GGUF metadata")  # a declared zero is a choice, not a gap
    assert got["repetition_penalty"] == (pytest.approx(1.1), "GGUF metadata")


def test_the_embedded_default_uses_what_was_measured_then_its_model_card():
    got = settings_of(default_model_path())
    assert got["top_p"] == (TUNED_SAMPLING["top_p"], TUNED_SOURCE)
    assert got["temperature"] == (CARD_SAMPLING["temperature"], CARD_SOURCE)


def test_flags_override_and_are_validated(tiny_folder):
    settings = model_settings(open_checkpoint(tiny_folder)).override(temperature=0.0, top_k=None)
    assert settings["temperature"].value == 0.0 and settings["temperature"].source == "command line"
    assert settings["top_k"].source == EDGE_LLM_SOURCE
    with pytest.raises(ValueError, match="top_p"):
        settings.override(top_p=1.5)
    assert settings.params(seed=3).seed == 3


def test_info_shows_the_settings_and_their_sources(tiny_folder, tmp_path):
    folder = with_generation_config(tiny_folder, tmp_path, {"temperature": 0.3})
    result = CliRunner().invoke(app, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    sampling = json.loads(result.stdout)["sampling"]
    assert sampling["temperature"] == {"value": 0.3, "source": "generation_config.json"}
    assert sampling["top_k"]["source"] == EDGE_LLM_SOURCE
    text = CliRunner().invoke(app, ["info", str(folder)]).stdout
    assert "temperature 0.3 (generation_config.json)" in text
