"""The CPU kernels' fused decode ops: the attention step (``kernels.attention_step``: rope, the cache write and
attention in three ops instead of about fifteen) and a layer's projections of one input as one product
(``layers.projections``: q/k/v, gate/up). Each must give the bits of the unfused ops (which the architecture
parity tests check against transformers); the attention step writes into the cache's buffer in place only when
nothing else holds it; a model's logits stay unchanged."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from edge_llm import kernels
from edge_llm.kernels import ops
from edge_llm.models.cache import BatchRows, KVCache
from edge_llm.models.layers import FloatLinear, QuantizedLinear, projections

pytestmark = pytest.mark.skipif(not kernels.active(), reason="the CPU kernels are not active here")


def normal(shape, seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


def unfused(q, k, v, k_cache, v_cache, offset, dims, traditional, inv_freq, rope_scale, scale):
    """The same step through the separate ops the models ran before: [B, L, H, D] -> [B, H, L, D], rope, slice
    update, attention over the filled rows, back to [B, L, H * D]."""
    B, L = q.shape[:2]
    hkv, d, dv = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
    q = q.reshape(B, L, -1, d).transpose(0, 2, 1, 3)
    k = k.reshape(B, L, hkv, d).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, hkv, dv).transpose(0, 2, 1, 3)
    q, k = (ops.rope(t, dims, traditional, inv_freq, rope_scale, offset) for t in (q, k))
    k_cache[..., offset : offset + L, :] = k
    v_cache[..., offset : offset + L, :] = v
    end = offset + L
    out = ops.attention(q, k_cache[..., :end, :], v_cache[..., :end, :], scale, "causal" if L > 1 else None)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1), k_cache, v_cache


@pytest.mark.parametrize("hq, hkv, d, dv, dims, traditional, length, offset", [
    (6, 2, 16, 16, 16, False, 1, 0),   # GQA, first token
    (6, 2, 16, 16, 16, False, 1, 37),  # GQA, deep in the cache
    (4, 4, 8, 12, 4, True, 3, 5),      # MHA, partial rotary, pairs, values wider, 3 queries (causal)
    (3, 1, 10, 10, 10, False, 40, 0),  # MQA, odd head size, a short prompt's queries at once
])
def test_step_equals_the_unfused_ops_bit_for_bit(hq, hkv, d, dv, dims, traditional, length, offset):
    B, capacity = 2, 64
    q, k, v = normal((B, length, hq * d), 1), normal((B, length, hkv * d), 2), normal((B, length, hkv * dv), 3)
    k_cache, v_cache = normal((B, hkv, capacity, d), 4), normal((B, hkv, capacity, dv), 5)
    inv_freq = mx.array(np.exp(-np.arange(dims // 2) * 0.7).astype(np.float32))
    rope = (dims, traditional, inv_freq, 0.5)
    got = ops.attention_step(q, k, v, k_cache, v_cache, offset, rope, 0.3)
    want = unfused(q, k, v, mx.array(k_cache), mx.array(v_cache), offset, *rope, 0.3)
    for name, g, w in zip(("out", "keys", "values"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert mx.array_equal(g, w).item(), name


def test_cache_buffer_written_in_place_only_when_nothing_else_holds_it():
    B, hkv, capacity, d = 1, 2, 1 << 16, 64  # 32 MB per buffer
    q, k = normal((B, 1, 2 * d), 1), normal((B, 1, hkv * d), 2)
    rope = (d, False, mx.ones((d // 2,)), 1.0)
    # held elsewhere: the holder's array keeps its content (the op copies)
    held_k, held_v = mx.zeros((B, hkv, capacity, d)), mx.zeros((B, hkv, capacity, d))
    mx.eval(held_k, held_v)
    out, k_buf, v_buf = ops.attention_step(q, k, k, held_k, held_v, 0, rope, 0.25)
    mx.eval(out, k_buf, v_buf)  # (an output left unevaluated would hold the buffers through its graph)
    assert float(mx.abs(held_k).max()) == 0.0 and float(mx.abs(k_buf[..., 0, :]).max()) > 0
    del held_k, held_v
    # the op's reference is the only one: written in place, no second buffer, whatever the cache's size
    buffer_bytes = k_buf.nbytes
    for offset in range(1, 4):
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out, k_buf, v_buf = ops.attention_step(q, k, k, k_buf, v_buf, offset, rope, 0.25)
        mx.eval(out, k_buf, v_buf)
        assert mx.get_peak_memory() - before < buffer_bytes // 8, f"step at {offset} copied the cache"
    assert not np.array_equal(np.array(k_buf[..., 0, :]), np.array(k_buf[..., 3, :]))  # rotated at 0 and 3
    assert np.all(np.array(k_buf[..., 4:, :]) == 0)


def test_model_decode_bits_unchanged_by_the_fused_step():
    """The same SmolLM2 decode through the fused step (a plain cache) and through the unfused ops (the server's
    row-by-row path, ``BatchRows``, which attends with the separate ops): identical logits at every step."""
    import edge_llm
    from edge_llm.default_model import default_model_path

    model, _ = edge_llm.load(str(default_model_path()))
    plain, rows = model.make_cache(), model.make_cache()
    batched = [BatchRows([c]) for c in rows]
    tokens = mx.array([[1, 504, 2798, 6330, 314, 42, 198]])
    for cache in (plain, batched):
        model(tokens, cache=cache)
    token = mx.array([[9531]])
    for _ in range(6):
        a, b = model(token, cache=plain), model(token, cache=batched)
        assert mx.array_equal(a, b).item()
        token = mx.argmax(a[:, -1:], axis=-1)
    assert all(isinstance(c, KVCache) and c.offset == 13 for c in plain)


def linears(kind: str, widths: list[int], bias: bool, k: int = 192) -> list[nn.Module]:
    out = []
    for i, n in enumerate(widths):
        float_linear = nn.Linear(k, n, bias=bias)
        float_linear.update({"weight": normal((n, k), 10 + i)} | ({"bias": normal((n,), 20 + i)} if bias else {}))
        if kind == "float":
            m = FloatLinear.of(float_linear)
            m.update({"weight": m["weight"].astype(mx.bfloat16)})
        else:
            bits, group = {"q4": (4, 64), "q8": (8, 32), "q3": (3, 64)}[kind]
            m = QuantizedLinear.of(nn.QuantizedLinear.from_linear(float_linear, group_size=group, bits=bits))
        out.append(m)
    return out


@pytest.mark.parametrize("kind", ["q4", "q8", "q3", "float"])
@pytest.mark.parametrize("bias", [False, True])
def test_projections_as_one_product_give_each_ones_bits(kind, bias):
    layer = linears(kind, [96, 32, 32], bias)  # q, k, v of different widths
    for rows in (1, 5):
        x = normal((1, rows, 192), 3)
        together = projections(x, *layer)
        alone = [m(x) for m in layer]
        for i, (a, b) in enumerate(zip(together, alone, strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert mx.array_equal(a, b).item(), f"projection {i}, {rows} rows"


def test_projections_of_mixed_formats_go_one_by_one():
    q4, q8 = linears("q4", [64], False)[0], linears("q8", [64], False)[0]
    x = normal((1, 1, 192), 4)
    got = projections(x, q4, q8)
    assert all(mx.array_equal(g, m(x)).item() for g, m in zip(got, (q4, q8), strict=True))


def assert_close(got: mx.array, want: mx.array, what: str, rtol: float = 1e-5) -> None:
    """Equal up to summation order (and, for rope's angles, one float rounding of the position x angle)."""
    got, want = np.array(got), np.array(want)
    assert got.shape == want.shape, what
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert error <= rtol, f"{what}: {error:.2g} relative"


def test_rms_norm_is_mlxs():
    for shape, dtype in (((3, 7, 576), mx.float32), ((1, 1, 100), mx.bfloat16), ((2, 64), mx.float16)):
        x, w = normal(shape, 1), normal(shape[-1:], 2).astype(dtype)
        assert_close(ops.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w.astype(mx.float32), 1e-5), str(shape))


