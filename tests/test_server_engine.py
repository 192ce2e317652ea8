"""The serving engine on every architecture (tiny random checkpoints, float32): requests decoded together in
one batch give the greedy tokens they give alone, with the float, the 8-bit and DeepSeek's latent cache."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import pytest

from edge_llm.generation.sampling import SamplingParams
from edge_llm.models import build
from edge_llm.serving.engine import Engine
from edge_llm.serving.job import Failed, Finished, Job, Piece
from edge_llm.tokenizer import Tokenizer
from tests.tiny_configs import TINY_CONFIGS
from tests.tiny_tokenizer import write_tiny_tokenizer

PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 9, 30)]  # different lengths, so rows sit at different offsets
WIDE = dict(hidden_size=128)
GREEDY = SamplingParams(temperature=0)  # head size 32: the 8-bit cache quantizes rows in groups of 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_folder(write_tiny_tokenizer(Path(tmp_path_factory.mktemp("tok"))))


def decode(model, tokenizer, max_batch: int, kv_bits: int | None,
           params=lambda i: GREEDY) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, tokenizer, kv_bits=kv_bits, max_batch=max_batch, prompt_cache=0)
    answers: list[list[int]] = [[] for _ in PROMPTS]
    ended = threading.Semaphore(0)

    def emit_to(i: int):
        def emit(event) -> None:
            if isinstance(event, Piece) and event.token is not None:
                answers[i].append(event.token)
            elif isinstance(event, Failed):
                answers[i].append(event.message)
            if isinstance(event, Finished | Failed):
                ended.release()
        return emit

    for i, prompt in enumerate(PROMPTS):  # all queued before the engine starts: they join in one step
        engine.submit(Job(prompt, params(i), 12, emit_to(i), ignore_eos=True))
    engine.start()
    for _ in PROMPTS:
        assert ended.acquire(timeout=120)
    engine.stop()
    return answers, engine


CASES = [(name, None, {}) for name in TINY_CONFIGS] + [("llama", 8, WIDE), ("deepseek_v2", 8, {})]


@pytest.mark.parametrize("model_type,kv_bits,extra", CASES, ids=[f"{n}-kv{b or 'float'}" for n, b, _ in CASES])
def test_batched_rows_decode_as_they_would_alone(tokenizer, model_type, kv_bits, extra):
    config = {k: v for k, v in TINY_CONFIGS[model_type].items() if k != "model_type"} | extra
    if model_type == "deepseek_v2" and kv_bits:
        config |= dict(qk_rope_head_dim=32)  # latent rows 64 + 32 wide: groups of 32
    mx.random.seed(0)
    model = build(model_type, config)
    mx.eval(model.parameters())
    alone, _ = decode(model, tokenizer, 1, kv_bits)
    together, engine = decode(model, tokenizer, len(PROMPTS), kv_bits)
    assert engine.stats.largest_batch == len(PROMPTS)
    assert all(len(a) == 12 and all(isinstance(t, int) for t in a) for a in alone), alone
    assert together == alone


def test_each_row_samples_with_its_own_seed(tokenizer):
    """Seeded sampling: every request draws from its own random key, so batching changes nothing."""
    mx.random.seed(0)
    model = build("llama", {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"})
    mx.eval(model.parameters())

    def seeded(i: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=100 + i)

    alone, _ = decode(model, tokenizer, 1, None, seeded)
    together, _ = decode(model, tokenizer, len(PROMPTS), None, seeded)
    again, _ = decode(model, tokenizer, len(PROMPTS), None, seeded)
    assert together == alone == again
    assert len({tuple(a) for a in alone}) == len(PROMPTS)


def test_a_model_error_fails_its_requests_and_the_engine_keeps_going(tokenizer):
    """A cache the model cannot write (8-bit rows need widths in groups of 32; these heads are 16 wide) fails
    each request with the error's line; the engine still answers the next one."""
    mx.random.seed(0)
    model = build("llama", {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"})
    answers, engine = decode(model, tokenizer, len(PROMPTS), 8)
    assert all(len(a) == 1 and "--kv-bits needs 16-wide cache rows" in a[0] for a in answers), answers
    assert engine.stats.failed == len(PROMPTS) and engine.broken is None
    answers, _ = decode(model, tokenizer, len(PROMPTS), None)
    assert all(len(a) == 12 for a in answers), answers


def test_streamed_experts_batch_too(tokenizer, tmp_path):
    """A MoE whose experts stream through a bank of 2 slots per layer (fewer than a batch's rows need) decodes
    in batches what it decodes alone, and what the resident model decodes."""
    from edge_llm.formats.open import open_checkpoint
    from edge_llm.loader import load_checkpoint
    from tests.hf_oracle import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "moe", **TINY_CONFIGS["qwen3_moe"])
    resident, _ = decode(load_checkpoint(open_checkpoint(folder)), tokenizer, 1, None)
    streamed = load_checkpoint(open_checkpoint(folder), expert_slots=2)
    together, engine = decode(streamed, tokenizer, len(PROMPTS), None)
    assert engine.stats.largest_batch == len(PROMPTS)
    assert together == resident


def test_prompt_cache_takes_the_longest_shared_prefix_within_its_budget():
    from edge_llm.models.cache import KVCache
    from edge_llm.serving.prompt_cache import PromptCache

    def cache_of(n: int) -> list[KVCache]:
        layer = KVCache()
        layer.update_and_fetch(mx.zeros((1, 2, n, 8)), mx.zeros((1, 2, n, 8)))
        return [layer]

    kept = PromptCache(capacity=3, max_tokens=30)
    kept.put([1, 2, 3, 4], cache_of(4))
    kept.put([1, 2, 9, 9, 9], cache_of(5))
    cache, reused = kept.take([1, 2, 3, 4, 5, 6])
    assert reused == 4 and cache[0].offset == 4 and len(kept) == 1  # taken, not shared
    cache, reused = kept.take([1, 2, 9])
    assert reused == 2 and cache[0].offset == 2  # the last prompt token is always computed anew
    assert kept.take([7, 8]) == (None, 0)
    kept.put(list(range(31)), cache_of(31))  # longer than the whole budget: not kept
    assert len(kept) == 0
    for n in (10, 12, 14):
        kept.put(list(range(n)), cache_of(n))
    assert len(kept) == 2  # 10 + 12 + 14 tokens are over 30: the oldest left
    assert kept.take(list(range(11)))[1] == 10  # the 12-token entry shares 10 with it, the 14 too: first wins
