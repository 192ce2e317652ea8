"""`edge-llm estimate --params N --arch A`: current public shapes, the one assumed named in the notes and --json.

The shape table (quant/reference.py) is checked against transformers: each reference config, built on the
meta device by transformers' own class for that model_type (Qwen2, Qwen3, Gemma2 included, which edge-llm
computes as their Llama stand-ins), has the parameter count our plan computes for it.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from cli.main import app
from quant import reference
from quant.estimate import config_only
from quant.plan import plan_quantized, source_dtype_of
from quant.recipes import make_recipe

HF_MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}  # stand-ins: the real class
NOT_HF_KEYS = {"model_type", "torch_dtype", "attention_bias"}


def our_params(config: dict, name: str) -> int:
    from edge_llm.loader import build_model

    checkpoint = config_only(config, name)
    plan = plan_quantized(build_model(checkpoint), make_recipe(32), "F32",
                          source_dtype_of(checkpoint))
    return plan.params_total


SHAPES = {ref.name: ref for ref in reference.REFERENCES}


@functools.cache
def transformers_params(name: str) -> int:
    """The numbers a checkpoint of the reference shape ``name`` holds (parameters and saved buffers such as
    DeepSeek-V3's routing bias), tied embeddings once."""
    ref = SHAPES[name]
    model_type = HF_MODEL_TYPE.get(ref.family, ref.config["model_type"])
    config = AutoConfig.for_model(model_type, **{k: v for k, v in ref.config.items() if k not in NOT_HF_KEYS})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return sum(t.numel() for t in state.values())


def assert_transformers_count(ours: int, name: str) -> None:
    """``ours`` is the parameter count transformers' own class has for the reference shape ``name``."""
    theirs = transformers_params(name)
    if SHAPES[name].family in reference.STAND_INS:  # a Llama stand-in: a few vectors per layer apart
        assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
    else:
        assert ours == theirs


@pytest.mark.parametrize("ref", reference.REFERENCES, ids=lambda r: r.name)
def test_reference_shapes_have_transformers_parameter_counts(ref):
    assert_transformers_count(our_params(ref.config, ref.name), ref.name)


def rough(*args: str) -> dict:
    result = CliRunner().invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("arch, params, shape", [
    ("llama", "7B", "Llama-3.1-8B"),  # the current Llama, not Llama 2
    ("llama3.1", "1B", "Llama-3.2-1B"),
    ("llama", "405B", "Llama-3.1-405B"),
    ("llama2", "7B", "Llama-2-7B"),
    ("qwen2.5", "0.5B", "Qwen2.5-0.5B"),
    ("Qwen2.5", "72B", "Qwen2.5-72B"),
    ("qwen3", "0.6B", "Qwen3-0.6B"),
    ("qwen3", "30B", "Qwen3-32B"),  # dense: the MoE is qwen3_moe
    ("qwen3-moe", "30B", "Qwen3-30B-A3B"),
    ("qwen3_moe", "235B", "Qwen3-235B-A22B"),
    ("mistral", "7B", "Mistral-7B-v0.3"),
    ("mistral", "24B", "Mistral-Small-24B"),
    ("gemma2", "27B", "Gemma-2-27B"),
    ("gemma", "2B", "Gemma-2-2B"),
    ("mixtral", "141B", "Mixtral-8x22B"),
    ("deepseek", "671B", "DeepSeek-V3"),
    ("deepseek_v2", "16B", "DeepSeek-V2-Lite"),
    ("olmoe", "7B", "OLMoE-1B-7B"),
])
def test_nearest_shape_of_the_family(arch, params, shape):
    data = rough("--params", params, "--arch", arch)
    assert data["exact"] is False and data["shape_of"] == shape
    assumed = data["assumed_shape"]
    config = reference.REFERENCE_CONFIGS[shape]
    assert assumed["name"] == shape and assumed["layers"] == config["num_hidden_layers"]
    assert_transformers_count(assumed["params"], shape)
    assert any(note.startswith(f"rough: assumed the shape of {shape} ({assumed['layers']} layers") for note in
               data["notes"]), data["notes"]


def test_the_notes_say_what_was_assumed():
    data = rough("--params", "7B", "--arch", "llama")
    assert data["assumed_shape"] == {
        "name": "Llama-3.1-8B", "family": "llama", "params": 8_030_261_248, "layers": 32, "hidden_size": 4096,
        "attention_heads": 32, "kv_heads": 8, "head_dim": 128, "vocab_size": 128256, "tied_embeddings": False,
    }
    assert ("rough: assumed the shape of Llama-3.1-8B (32 layers, hidden 4096, 32 query / 8 KV heads of 128, "
            "vocab 128256; 8.03B parameters), weights scaled to 7B") in data["notes"][0]
    table = CliRunner().invoke(app, ["estimate", "--params", "7B", "--arch", "qwen2.5"])
    assert table.exit_code == 0, table.output
    assert "assumed the shape of Qwen2.5-7B (28 layers" in table.stdout
    assert "Qwen2.5 computed as its Llama shape" in table.stdout
    moe = rough("--params", "30B", "--arch", "qwen3_moe")["assumed_shape"]
    assert moe["experts"] == 128 and moe["experts_per_token"] == 8
    mla = rough("--params", "671B", "--arch", "deepseek_v3")["assumed_shape"]
    assert mla["kv_lora_rank"] == 512 and mla["kv_heads"] is None


def test_the_kv_cache_follows_the_assumed_shape():
    """Per token: 2 · layers · KV heads · head dim; a GQA Llama 3 keeps a quarter of Llama 2's (8 vs 32 heads)."""
    llama3 = rough("--params", "7B", "--arch", "llama", "--context", "4096")
    llama2 = rough("--params", "7B", "--arch", "llama2", "--context", "4096")
    qwen = rough("--params", "7B", "--arch", "qwen2.5", "--context", "4096")
    assert llama3["kv_cache_bytes"] * 4 == llama2["kv_cache_bytes"]
    assert qwen["kv_cache_bytes"] * 32 * 8 == llama3["kv_cache_bytes"] * 28 * 4


def test_unknown_arch_is_one_line_listing_the_known_ones():
    result = CliRunner().invoke(app, ["estimate", "--params", "7B", "--arch", "gpt9"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and "--arch 'gpt9'" in line
    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "mixtral", "qwen3_moe", "deepseek_v3", "olmoe"):
        assert family in line