@pytest.mark.parametrize("dims, traditional, offset, scale", [(64, False, 0, 1.0), (32, True, 700, 0.25),
                                                              (10, False, 5, 1.0)])
def test_rope_is_mlxs(dims, traditional, offset, scale):
    x = normal((2, 3, 4, 64), 3)  # [B, H, L, D]
    base = 10000.0
    inv_freq = mx.array(np.exp(np.arange(dims // 2) * (-np.log(base) / (dims // 2))).astype(np.float32))
    got = ops.rope(x, dims, traditional, inv_freq, scale, offset)
    want = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
    assert_close(got, want, f"rope dims {dims}", rtol=1e-4 if offset else 1e-6)


@pytest.mark.parametrize("hq, hkv, d, dv, queries, keys, causal", [
    (9, 3, 64, 64, 1, 700, False),   # SmolLM2's heads, a long cache
    (4, 1, 10, 12, 3, 19, True),     # MQA, widths that leave vector tails, values wider, causal
    (2, 2, 16, 16, 8, 8, True),      # the most queries the kernel takes, all keys new
    (4, 2, 16, 16, 20, 530, True),   # keys in three chunks; the first queries see none of the last chunk's
])
def test_attention_is_mlxs(hq, hkv, d, dv, queries, keys, causal):
    q, k, v = normal((1, hq, queries, d), 4), normal((1, hkv, keys, d), 5), normal((1, hkv, keys, dv), 6)
    mask = "causal" if causal else None
    got = ops.attention(q, k, v, 0.125, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert_close(got, want, f"{hq}x{queries} queries over {keys} keys")


def test_attention_over_many_keys_gives_the_same_bits_on_any_number_of_threads():
    """Past 256 keys a query's keys are split into fixed chunks (shared among the threads, then combined): the
    chunks do not depend on the thread count, so neither do the bits."""
    from edge_llm.kernels import extension

    q, k, v = normal((2, 6, 3, 32), 7), normal((2, 3, 900, 32), 8), normal((2, 3, 900, 32), 9)
    module = extension.load()
    before = module.threads()
    results = []
    try:
        for threads in (1, 2, 3):
            module.set_threads(threads)
            results.append(np.array(ops.attention(q, k, v, 0.2, "causal")))
    finally:
        module.set_threads(before)
    assert all(np.array_equal(results[0], r) for r in results[1:])
