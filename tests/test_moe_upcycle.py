"""Real weights through the MoE path: SmolLM2-135M upcycled into a Mixtral-format checkpoint.

Every layer's dense MLP is copied into 4 experts (Hub layout: ``block_sparse_moe.experts.{e}.w1/w3/w2``)
behind a random router, top-2. Mixtral renormalizes the two routing weights to sum to 1, so each
token's MoE output equals the dense MLP's whatever the router picks: greedy answers must be the
dense model's, token for token. The router is random on purpose (tokens take different expert
pairs, checked), and prompts are long enough for the prefill to take the sorted-by-expert path.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from edge_llm import load
from edge_llm.generation.generate import generate_tokens
from edge_llm.generation.sampling import Sampler, SamplingParams
from edge_llm.models.switch import SORT_THRESHOLD

pytestmark = pytest.mark.slow

EXPERTS, TOP_K = 4, 2
NEW_TOKENS = 16
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]


def upcycle(src, dst) -> None:
    """Writes ``dst``: ``src``'s Llama checkpoint as a Mixtral one with copied experts and a random router."""
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=EXPERTS,
                  num_experts_per_tok=TOP_K)
    weights = mx.load(str(src / "model.safetensors"))
    key = mx.random.key(0)
    for i in range(config["num_hidden_layers"]):
        dense = {n: weights.pop(f"model.layers.{i}.mlp.{n}_proj.weight") for n in ("gate", "up", "down")}
        moe = f"model.layers.{i}.block_sparse_moe"
        for e in range(EXPERTS):
            for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                weights[f"{moe}.experts.{e}.{w}.weight"] = dense[n]
        key, sub = mx.random.split(key)
        weights[f"{moe}.gate.weight"] = mx.random.normal((EXPERTS, config["hidden_size"]), key=sub).astype(mx.bfloat16)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "done"):
            shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def models(smollm2_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upcycled") / "smollm2-moe"
    upcycle(smollm2_folder, folder)
    return load(smollm2_folder), load(folder)


def test_upcycled_checkpoint_is_a_real_moe(models):
    moe, _ = models[1]
    block = moe.layers[0].block_sparse_moe
    assert block.switch_mlp.gate_proj.weight.shape == (EXPERTS, 1536, 576)
    assert block.switch_mlp.down_proj.weight.shape == (EXPERTS, 576, 1536)
    # the random router sends tokens to different pairs of experts
    h = moe.model.embed_tokens(mx.array([list(range(100, 164))]))
    idx, weights = block.route(moe.layers[0].post_attention_layernorm(h))
    pairs = {tuple(sorted(p)) for p in np.array(idx)[0].tolist()}
    assert len(pairs) > 2
    np.testing.assert_allclose(np.array(weights.sum(-1)), 1.0, atol=1e-6)
    # the logits themselves agree (fp32 compute of the same bf16 weights), prefill path included
    dense, _ = models[0]
    tokens = mx.array([list(range(1000, 1000 + SORT_THRESHOLD // TOP_K))])
    np.testing.assert_allclose(np.array(moe(tokens)), np.array(dense(tokens)), atol=2e-3, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_answers_equal_dense_model(prompt, models):
    (dense, tokenizer), (moe, _) = models
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert (len(ids) - 1) * TOP_K >= SORT_THRESHOLD  # the prefill runs the sorted expert path
    greedy = Sampler(SamplingParams(temperature=0))
    theirs = list(generate_tokens(dense, ids, dense.make_cache(), greedy, NEW_TOKENS))
    ours = list(generate_tokens(moe, ids, moe.make_cache(), greedy, NEW_TOKENS))
    assert ours == theirs
