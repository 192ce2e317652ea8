"""The real SmolLM2-135M-Instruct: our greedy answers equal transformers' on the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli.main import app
from edge_llm import load
from edge_llm.generation.generate import generate_tokens
from edge_llm.generation.sampling import Sampler, SamplingParams
from tests.backend import BACKEND
from tests.smollm2 import NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(smollm2_folder):
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="module")
def ours(smollm2_folder):
    return load(smollm2_folder, dtype="float32")  # as transformers computes (the CPU's default anyway)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(prompt, reference, ours):
    hf_model, hf_tok = reference
    model, tokenizer = ours
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids == list(hf_ids["input_ids"])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(ids):].tolist()
    mine = list(generate_tokens(model, ids, model.make_cache(), Sampler(SamplingParams(temperature=0)), NEW_TOKENS))
    assert mine == theirs


def test_run_answers_paris(smollm2_folder):
    result = CliRunner().invoke(app, ["run", str(smollm2_folder), "--prompt", "What is the capital of France?",
                                      "--temp", "0", "--max-tokens", "24"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


def test_run_json_fields(smollm2_folder):
    result = CliRunner().invoke(app, ["run", str(smollm2_folder), "--prompt", "Say hello.", "--temp", "0",
                                      "--max-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("text", "tokens", "prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
                "peak_memory_bytes", "finish_reason", "backend", "model"):
        assert key in data
    assert data["generation_tokens"] == len(data["tokens"]) > 0
    assert data["finish_reason"] in ("stop", "length")
    assert data["peak_memory_bytes"] > 0 and data["backend"] == BACKEND
    _, tokenizer = load(smollm2_folder)
    assert tokenizer.decode(data["tokens"]) == data["text"]


def test_seeded_sampling_is_reproducible(ours):
    model, tokenizer = ours
    ids = tokenizer.encode_chat([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=7, repetition_penalty=1.1)
    runs = [list(generate_tokens(model, ids, model.make_cache(), Sampler(params), 12)) for _ in range(2)]
    assert runs[0] == runs[1]
    other = list(generate_tokens(model, ids, model.make_cache(), Sampler(SamplingParams(temperature=1.0, seed=8)), 12))
    assert other != runs[0]
