"""Sampling as pure functions of logits: temperature, top-k, top-p, min-p, repetition penalty.

Randomness comes from an explicit key, so a seed reproduces a generation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

SEED_MAX = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed: 0 .. 2**64 - 1 (measured, MLX 0.32)


def check_seed(seed: object) -> None:
    """Raises ValueError unless ``seed`` is None or a whole number ``mx.random.key`` accepts."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1 ({SEED_MAX}), got {seed!r}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9  # 1 disables
    top_k: int = 40  # 0 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: mx.array, recent: mx.array | None, penalty: float) -> mx.array:
    """CTRL-style penalty as transformers applies it: positive logits divided, negative multiplied.

    ``recent`` is a 1-D array of token ids (repeats allowed); ``logits`` is ``[B, V]``.
    """
    if penalty == 1.0 or recent is None or recent.size == 0:
        return logits
    ids = mx.broadcast_to(recent, (logits.shape[0], recent.size))
    picked = mx.take_along_axis(logits, ids, axis=-1)
    penalized = mx.where(picked > 0, picked / penalty, picked * penalty)
    return mx.put_along_axis(logits, ids, penalized, axis=-1)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keeps the smallest set of tokens whose probability reaches ``p`` (the most likely always)."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drops tokens less likely than ``min_p`` times the most likely one."""
    if min_p <= 0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """One token per row of ``logits [B, V]`` (float32 math throughout)."""
    logits = logits.astype(mx.float32)
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    logprobs = logits / params.temperature
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    k = params.top_k
    if 0 < k < logprobs.shape[-1]:
        # Only the k likeliest tokens can survive top-k, so top-p's sort, min-p and the draw run on those k
        # (found in one pass) instead of the whole vocabulary: sorting 49,152 logits twice took ~7 ms a token on
        # the CPU, more than the rest of SmolLM2's decode step. (A tie at the k-th value keeps k, not all tied.)
        ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        likeliest = apply_min_p(apply_top_p(mx.take_along_axis(logprobs, ids, axis=-1), params.top_p), params.min_p)
        choice = mx.random.categorical(likeliest, axis=-1, key=key)
        return mx.take_along_axis(ids, choice[..., None], axis=-1)[..., 0]
    logprobs = apply_min_p(apply_top_p(logprobs, params.top_p), params.min_p)
    return mx.random.categorical(logprobs, axis=-1, key=key)


class Sampler:
    """Holds the random key and the recent tokens across steps; the math stays in the pure functions.

    Tokens stay lazy ``mx.array``s, so a repetition penalty never forces a sync between steps.
    """

    def __init__(self, params: SamplingParams, history: list[int] | None = None):
        self.params = params
        self.key = mx.random.key(params.seed) if params.seed is not None else None
        window = list(history or [])[-params.repetition_context :]
        self.recent = mx.array(window, dtype=mx.int32) if window else None

    def __call__(self, logits: mx.array) -> mx.array:
        """Samples from ``logits [1, V]``; returns a lazy ``[1]`` token array."""
        penalty = self.params.repetition_penalty
        logits = apply_repetition_penalty(logits, self.recent, penalty)
        key = None
        if self.key is not None and not self.params.greedy:
            self.key, key = mx.random.split(self.key)
        token = sample(logits, self.params, key)
        if penalty != 1.0:
            tokens = token.astype(mx.int32)
            recent = tokens if self.recent is None else mx.concatenate([self.recent, tokens])
            self.recent = recent[-self.params.repetition_context :]
        return token
