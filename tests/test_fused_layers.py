"""A decoder layer in two ops when decoding on the CPU (``DecoderLayer``): the attention half with its norm, q/k/v,
cache writes, output projection and residual as one op (``Attention.residual_block``: ``kernels.attention_block``;
where q/k/v need more, the pre-norm inside the q/k/v product, ``layers.normed_projections``, and the output
projection inside the attention op), the whole SwiGLU feed-forward with its norm and residual as one op
(``MLP.residual_block``: ``kernels.mlp_block``, whose silu is MLX's own, csrc/silu.c). Each must give the bits of
the ops one by one: the architecture parity tests check those against transformers."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from edge_llm import kernels
from edge_llm.models import base
from edge_llm.models.attention import Attention
from edge_llm.models.cache import KVCache
from edge_llm.models.layers import MLP, FloatLinear, QuantizedLinear, RMSNorm, kernel_weights, normed_projections
from edge_llm.models.llama import ModelArgs

pytestmark = pytest.mark.skipif(not kernels.active(), reason="the CPU kernels are not active here")
KINDS = ["q4", "q8", "float"]


def normal(shape, seed: int, scale: float = 1.0) -> mx.array:
    return scale * mx.random.normal(shape, key=mx.random.key(seed))


def as_kind(linear: nn.Linear, kind: str) -> nn.Module:
    """A float linear as the loader leaves it: quantized (4-bit g64, 8-bit g32) or a bfloat16 FloatLinear."""
    if kind == "float":
        m = FloatLinear.of(linear)
        m.update({"weight": m["weight"].astype(mx.bfloat16)})
        return m
    bits, group = {"q4": (4, 64), "q8": (8, 32)}[kind]
    return QuantizedLinear.of(nn.QuantizedLinear.from_linear(linear, group_size=group, bits=bits))


def linear(k: int, n: int, seed: int, kind: str) -> nn.Module:
    m = nn.Linear(k, n, bias=False)
    m.update({"weight": normal((n, k), seed, 0.1)})
    return as_kind(m, kind)


def norm(width: int, seed: int) -> RMSNorm:
    n = RMSNorm(width, eps=1e-5)
    n.update({"weight": 1 + normal((width,), seed, 0.1)})
    return n


def mlp(kind: str, d: int = 192, f: int = 320) -> MLP:
    m = MLP(d, f)
    m.gate_proj, m.up_proj, m.down_proj = linear(d, f, 1, kind), linear(d, f, 2, kind), linear(f, d, 3, kind)
    return m


def same_bits(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b), equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
def test_normed_projections_are_the_norm_then_the_products(kind):
    layer = [linear(192, n, 10 + i, kind) for i, n in enumerate((96, 32, 32))]
    pre = norm(192, 4)
    for rows in (1, 3):
        x = normal((1, rows, 192), 5)
        together = normed_projections(x, pre, *layer)
        assert together is not None
        for i, (a, m) in enumerate(zip(together, layer, strict=True)):
            assert same_bits(a, m(pre(x))), f"projection {i}, {rows} rows"


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_block_is_the_mlp_bit_for_bit(kind):
    m, post = mlp(kind), norm(192, 6)
    for rows in (1, 3):
        h = normal((1, rows, 192), 7, 3.0)
        fused = kernels.mlp_block(h, post["weight"], post.eps, kernels.Weights.quantized(
            [(x["weight"], x["scales"], x["biases"]) for x in (m.gate_proj, m.up_proj, m.down_proj)],
            m.gate_proj.group_size, m.gate_proj.bits) if kind != "float" else kernels.Weights.floats(
            [x["weight"] for x in (m.gate_proj, m.up_proj, m.down_proj)]))
        assert fused is not None
        assert same_bits(fused, h + m(post(h))), f"{kind}, {rows} rows"
        assert same_bits(m.residual_block(h, post), fused)


def test_silu_is_mlxs_at_its_edges():
    """Gate values across exp's range and past its clamps (|x| > 88), tiny, infinite and NaN: silu(g) * up as MLX
    computes it, the vector path and its scalar tail alike (40 values: two vectors of 16 and 8 one by one)."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 0.6931, -0.6931, 1.0, -1.0, 5.5, -5.5, 20.0, -20.0,
             61.0, -61.0, 87.9, -87.9, 88.0, -88.0, 88.5, -88.5, 100.0, -100.0, 3e38, -3e38, math.inf, -math.inf,
             math.nan, 7.25, -7.25, 0.34657, -0.34657, 44.0, -44.0, 1.5, -2.5, 63.9]
    f = len(edges)
    m = MLP(1, f)
    # one input feature: gate = its column times the normed input, exactly 1 (1 + eps rounds to 1)
    m.gate_proj = FloatLinear(1, f, bias=False)
    m.gate_proj.update({"weight": mx.array(edges, dtype=mx.float32)[:, None]})
    m.up_proj = FloatLinear(1, f, bias=False)
    m.up_proj.update({"weight": mx.linspace(-2, 2, f)[:, None]})
    m.down_proj = FloatLinear(f, 1, bias=False)
    m.down_proj.update({"weight": mx.ones((1, f))})
    post = RMSNorm(1, eps=1e-30)
    h = mx.ones((1, 1, 1))
    gate, up = m.gate_proj(post(h)), m.up_proj(post(h))
    assert same_bits(gate[0, 0], mx.array(edges, dtype=mx.float32))
    fused = kernels.mlp_block(h, post["weight"], post.eps, kernels.Weights.floats(
        [m.gate_proj["weight"], m.up_proj["weight"], m.down_proj["weight"]]))
    assert same_bits(fused, h + m.down_proj(nn.silu(gate) * up))
    # and each activation, through a down projection that picks it alone
    for i in range(f):
        m.down_proj.update({"weight": mx.zeros((1, f)).at[0, i].add(1.0)})
        one = kernels.mlp_block(h, post["weight"], post.eps, kernels.Weights.floats(
            [m.gate_proj["weight"], m.up_proj["weight"], m.down_proj["weight"]]))
        assert same_bits(one, h + m.down_proj(nn.silu(gate) * up)), f"gate {edges[i]}"


