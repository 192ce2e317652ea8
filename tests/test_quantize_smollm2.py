"""The real SmolLM2-135M-Instruct quantized by us: mlx-lm reads it, and it is closer to the source than
mlx-lm's own 4-bit at the same group size.

mlx-lm (a test dependency, code we did not write) loads our folder with ``mlx_lm.load``; with its float
parameters cast to float32 its logits must equal ours, which proves it reads the same numbers (rope theta
from our config included). Quality is the mean KL divergence from the bf16 source on the built-in text
(``quant.quality``); mlx-lm's 4-bit comes from ``mlx_lm.convert`` on the same source.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from edge_llm.loader import load_model
from quant.quality import compare_log_probs, evaluate, log_probs, sample_tokens
from quant.quantize import quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(smollm2_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-quant")
    ours = {bits: quantize(smollm2_folder, root / f"ours-{bits}", bits=bits, group_size=64).out for bits in (4, 8)}
    return root, ours


@pytest.fixture(scope="module")
def mlx_lm_4bit(smollm2_folder, converted):
    from mlx_lm import convert

    root, _ = converted
    convert(str(smollm2_folder), str(root / "mlx-lm-4"), quantize=True, q_bits=4, q_group_size=64)
    return root / "mlx-lm-4"


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_loads_our_output_with_the_same_logits(bits, converted, smollm2_folder):
    import mlx_lm

    _, ours = converted
    model, tokenizer = mlx_lm.load(str(ours[bits]))
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))  # compute in float32, as we do on the CPU
    tokens = sample_tokens(smollm2_folder, max_tokens=64)
    assert tokenizer.encode("The capital of France") == sample_tokens(ours[bits], "The capital of France")
    theirs = np.array(model(mx.array(tokens)[None]))
    mine = np.array(load_model(ours[bits], dtype="float32")(mx.array(tokens)[None]))
    np.testing.assert_allclose(mine, theirs, atol=2e-3, rtol=0)
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()


def test_4bit_kl_is_no_worse_than_mlx_lm_and_8bit_is_tiny(converted, mlx_lm_4bit, smollm2_folder):
    _, ours = converted
    tokens = sample_tokens(smollm2_folder)
    source = log_probs(load_model(smollm2_folder), tokens)
    q4 = compare_log_probs(source, log_probs(load_model(ours[4]), tokens), tokens)
    theirs = compare_log_probs(source, log_probs(load_model(mlx_lm_4bit), tokens), tokens)
    q8 = compare_log_probs(source, log_probs(load_model(ours[8]), tokens), tokens)
    assert q4.tokens > 300
    assert q4.kl_mean <= theirs.kl_mean, (q4, theirs)
    assert q8.kl_mean < 0.01 and abs(q8.ppl_quantized / q8.ppl_source - 1) < 0.01
    assert q8.kl_mean < q4.kl_mean
    # the file format is the same: same size as mlx-lm's (scales and offsets in the source's bf16)
    sizes = [sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (ours[4], mlx_lm_4bit)]
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[1]


def test_evaluate_api(converted, smollm2_folder):
    _, ours = converted
    q = evaluate(smollm2_folder, ours[8], max_tokens=128)
    assert q.tokens == 127 and 0 <= q.kl_mean < 0.01 and q.top1_agreement > 0.9


def test_fp16_output_equals_the_source_cast(smollm2_folder, tmp_path):
    out = quantize(smollm2_folder, tmp_path / "fp16", bits=16).out
    source, written = mx.load(str(smollm2_folder / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert set(source) == set(written)
    for name, w in written.items():
        assert w.dtype == mx.float16
        assert mx.array_equal(w, source[name].astype(mx.float16)).item(), name
    tokens = mx.array(sample_tokens(smollm2_folder, max_tokens=32))[None]
    reference = load_model(smollm2_folder, dtype="float32")
    reference.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), reference.parameters()))
    np.testing.assert_array_equal(np.array(load_model(out)(tokens)), np.array(reference(tokens)))
