"""Key/value caches. One object per layer; the model passes it in, never stores it.

``KVCache`` holds per-head keys and values ``[B, H, T, D]`` in buffers grown in steps, so a decode
step writes in place instead of concatenating. ``LatentCache`` (DeepSeek MLA) holds one compressed
vector per token instead of per-head keys and values. Every cache reports ``nbytes`` (what it
really holds) and can be trimmed back, which multi-turn chat uses to reuse a shared prefix.
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256


def _grow(buffer: mx.array | None, used: int, new: mx.array, axis: int) -> mx.array:
    """Returns a buffer with room for ``new`` after ``used`` entries along ``axis``."""
    needed = used + new.shape[axis]
    if buffer is not None and needed <= buffer.shape[axis]:
        return buffer
    shape = list(new.shape)
    shape[axis] = ((needed + STEP - 1) // STEP) * STEP
    grown = mx.zeros(shape, dtype=new.dtype)
    if buffer is not None and used:
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, used)
        grown[tuple(index)] = buffer[tuple(index)]
    return grown


class KVCache:
    """Standard per-head cache; ``update_and_fetch`` appends and returns everything so far."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: [B, H_kv, L, D]
        prev, length = self.offset, keys.shape[2]
        self.keys = _grow(self.keys, prev, keys, axis=2)
        self.values = _grow(self.values, prev, values, axis=2)
        self.offset += length
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Drops the last ``n`` tokens (buffers stay allocated); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values) if a is not None)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class LatentCache:
    """MLA cache: one ``[B, 1, T, kv_lora_rank + rope_dim]`` latent per token, split on fetch."""

    def __init__(self) -> None:
        self.latent: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, latent: mx.array) -> mx.array:
        prev = self.offset
        self.latent = _grow(self.latent, prev, latent, axis=2)
        self.offset += latent.shape[2]
        self.latent[..., prev : self.offset, :] = latent
        return self.latent[..., : self.offset, :]

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.latent is None else self.latent.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.latent is None else [self.latent]


Cache = KVCache | LatentCache


def cache_nbytes(cache: list[Cache]) -> int:
    return sum(c.nbytes for c in cache)


def truncate_cache(cache: list[Cache], length: int) -> None:
    """Cuts every layer back to its first ``length`` tokens (layers may disagree after an interrupt)."""
    for c in cache:
        if c.offset > length:
            c.trim(c.offset - length)


def cache_offset(cache: list[Cache]) -> int:
    return cache[0].offset if cache else 0