def attention(kind: str) -> Attention:
    args = ModelArgs(hidden_size=192, num_hidden_layers=1, intermediate_size=320,
                     num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64)
    a = Attention(args)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
        w = getattr(a, name)["weight"]
        setattr(a, name, linear(w.shape[1], w.shape[0], 20 + i, kind))
    return a


@pytest.mark.parametrize("kind", KINDS)
def test_attention_block_is_the_attention_half_bit_for_bit(kind):
    a, pre = attention(kind), norm(192, 8)
    fused_cache, plain_cache = KVCache(), KVCache()
    for step, rows in enumerate((5, 1, 1, 3, 1)):  # a prompt, then decode steps (3 rows: speculative-style)
        x = normal((1, rows, 192), 30 + step)
        assert normed_projections(x, pre, a.q_proj, a.k_proj, a.v_proj) is not None  # the fused path, not a fallback
        assert kernel_weights(x, (a.o_proj,)) is not None
        want = x + a(pre(x), plain_cache)
        got = a.residual_block(x, pre, fused_cache)
        assert same_bits(got, want), f"step {step}"
    assert fused_cache.offset == plain_cache.offset == 11
    for ours, theirs in zip(fused_cache.state, plain_cache.state, strict=True):
        assert same_bits(ours, theirs)


