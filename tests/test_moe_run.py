"""`edge-llm run` and `edge-llm info` on a tiny checkpoint of each softmax-routed MoE architecture.

``run`` must answer with transformers' greedy tokens for the same chat prompt; ``info`` must count
every parameter once and, per token, only ``num_experts_per_tok`` of each layer's routed experts
(counts computed here by hand from the config, not from the files).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_llm.tokenizer import Tokenizer
from tests.hf_oracle import build_tiny_checkpoint, greedy_tokens, run_answer
from tests.tiny_configs import TINY_CONFIGS

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
PROMPT = "Hello! How are you today?"
MAX_TOKENS = 8


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    config = TINY_CONFIGS[request.param]
    # seed 1: with seed 0 the qwen2_moe model answers EOS at once, an empty chat that proves little
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), seed=1, with_tokenizer=True, **config)
    return config, folder


def expected_params(c: dict) -> tuple[int, int]:
    """(total, active per token) of a TINY_CONFIGS entry, from the architecture's definition."""
    mt, D, V, L = c["model_type"], c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H, KV = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or D // H
    E, k = c.get("num_local_experts") or c["num_experts"], c["num_experts_per_tok"]
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D
    if mt == "qwen2_moe" and c.get("qkv_bias", True):
        attn += H * hd + 2 * KV * hd
    if mt == "qwen3_moe":
        attn += 2 * hd  # q_norm, k_norm per head
    if mt == "olmoe":
        attn += H * hd + KV * hd  # q_norm, k_norm over the full projections
    expert_width = c["moe_intermediate_size"] if mt.startswith("qwen") else c["intermediate_size"]
    routed = E * 3 * D * expert_width
    moe = E * D + routed  # router + experts
    if mt == "qwen2_moe":
        moe += 3 * D * c["shared_expert_intermediate_size"] + D  # shared expert + its gate
    layer = attn + 2 * D + moe
    total = V * D * (1 if c.get("tie_word_embeddings") else 2) + D + L * layer
    active = total - L * (E - k) * 3 * D * expert_width
    return total, active


def test_info_counts_total_and_active_parameters(tiny):
    config, folder = tiny
    result = CliRunner().invoke(app, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    total, active = expected_params(config)
    assert (facts["params_total"], facts["params_active"]) == (total, active)
    assert facts["params_total"] > facts["params_active"]
    assert facts["model_type"] == config["model_type"]
    experts = config.get("num_local_experts") or config["num_experts"]
    assert facts["experts"] == f"{config['num_experts_per_tok']} of {experts} per token"


def test_info_active_count_is_exact_for_uneven_ratios(tmp_path):
    """Qwen1.5-MoE routes 4 of 60 experts: per-tensor rounding of 4/60 would drift; the count must not."""
    config = dict(TINY_CONFIGS["qwen2_moe"], num_experts=60, num_experts_per_tok=4, moe_intermediate_size=8)
    folder = build_tiny_checkpoint(tmp_path, **config)
    result = CliRunner().invoke(app, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert (facts["params_total"], facts["params_active"]) == expected_params(config)
    assert facts["experts"] == "4 of 60 per token"


def test_run_answers_like_transformers(tiny):
    config, folder = tiny
    data = run_answer(["run", str(folder), "--prompt", PROMPT, "--temp", "0", "--max-tokens", str(MAX_TOKENS)])
    assert data["generation_tokens"] == len(data["tokens"]) > 0 and data["text"]

    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert data["prompt_tokens"] == len(ids)
    theirs = greedy_tokens(folder, ids, MAX_TOKENS)
    assert data["tokens"] == theirs[: len(data["tokens"])]
    if data["finish_reason"] == "stop":
        assert theirs[len(data["tokens"])] in tokenizer.eos_token_ids
    else:
        assert data["finish_reason"] == "length" and len(data["tokens"]) == MAX_TOKENS
