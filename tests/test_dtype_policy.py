"""The CPU dtype policy: half-precision weights stay half in memory, the model computes in float32.
(On a GPU everything is in the checkpoint's dtype: the tests of the CPU's policy are skipped there.)

Upcasting bf16 to float32 is exact, so the logits must equal those of the same checkpoint loaded all in
float32 (``--dtype float32``); what stays in which dtype, the blockwise output projection, the quantized
linear's BLAS prefill path and the load's peak memory are checked against direct computations.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from edge_llm.loader import load_model
from edge_llm.machine.backend import DtypePolicy, dtype_policy
from edge_llm.models import layers
from tests.backend import BACKEND, cpu_only
from tests.hf_oracle import build_tiny_checkpoint, random_tokens
from tests.tiny_configs import TINY_CONFIGS

CPU_POLICY = cpu_only("float32 compute over half-precision weights kept as stored")


def bf16_copy(folder, dst):
    """``folder`` with every float tensor stored as bf16 (as Hub checkpoints ship)."""
    dst.mkdir()
    weights = {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in mx.load(str(folder / "model.safetensors")).items()}
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return dst


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def bf16_llama(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    cfg = dict(TINY_CONFIGS["llama"], tie_word_embeddings=request.param)
    return bf16_copy(build_tiny_checkpoint(root / "f32", **cfg), root / "bf16")


def dtypes(model) -> dict[str, mx.Dtype]:
    return {k: v.dtype for k, v in tree_flatten(model.parameters())}


def test_policy_by_backend_and_request():
    cpu = BACKEND == "cpu"
    assert dtype_policy("BF16") == (DtypePolicy(mx.float32, None) if cpu else DtypePolicy(mx.bfloat16, mx.bfloat16))
    assert dtype_policy("BF16", "float32") == DtypePolicy(mx.float32, mx.float32)
    assert dtype_policy("F32", "bfloat16") == DtypePolicy(mx.bfloat16, mx.bfloat16)
    p = DtypePolicy(mx.float32, None)
    assert p.stored_dtype("model.layers.0.mlp.up_proj.weight", mx.bfloat16, 2) == mx.bfloat16
    assert p.stored_dtype("model.layers.0.mlp.up_proj.scales", mx.float16, 2) == mx.float16
    assert p.stored_dtype("model.norm.weight", mx.bfloat16, 1) == mx.float32
    assert p.stored_dtype("model.embed_tokens.weight", mx.bfloat16, 2) == mx.bfloat16
    assert p.stored_dtype("model.embed_tokens.weight", mx.bfloat16, 2, tied_embeddings=True) == mx.float32
    assert p.stored_dtype("model.embed_tokens.scales", mx.bfloat16, 2) == mx.float32


@CPU_POLICY
def test_half_weights_stay_half_and_logits_equal_float32(bf16_llama):
    tied = json.loads((bf16_llama / "config.json").read_text())["tie_word_embeddings"]
    model, reference = load_model(bf16_llama), load_model(bf16_llama, dtype="float32")
    stored = dtypes(model)
    assert stored["model.layers.0.mlp.gate_proj.weight"] == mx.bfloat16
    assert stored["model.layers.1.self_attn.o_proj.weight"] == mx.bfloat16
    assert stored["model.norm.weight"] == stored["model.layers.0.input_layernorm.weight"] == mx.float32
    assert stored["model.embed_tokens.weight"] == (mx.float32 if tied else mx.bfloat16)
    if not tied:
        assert stored["lm_head.weight"] == mx.bfloat16
    assert set(dtypes(reference).values()) == {mx.float32}
    tokens = mx.array(random_tokens(model.args.vocab_size, 24))
    for m in (model, reference):  # a multi-token forward and a cached decode step
        m.cache = m.make_cache()
    full = [np.array(m(tokens, cache=m.cache)) for m in (model, reference)]
    step = [np.array(m(tokens[:, -1:], cache=m.cache)) for m in (model, reference)]
    assert full[0].dtype == np.float32
    np.testing.assert_allclose(full[0], full[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(step[0], step[1], atol=1e-5, rtol=0)


def test_output_projection_upcasts_in_blocks(monkeypatch):
    monkeypatch.setattr(layers, "BLOCK_BYTES", 3 * 16 * 4)  # 3 rows of 16 per block: 7 blocks of 20 rows
    emb, head = nn.Embedding(20, 16), nn.Linear(16, 20, bias=True)
    emb.set_dtype(mx.bfloat16)
    head.set_dtype(mx.bfloat16)
    h = mx.random.normal((1, 5, 16))
    for module in (emb, head):
        w = module.weight.astype(mx.float32)
        expected = h @ w.T + (module.bias.astype(mx.float32) if "bias" in module else 0)
        out = layers.output_projection(module, h)
        assert out.dtype == mx.float32 and out.shape == (1, 5, 20)
        np.testing.assert_allclose(np.array(out), np.array(expected), atol=1e-5, rtol=0)


def test_quantized_linear_prefill_path_equals_quantized_matmul():
    base = nn.Linear(128, 96, bias=True)
    q = nn.QuantizedLinear.from_linear(base, 64, 4)
    q.bias = base.bias
    q.scales, q.biases = q.scales.astype(mx.bfloat16), q.biases.astype(mx.bfloat16)
    fast = layers.QuantizedLinear.of(q)
    assert set(fast.keys()) == set(q.keys()) and fast.trainable_parameters() == {}
    for rows in (1, layers.DEQUANTIZE_MIN_ROWS, 40):  # decode, and the dequantize + matmul path
        x = mx.random.normal((1, rows, 128))
        np.testing.assert_allclose(np.array(fast(x)), np.array(q(x)), atol=1e-4, rtol=1e-5)


def test_quantized_linear_prefill_dequantizes_a_block_at_a_time():
    """The float copy of a quantized weight exists a block of rows at a time, not whole: the peak above
    the inputs stays within a few blocks (the whole matrix would be 16 MB here, twice that while made)."""
    base = nn.Linear(1024, 4096)
    q = layers.QuantizedLinear.of(nn.QuantizedLinear.from_linear(base, 64, 4))
    x = mx.random.normal((1, 64, 1024))
    mx.eval(q.parameters(), x)
    expected = np.array(nn.QuantizedLinear.__call__(q, x))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = q(x)
    mx.eval(out)
    transient = mx.get_peak_memory() - before
    np.testing.assert_allclose(np.array(out), expected, atol=1e-4, rtol=1e-5)
    # two blocks in flight, each made in two steps, plus the products and their concatenation
    assert transient < 5 * layers.BLOCK_BYTES + 2 * out.nbytes, transient / 1e6


@CPU_POLICY
def test_quantized_checkpoint_keeps_half_scales_and_fast_layers(tmp_path):
    from quant.quantize import quantize

    src = bf16_copy(build_tiny_checkpoint(tmp_path / "f32", **TINY_CONFIGS["llama"]), tmp_path / "bf16")
    out = quantize(src, tmp_path / "q4", bits=4, group_size=64).out
    model = load_model(out)
    stored = dtypes(model)
    assert stored["model.layers.0.mlp.up_proj.scales"] == mx.bfloat16
    assert stored["model.embed_tokens.scales"] == stored["model.embed_tokens.biases"] == mx.float32
    assert isinstance(model.model.layers[0].mlp.up_proj, layers.QuantizedLinear)
    reference = load_model(out, dtype="float32")
    tokens = mx.array(random_tokens(model.args.vocab_size, 24))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), atol=1e-4, rtol=0)


@CPU_POLICY
def test_loading_converts_one_tensor_at_a_time(tmp_path):
    """The tied table is cast (bf16 -> float32) before the other tensors load, so its source copy is gone
    by the time the model is whole: the peak is the loaded model, not the model plus that source."""
    cfg = dict(TINY_CONFIGS["llama"], vocab_size=8192, intermediate_size=2048, num_hidden_layers=4,
               tie_word_embeddings=True)
    folder = bf16_copy(build_tiny_checkpoint(tmp_path / "f32", **cfg), tmp_path / "bf16")
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_model(folder)
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    table_source = cfg["vocab_size"] * cfg["hidden_size"] * 2
    assert loaded > 3 * table_source  # the layers outweigh the table's source copy
    assert mx.get_peak_memory() - before < loaded + table_source // 2