def half_weights(a: Attention) -> tuple[kernels.Weights, kernels.Weights]:
    x = mx.zeros((1, 1, 192))
    return kernel_weights(x, (a.q_proj, a.k_proj, a.v_proj)), kernel_weights(x, (a.o_proj,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows, offset", [(1, 0), (1, 9), (4, 3)])
def test_attention_block_op_is_the_projections_then_the_step(kind, rows, offset):
    a, pre = attention(kind), norm(192, 8)
    qkv, o = half_weights(a)
    x = normal((1, rows, 192), 40)
    caches = [normal((1, 2, 16, 32), 41), normal((1, 2, 16, 32), 42)]
    rope = a.rope.kernel_args(offset, rows)
    got = kernels.attention_block(x, (pre["weight"], pre.eps), qkv, o, *[mx.array(c) for c in caches], offset, rope,
                                  a.scale)
    q, k, v = kernels.matmuls(x, qkv, norm=(pre["weight"], pre.eps))
    want = kernels.attention_step(q, k, v, *caches, offset, rope, a.scale, o, x)
    for name, g, w in zip(("out", "keys", "values"), got, want, strict=True):
        assert same_bits(g, w), name


def test_attention_block_writes_the_caches_in_place_only_when_nothing_else_holds_them():
    a, pre = attention("q4"), norm(192, 8)
    qkv, o = half_weights(a)
    x, capacity = normal((1, 1, 192), 43), 1 << 15  # 8 MB per buffer
    held = [mx.zeros((1, 2, capacity, 32)) for _ in range(2)]
    mx.eval(held)
    out, k_buf, v_buf = kernels.attention_block(x, (pre["weight"], pre.eps), qkv, o, *held, 0, a.rope.kernel_args(0, 1),
                                                a.scale)
    mx.eval(out, k_buf, v_buf)
    assert float(mx.abs(held[0]).max()) == 0.0 and float(mx.abs(k_buf[..., 0, :]).max()) > 0  # the holder's intact
    del held
    for offset in range(1, 4):  # the op's reference is the only one: no second buffer
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out, k_buf, v_buf = kernels.attention_block(x, (pre["weight"], pre.eps), qkv, o, k_buf, v_buf, offset,
                                                    a.rope.kernel_args(offset, 1), a.scale)
        mx.eval(out, k_buf, v_buf)
        assert mx.get_peak_memory() - before < k_buf.nbytes // 8, f"step at {offset} copied a cache"
    assert np.all(np.array(k_buf[..., 4:, :]) == 0) and np.all(np.array(v_buf[..., :4, :]) != 0)


def decode(model, steps: int = 5) -> list[mx.array]:
    """A 7-token prompt, then ``steps`` greedy steps: the logits of each step."""
    cache, token = model.make_cache(), mx.array([[9531]])
    model(mx.array([[1, 504, 2798, 6330, 314, 42, 198]]), cache=cache)
    out = []
    for _ in range(steps):
        logits = model(token, cache=cache)
        out.append(logits)
        token = mx.argmax(logits[:, -1:], axis=-1)
    return out


def assert_same_steps(a: list[mx.array], b: list[mx.array]) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert same_bits(x, y), f"decode step {step}"


def test_a_model_decodes_the_same_bits_through_the_fused_layers(smollm2_gguf, monkeypatch):
    """SmolLM2 (Q4_1): the whole stack made by the decode plan (one call per step), each layer's two fused ops made
    from Python, and the layers one op at a time: identical logits at every step."""
    model, _ = smollm2_gguf
    planned = decode(model)
    assert vars(model.model)["_decode_plan"].plan is not None  # the plan ran, not a fallback
    monkeypatch.setattr(base, "fused_layers", lambda stack, h, cache: None)
    assert_same_steps(planned, decode(model))
    monkeypatch.setattr(base.DecoderLayer, "__call__", lambda self, x, cache: (
        lambda h: h + self[self.ffn_name](self.post_attention_layernorm(h)))(
        x + self.self_attn(self.input_layernorm(x), cache)))
    assert_same_steps(planned, decode(model))


def test_the_decode_plan_follows_weights_replaced_and_modules_swapped(smollm2_gguf, monkeypatch):
    """A plan holds the weights it was built with: replacing one (``update``) or swapping a module makes the next
    step use the new ones, as the layers one by one would."""
    model, _ = smollm2_gguf
    layer = model.model.layers[3]
    before = decode(model, 2)
    old_norm, old_up = layer.post_attention_layernorm["weight"], layer.mlp.up_proj
    try:
        layer.post_attention_layernorm.update({"weight": old_norm * 1.5})
        replaced = decode(model, 2)
        assert not same_bits(replaced[0], before[0])
        layer.mlp.up_proj = layer.mlp.gate_proj  # a module swapped in
        swapped = decode(model, 2)
        assert not same_bits(swapped[0], replaced[0])
        monkeypatch.setattr(base, "fused_layers", lambda stack, h, cache: None)
        assert_same_steps(swapped, decode(model, 2))
    finally:
        layer.post_attention_layernorm.update({"weight": old_norm})
        layer.mlp.up_proj = old_up


@pytest.mark.parametrize("name", ["mqa-tied", "llama3-rope", "dynamic-rope", "mistral-window"])
def test_the_decode_plan_gives_the_layers_bits_for_every_rope_and_window(name, tmp_path, monkeypatch):
    """Tiny Llama-family models (float weights): fixed, scaled and dynamic rope (angles handed over each step), a
    sliding window (the plan stands aside once it bites), MQA; a batch of two. The plan and the layers one by one
    give the same bits at every step."""
    from edge_llm import load_model
    from tests.hf_oracle import build_tiny_checkpoint, random_tokens
    from tests.test_llama_parity import BASE, CONFIGS

    model = load_model(build_tiny_checkpoint(tmp_path, **{**BASE, **CONFIGS[name]}))
    tokens = mx.array(random_tokens(BASE["vocab_size"], 14, batch=2, seed=3))

    def run() -> list[mx.array]:
        cache = model.make_cache()
        out = [model(tokens[:, :5], cache=cache)]
        out += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, tokens.shape[1])]
        return out

    planned = run()
    assert vars(model.model)["_decode_plan"].plan is not None
    monkeypatch.setattr(base, "fused_layers", lambda stack, h, cache: None)
    assert_same_steps(planned, run())


def test_the_decode_plan_copies_caches_held_elsewhere(smollm2_gguf):
    """A cache buffer someone else still holds (a snapshot of the cache's state) is copied, never written in place:
    the snapshot keeps its content and the step gives the same logits as with nothing held."""
    model, _ = smollm2_gguf
    prompt, token = mx.array([[1, 504, 2798, 6330, 314, 42, 198]]), mx.array([[9531]])
    cache = model.make_cache()
    model(prompt, cache=cache)
    snapshot = [mx.array(a) for c in cache for a in c.state]  # copies of the content, for comparing
    held = [a for c in cache for a in c.state]  # the buffers themselves, held
    mx.eval(snapshot, held)
    stepped = model(token, cache=cache)
    mx.eval(stepped)
    assert all(same_bits(a, b) for a, b in zip(held, snapshot, strict=True))
    fresh = model.make_cache()
    model(prompt, cache=fresh)
    assert same_bits(stepped, model(token, cache=fresh))
