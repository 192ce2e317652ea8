"""`edge-llm bench`: load time, time to first token, prefill and decode speed, memory, bandwidth use.

Prompts are random token ids (no tokenizer work is timed). Decode speed is set against the roofline:
the bytes a decode step must read (active weights, as loaded in memory) times tokens per second,
divided by this machine's measured memory bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .experts.load import expert_stats
from .experts.policy import DEFAULT_POLICY
from .formats.open import open_checkpoint
from .generation.context import context_window
from .generation.generate import generate_tokens, prefill
from .generation.sampling import Sampler, SamplingParams
from .hub.resolve import resolve_model
from .loader import load_checkpoint
from .machine.backend import detect, peak_memory_bytes, reset_peak_memory
from .machine.bandwidth import machine_bandwidth
from .models.base import CausalLM
from .models.cache import check_kv_bits

PROMPT_LENGTHS = (128, 512, 2048)


@dataclass
class BenchResult:
    model: str
    backend: str
    load_s: float
    time_to_first_token_s: float  # for the shortest prompt
    prefill_tps: dict[int, float] = field(default_factory=dict)  # prompt length -> tokens/s
    decode_tps: float = 0.0
    decode_tokens: int = 0
    peak_memory_bytes: int = 0
    active_weight_bytes: int = 0  # read per decoded token
    achieved_bytes_per_s: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    bandwidth_fraction: float = 0.0
    experts: dict | None = None  # streamed experts: what the decode phase hit, missed and read (else None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tps"] = {str(k): v for k, v in self.prefill_tps.items()}
        return d


def active_weight_bytes(model: CausalLM) -> int:
    """Bytes one decode step reads: every weight once, routed experts only k of E, embeddings one row
    (``CausalLM.token_share``; a tied embedding doubles as the output projection, so then it is read in full).
    Streamed experts: k of the bank's slots per MoE layer, whatever the bank's size."""
    streamer = getattr(model, "expert_streamer", None)
    banked = streamer.parameters if streamer is not None else frozenset()
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name in banked:
            total += p.nbytes * model.experts.active // streamer.slots
            continue
        share = model.token_share(name)
        total += p.nbytes * share.numerator // share.denominator
    return total


def _decode_expert_stats(before: dict | None, after: dict | None) -> dict | None:
    """The decode phase's share of the streaming statistics (the counters are cumulative)."""
    if after is None:
        return None
    delta = {k: after[k] - before[k] for k in ("hits", "misses", "waves", "bytes_read")}
    wait = after["read_wait_s"] - before["read_wait_s"]
    lookups = delta["hits"] + delta["misses"]
    return {"slots": after["slots"], "bank_bytes": after["bank_bytes"], **delta,
            "hit_rate": round(delta["hits"] / lookups, 4) if lookups else 0.0, "read_wait_s": round(wait, 4),
            "read_bytes_per_s": round(delta["bytes_read"] / wait) if wait > 0 else 0}


def _random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=length).tolist()


def time_prefill(model: CausalLM, tokens: list[int], kv_bits: int | None = None) -> float:
    """Seconds to process ``tokens`` and produce the next token's logits."""
    cache = model.make_cache(kv_bits)
    start = time.perf_counter()
    prefill(model, tokens[:-1], cache)
    mx.eval(model(mx.array(tokens[-1:])[None], cache=cache))
    return time.perf_counter() - start


def run_bench(ref: str | Path, prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS, decode_tokens: int = 64,
              dtype: str | None = None, context: int | None = None, kv_bits: int | None = None,
              expert_slots: int | None = None, expert_policy: str = DEFAULT_POLICY,
              shard: str | None = None) -> BenchResult:
    """``context`` bounds the prompt lengths as ``run --context`` bounds a chat; ``kv_bits`` quantizes the cache;
    ``expert_slots`` streams a MoE's experts through banks of that many slots (``quant.fit`` sizes them);
    ``shard``: under ``mlx.launch`` (rank 0), the mode the ranks split the model in."""
    check_kv_bits(kv_bits)
    reset_peak_memory()
    start = time.perf_counter()
    checkpoint = open_checkpoint(resolve_model(ref))
    if shard is not None:
        from .distributed.load import load_checkpoint_share

        model = load_checkpoint_share(checkpoint, shard, dtype)
    else:
        model = load_checkpoint(checkpoint, dtype, expert_slots, expert_policy)
    load_s = time.perf_counter() - start
    vocab = model.args.vocab_size
    model_limit = model.context_length
    limit = context_window(model_limit, context) if context is not None else model_limit or max(prompt_lengths)
    lengths = [n for n in prompt_lengths if n + decode_tokens <= limit]
    if not lengths:  # never a prompt past the context: its KV cache alone could exhaust memory
        raise ValueError(f"{ref}: no prompt length plus {decode_tokens} decoded tokens fits its context of {limit} "
                         f"tokens (prompt lengths {', '.join(map(str, prompt_lengths))}); give shorter ones")
    time_prefill(model, _random_prompt(vocab, 16, seed=99), kv_bits)  # warm up kernels and allocator
    prefill_tps, ttft = {}, 0.0
    for i, n in enumerate(lengths):
        seconds = time_prefill(model, _random_prompt(vocab, n, seed=i), kv_bits)
        prefill_tps[n] = n / seconds
        ttft = ttft or seconds
    prompt = _random_prompt(vocab, lengths[0], seed=1234)
    cache, sampler = model.make_cache(kv_bits), Sampler(SamplingParams(temperature=0))
    tokens = generate_tokens(model, prompt, cache, sampler, decode_tokens + 1)
    next(tokens)  # the first token comes from the prefill
    before = expert_stats(model)
    start = time.perf_counter()
    count = sum(1 for _ in tokens)
    decode_tps = count / (time.perf_counter() - start)
    experts = _decode_expert_stats(before, expert_stats(model))
    peak = peak_memory_bytes()  # before the bandwidth probe allocates its own buffer
    active = active_weight_bytes(model)
    bandwidth = machine_bandwidth()
    achieved = active * decode_tps
    return BenchResult(
        model=str(ref), backend=detect().name, load_s=load_s, time_to_first_token_s=ttft,
        prefill_tps=prefill_tps, decode_tps=decode_tps, decode_tokens=count,
        peak_memory_bytes=peak, active_weight_bytes=active,
        achieved_bytes_per_s=achieved, bandwidth_bytes_per_s=bandwidth,
        bandwidth_fraction=achieved / bandwidth if bandwidth else 0.0, experts=experts,
    )
