"""generate_tokens refuses prompt ids outside the model's vocabulary instead of letting MLX's gather read past
the embedding table (an out-of-bounds read: it crashed a benchmark 1 run in 10, or returns garbage)."""

from __future__ import annotations

import pytest

from edge_llm.generation.generate import generate_tokens
from edge_llm.generation.sampling import Sampler, SamplingParams
from edge_llm.models import build
from tests.tiny_configs import TINY_CONFIGS


@pytest.mark.parametrize("bad", [[1, 2, 10**6], [-1, 3]])
def test_prompt_ids_outside_the_vocabulary_are_refused(bad):
    config = {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"}
    model = build("llama", config)
    with pytest.raises(ValueError, match=f"0 to {config['vocab_size'] - 1}"):
        next(generate_tokens(model, bad, model.make_cache(), Sampler(SamplingParams(temperature=0)), 2))
    last = config["vocab_size"] - 1  # the largest id is fine
    assert len(list(generate_tokens(model, [0, last], model.make_cache(), Sampler(SamplingParams(temperature=0)),
                                    2))) == 2
