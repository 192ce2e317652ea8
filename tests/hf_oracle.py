"""transformers as the oracle: tiny random checkpoints and their reference logits.

Tests build a checkpoint with ``AutoConfig.for_model`` + ``from_config`` + ``save_pretrained`` and compare
our fp32 logits with transformers' on the same tokens. Code we did not write decides what is right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny_tokenizer import VOCAB_SIZE, write_tiny_tokenizer

TOLERANCE = 1e-4


def build_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0, old_style_keys: bool = False,
                          with_tokenizer: bool = False, **config) -> Path:
    """Saves a randomly initialised transformers model of ``model_type`` into ``folder``.

    ``with_tokenizer`` adds a small trained BPE tokenizer (vocab_size must cover it).
    ``old_style_keys`` rewrites config.json from transformers 5's ``rope_parameters`` into the classic
    ``rope_theta`` + ``rope_scaling`` keys that older Hub checkpoints carry.
    """
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and some biases at 0: perturb everything so no parameter is inert.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    if old_style_keys:
        rewrite_config_old_style(folder / "config.json")
    if with_tokenizer:
        assert cfg.vocab_size >= VOCAB_SIZE, "vocab_size must cover the tiny tokenizer"
        write_tiny_tokenizer(folder)
    return folder


def rewrite_config_old_style(path: Path) -> None:
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters", None)
    if params:
        config["rope_theta"] = params.pop("rope_theta")
        if params.get("rope_type", "default") != "default":
            params["type"] = params["rope_type"]
            config["rope_scaling"] = params
    path.write_text(json.dumps(config, indent=2))


def reference_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def random_tokens(vocab_size: int, length: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length))


def greedy_tokens(folder: Path, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``ids``, ``max_tokens`` long: no stop token ends it, so an
    answer that stopped early is compared with its prefix."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids) :].tolist()


def run_answer(args: list[str]) -> dict:
    """``edge-llm run ARGS`` as a person reads it and with ``--json``: both succeed with the same text; the
    JSON summary."""
    from typer.testing import CliRunner

    from cli.main import app

    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert plain.stdout.rstrip("\n") == data["text"]
    return data


def check_logits_match(folder: Path, vocab_size: int) -> None:
    """Our logits for two random rows of 24 tokens are transformers' (fp32, within ``TOLERANCE``)."""
    import mlx.core as mx

    from edge_llm import load_model

    tokens = random_tokens(vocab_size, 24, batch=2)
    ours = np.array(load_model(folder)(mx.array(tokens)))
    theirs = reference_logits(folder, tokens)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)


def check_cached_decoding(model, tokens, prefix: int) -> list:
    """A prefill of ``prefix`` tokens, then one decode step per token through the same cache, gives the full
    forward's logits; returns that cache."""
    import mlx.core as mx

    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, :prefix], cache=cache)]
    for i in range(prefix, tokens.shape[1]):
        steps.append(model(tokens[:, i : i + 1], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=TOLERANCE, rtol=0)
    assert cache[0].offset == tokens.shape[1]
    return cache
