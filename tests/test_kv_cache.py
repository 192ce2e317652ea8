"""The quantized KV cache (``--kv-bits 8|4``) against the float cache: the same greedy answers at 8 bits on
SmolLM2, a measured error bound at 4, the bytes the estimator predicts, and chat's prefix reuse."""

from __future__ import annotations

import mlx.core as mx
import pytest

from edge_llm.default_model import default_model_path
from edge_llm.errors import ContextError
from edge_llm.formats.open import open_checkpoint
from edge_llm.generation.chat import ChatSession
from edge_llm.generation.sampling import SamplingParams
from edge_llm.machine.backend import dtype_policy
from edge_llm.models.cache import KVCache, LatentCache, cache_nbytes, truncate_cache
from edge_llm.models.deepseek_v2 import Model as DeepSeekV2
from edge_llm.models.deepseek_v2 import ModelArgs as DeepSeekV2Args
from quant.estimate import estimate
from quant.memory import kv_cache_bytes

GREEDY = SamplingParams(temperature=0)
# A prompt and an answer the model wrote itself (greedy), so teacher forcing follows its own path.
TEXT = ("What is the capital of France? Explain its history in a few sentences.",
        "The capital of France is Paris. It's a city steeped in history and culture, with a rich past.")
# DeepSeek's MLA latent is 512 + 64 = 576 wide (9 groups of 64); a narrow stand-in with 3 groups of 32
MLA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32,
           qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
           first_k_dense_replace=1, max_position_embeddings=512)


def _teacher_forced_logits(model, tokens: list[int], kv_bits: int | None, chunk: int = 24) -> mx.array:
    """Logits at every position, fed ``chunk`` tokens at a time so the cache is written and fetched over
    several calls (prefill chunks, then one-token decode steps)."""
    cache, out = model.make_cache(kv_bits), []
    steps = len(tokens) - 4
    for start in range(0, steps, chunk):
        out.append(model(mx.array(tokens[start : min(start + chunk, steps)])[None], cache=cache)[0])
    for i in range(steps, len(tokens)):
        out.append(model(mx.array(tokens[i : i + 1])[None], cache=cache)[0])
    return mx.concatenate(out)


def _kl(reference: mx.array, other: mx.array) -> mx.array:
    log_p = reference - mx.logsumexp(reference, -1, keepdims=True)
    log_q = other - mx.logsumexp(other, -1, keepdims=True)
    return (mx.exp(log_p) * (log_p - log_q)).sum(-1)


def test_greedy_answers_equal_the_float_cache_at_8_bits(smollm2_gguf):
    model, tokenizer = smollm2_gguf
    for question in ("What is the capital of France?", "Name three colors of the rainbow."):
        answers = []
        for kv_bits in (None, 8):
            session = ChatSession(model, tokenizer, params=GREEDY, max_tokens=12, kv_bits=kv_bits)
            answers.append([c.token for c in session.ask(question) if c.token is not None])
        assert answers[0] == answers[1], question
        assert len(answers[0]) >= 6


@pytest.mark.slow
def test_logit_error_against_the_float_cache(smollm2_gguf):
    """Measured on SmolLM2-135M, teacher-forced over 67 positions: 8 bits max |dlogit| 0.96, KL mean 0.001
    and max 0.0064, top-1 97%; 4 bits max |dlogit| 15, KL mean 0.20 and max 0.89, top-1 79%. The 4-bit
    cache changes this small model's answers (its keys carry outlier channels that one affine scale per 64
    values resolves poorly); the bounds hold those measurements with some room."""
    model, tokenizer = smollm2_gguf
    tokens = tokenizer.encode_chat([{"role": "user", "content": TEXT[0]}], add_generation_prompt=True)
    tokens += tokenizer.encode(TEXT[1])
    ref = _teacher_forced_logits(model, tokens, None)
    q8, q4 = (_teacher_forced_logits(model, tokens, bits) for bits in (8, 4))
    top1 = {b: (ref.argmax(-1) == q.argmax(-1)).mean().item() for b, q in ((8, q8), (4, q4))}
    kl8, kl4 = _kl(ref, q8), _kl(ref, q4)
    assert mx.abs(ref - q8).max().item() < 1.5
    assert kl8.max().item() < 0.02 and top1[8] >= 0.95
    assert kl4.mean().item() < 0.4 and top1[4] >= 0.65
    assert kl4.mean().item() > 10 * kl8.mean().item()  # 4 bits really are coarser than 8


