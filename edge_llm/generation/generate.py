"""Generation: chunked prefill, then a decode loop that runs the next step while the caller takes this one's token.

``generate_tokens`` yields token ids; ``stream_generate`` adds detokenized text, EOS and stop-string
handling and returns ``GenerationStats`` with the last chunk. A cache passed in is extended in place,
so a caller (the chat session) can keep it for the next turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..machine.backend import peak_memory_bytes
from ..models.base import CausalLM
from ..models.cache import Cache
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 256  # measured on SmolLM2: faster than 512 or 128 on the CPU, and half the transient of 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_time: float = 0.0  # seconds until the first token was ready
    generation_tokens: int = 0
    generation_time: float = 0.0  # seconds from the first token to the last
    peak_memory_bytes: int = 0  # MLX's peak allocation in this process so far, load included (as mlx-lm reports)
    finish_reason: str = "length"  # "stop", "length" or "interrupted"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first token comes from the prefill; the rate counts the decode steps after it
        steps = self.generation_tokens - 1
        return steps / self.generation_time if steps > 0 and self.generation_time > 0 else 0.0


@dataclass
class GenerationChunk:
    text: str
    token: int | None
    stats: GenerationStats | None = None  # set on the final chunk only


def prefill(model: CausalLM, tokens: Sequence[int], cache: list[Cache], chunk: int = PREFILL_CHUNK) -> None:
    """Runs ``tokens`` through the model only to fill the cache, ``chunk`` tokens at a time."""
    for start in range(0, len(tokens), chunk):
        model(mx.array(tokens[start : start + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])
    if tokens:
        mx.clear_cache()  # hand the chunk's activation buffers back rather than keep them resident


def generate_tokens(
    model: CausalLM,
    prompt: Sequence[int],
    cache: list[Cache],
    sampler: Sampler,
    max_tokens: int,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yields up to ``max_tokens`` ids. The prompt must be non-empty; the cache is extended in place."""
    if not prompt:
        raise ValueError("generation needs at least one prompt token")
    vocab = model.args.vocab_size
    if not 0 <= min(prompt) <= max(prompt) < vocab:  # MLX's gather would read past the embedding table
        raise ValueError(f"prompt token ids must be within the vocabulary (0 to {vocab - 1})")
    prefill(model, prompt[:-1], cache, prefill_chunk)

    def step(tokens: mx.array) -> mx.array:
        logits = model(tokens[None], cache=cache)[:, -1, :]
        return sampler(logits)

    # A GPU runs step n while Python builds step n + 1, so it never waits on us. On the CPU the kernels use every
    # core: building beside them took a core from them mid-step (SmolLM2 Q4_1: 9.6 ms a step overlapped, 7.9 ms one
    # after the other), so there step n + 1 is built once step n is done, and runs while the caller takes token n.
    overlap = mx.default_device() != mx.cpu
    y = step(mx.array(prompt[-1:]))
    mx.async_eval(y)
    for n in range(max_tokens):
        last = n + 1 == max_tokens
        next_y = step(y) if overlap and not last else None
        if next_y is not None:
            mx.async_eval(next_y)
        token = y.item()
        if not overlap and not last:
            next_y = step(y)
            mx.async_eval(next_y)
        yield token
        y = next_y


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model: CausalLM,
    tokenizer,
    prompt: Sequence[int],
    *,
    cache: list[Cache] | None = None,
    params: SamplingParams | None = None,
    max_tokens: int = 512,
    stop_strings: Sequence[str] = (),
    eos_ids: Sequence[int] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    interrupt: threading.Event | None = None,
) -> Iterator[GenerationChunk]:
    """Streams text pieces; the final chunk carries the stats.

    Setting ``interrupt`` (e.g. from a SIGINT handler) or a KeyboardInterrupt inside the loop ends the
    answer with finish reason 'interrupted'; the cache keeps what was generated.
    """
    cache = model.make_cache() if cache is None else cache
    eos = set(tokenizer.eos_token_ids if eos_ids is None else eos_ids)
    sampler = Sampler(params or SamplingParams(), history=list(prompt))
    detok, stops = tokenizer.detokenizer(), StopMatcher(stop_strings)
    stats = GenerationStats(prompt_tokens=len(prompt))
    start = time.perf_counter()
    first = None
    hit_stop_string = False
    try:
        for token in generate_tokens(model, prompt, cache, sampler, max_tokens, prefill_chunk):
            if first is None:
                first = time.perf_counter()
                stats.prompt_time = first - start
            if interrupt is not None and interrupt.is_set():
                stats.finish_reason = "interrupted"
                break
            if token in eos:
                stats.finish_reason = "stop"
                break
            stats.generation_tokens += 1
            text, hit_stop_string = stops.feed(detok.add(token))
            yield GenerationChunk(text, token)
            if hit_stop_string:
                stats.finish_reason = "stop"
                break
        else:
            stats.finish_reason = "length"
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
    tail = ""
    if not hit_stop_string:
        tail, hit_stop_string = stops.feed(detok.finalize())
        tail += "" if hit_stop_string else stops.flush()
    end = time.perf_counter()
    stats.generation_time = end - first if first is not None else 0.0
    stats.peak_memory_bytes = peak_memory_bytes()
    yield GenerationChunk(tail, None, stats)