def test_attention_equals_mlx_lm_quantized_cache():
    """The same keys and values through mlx-lm's QuantizedKVCache and its quantized_matmul attention give
    what our cache's dequantize-on-fetch and ``attention`` give, over a prefill chunk and decode steps, and
    both caches hold the same bytes."""
    theirs_attention = pytest.importorskip("mlx_lm.models.base").scaled_dot_product_attention
    from mlx_lm.models.cache import QuantizedKVCache

    from edge_llm.models.base import attention

    kv, q = mx.random.normal((2, 1, 2, 36, 64), key=mx.random.key(4)), mx.random.normal((1, 6, 36, 64))
    for bits in (8, 4):
        ours, theirs = KVCache(bits), QuantizedKVCache(group_size=64, bits=bits)
        for start, end in ((0, 30), (30, 31), (31, 32), (32, 36)):
            k, v, queries = kv[0][:, :, start:end], kv[1][:, :, start:end], q[:, :, start:end]
            mask = "causal" if end - start > 1 else None
            mine = attention(queries, *ours.update_and_fetch(k, v), 0.125, mask)
            reference = theirs_attention(queries, *theirs.update_and_fetch(k, v), theirs, 0.125, mask)
            assert mx.abs(mine - reference).max().item() < 1e-5
        assert ours.nbytes == theirs.nbytes


@pytest.mark.parametrize("context", [1, 300, 513])
def test_nbytes_equal_the_estimate(smollm2_gguf, context):
    """What the caches hold after ``context`` tokens is what ``estimate --kv-bits`` says, to the byte: keys
    and values in the compute dtype (float32 on the CPU), 8 bits + a scale and offset per 64 values in it
    (float32: 9/32), 4 bits (5/32)."""
    model, _ = smollm2_gguf
    args = model.args
    compute = dtype_policy(open_checkpoint(default_model_path()).dtype).compute  # what the runtime computes in
    held = {}
    for kv_bits in (None, 8, 4):
        cache = model.make_cache(kv_bits)
        kv = mx.random.normal((1, args.num_key_value_heads, context, args.head_dim)).astype(compute)
        for c in cache:
            c.update_and_fetch(kv, kv)
        held[kv_bits] = cache_nbytes(cache)
        assert held[kv_bits] == kv_cache_bytes(model, context, 1, compute.size, kv_bits)
    values, scales = held[None] // compute.size, held[None] // compute.size // 64 * 2 * compute.size
    assert held[8] == values + scales and held[4] == values // 2 + scales  # float32: 9/32 and 5/32 of held[None]
    est = estimate(str(default_model_path()), context=context, kv_bits=8)
    assert est.requested.kv_cache_bytes == held[8]


def test_trimmed_quantized_cache_rewrites_exactly():
    """Prefix reuse cuts the cache back and writes new tokens over the old: each token's groups are
    quantized on their own, so the result is bit-identical to writing the final sequence at once."""
    k = mx.random.normal((1, 2, 40, 64), key=mx.random.key(1))
    replaced = mx.random.normal((1, 2, 15, 64), key=mx.random.key(2))
    for bits in (8, 4):
        reused = KVCache(bits)
        reused.update_and_fetch(k, k)
        truncate_cache([reused], 25)
        keys, values = reused.update_and_fetch(replaced, replaced)
        whole = mx.concatenate([k[:, :, :25], replaced], axis=2)
        expected, _ = KVCache(bits).update_and_fetch(whole, whole)
        assert reused.offset == 40 and keys.shape == (1, 2, 40, 64)
        assert mx.array_equal(keys, expected).item() and mx.array_equal(values, expected).item()


def test_chat_reuses_the_quantized_cache(smollm2_gguf):
    """A second turn served partly from the 8-bit cache answers as a fresh 8-bit session given the same
    conversation."""
    model, tokenizer = smollm2_gguf
    chat = ChatSession(model, tokenizer, params=GREEDY, max_tokens=12, kv_bits=8)
    list(chat.ask("What is the capital of France?"))
    second = [c.token for c in chat.ask("And of Italy?") if c.token is not None]
    assert chat.last.reused_tokens > 20
    fresh = ChatSession(model, tokenizer, params=GREEDY, max_tokens=12, kv_bits=8, messages=chat.messages[:2])
    assert [c.token for c in fresh.ask("And of Italy?") if c.token is not None] == second
    assert fresh.last.reused_tokens == 0


def test_mla_latent_cache_quantized():
    """DeepSeek's latent is quantized too (rows of kv_lora_rank + rope): prefill (expanded form) and decode
    (absorbed form) stay close to the float cache, and the bytes match the estimate."""
    model = DeepSeekV2(DeepSeekV2Args.from_dict(MLA))
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, MLA["vocab_size"], (1, 40), key=mx.random.key(3))
    outs = {}
    for kv_bits in (None, 8):
        cache = model.make_cache(kv_bits)
        assert all(isinstance(c, LatentCache) for c in cache)
        steps = [model(tokens[:, :32], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(32, 40)]
        outs[kv_bits] = mx.concatenate(steps, axis=1)
        assert cache_nbytes(cache) == kv_cache_bytes(model, 40, 1, 4, kv_bits)
    spread = outs[None].std().item()
    assert mx.abs(outs[None] - outs[8]).max().item() < 0.05 * spread


def test_unsupported_kv_bits_and_row_widths():
    with pytest.raises(ContextError, match="--kv-bits must be 8 or 4"):
        KVCache(16)
    cache = KVCache(8)
    with pytest.raises(ContextError, match="80-wide"):
        cache.update_and_fetch(mx.zeros((1, 1, 2, 80)), mx.zeros((1, 1, 2, 80)))
