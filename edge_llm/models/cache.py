"""Key/value caches. One object per layer; the model passes it in, never stores it.

``KVCache`` holds per-head keys and values ``[B, H, T, D]``; ``LatentCache`` (DeepSeek MLA) holds one
compressed vector per token ``[B, 1, T, r + rope]`` instead. Both keep their rows in buffers grown in
steps of ``STEP`` tokens, so a decode step writes in place instead of concatenating. With ``bits`` (8 or
4) the rows are stored as ``mx.quantize`` output (mlx-lm's QuantizedKVCache layout: packed codes plus a
scale and an offset per group of 64 features) and dequantized when fetched: on the CPU that is as fast as
``mx.quantized_matmul`` attention for decoding and 5x faster for prefill (it keeps the BLAS path), and
it leaves every architecture's attention untouched. Each token's groups are quantized on their own, so
trimming and rewriting the tail (chat's prefix reuse) stays exact. Every cache reports ``nbytes`` (what
it really holds), which ``row_nbytes`` predicts (``CausalLM.kv_bytes_per_token``).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ContextError

STEP = 256
KV_BITS = (8, 4)


def kv_group_size(features: int) -> int | None:
    """The quantization group for rows of ``features`` values: 64, or 32 where 64 does not divide them."""
    return next((g for g in (64, 32) if features % g == 0), None)


def row_nbytes(width: int, itemsize: int, bits: int | None = None) -> int:
    """Bytes one cached row of ``width`` values takes: ``itemsize`` floats, or with ``bits`` the packed codes
    plus a scale and an offset (floats too) per group. A width no group divides is refused when written;
    it is counted here in groups of 64."""
    if bits is None:
        return width * itemsize
    return width * bits // 8 + width // (kv_group_size(width) or 64) * 2 * itemsize


def _grow(buffer: mx.array | None, used: int, new: mx.array, axis: int) -> mx.array:
    """Returns a buffer with room for ``new`` after ``used`` entries along ``axis``."""
    return _room(buffer, used, new.shape, new.dtype, axis)


def _room(buffer: mx.array | None, used: int, new_shape: tuple[int, ...], dtype: mx.Dtype, axis: int) -> mx.array:
    """Returns a buffer with room for rows of ``new_shape`` after ``used`` entries along ``axis``."""
    needed = used + new_shape[axis]
    if buffer is not None and needed <= buffer.shape[axis]:
        return buffer
    shape = list(new_shape)
    shape[axis] = ((needed + STEP - 1) // STEP) * STEP
    # MLX's zeros, a broadcast scalar: the first in-place write (kernels.attention_step) copies it out. Materialized
    # here (mx.contiguous), that write took it in place at once and the batched server segfaulted: kept as it was.
    grown = mx.zeros(shape, dtype=dtype)
    if buffer is not None and used:
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, used)
        grown[tuple(index)] = buffer[tuple(index)]
    return grown


class _Rows:
    """Float rows ``[..., T, F]`` along axis 2."""

    def __init__(self) -> None:
        self.buffer: mx.array | None = None

    def write(self, start: int, rows: mx.array) -> mx.array:
        """Stores ``rows`` at ``start`` and returns every row up to their end."""
        end = start + rows.shape[2]
        self.buffer = _grow(self.buffer, start, rows, axis=2)
        self.buffer[..., start:end, :] = rows
        return self.buffer[..., :end, :]

    @property
    def arrays(self) -> list[mx.array]:
        return [] if self.buffer is None else [self.buffer]


class _QuantizedRows:
    """Rows stored as ``(codes, scales, biases)`` from ``mx.quantize``, dequantized on fetch."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.group_size: int | None = None
        self.parts: list[mx.array] | None = None

    def write(self, start: int, rows: mx.array) -> mx.array:
        features = rows.shape[-1]
        self.group_size = self.group_size or kv_group_size(features)
        if self.group_size is None:
            raise ContextError(f"--kv-bits needs {features}-wide cache rows to divide into groups of 32; "
                               "run this model without --kv-bits")
        end = start + rows.shape[2]
        new = mx.quantize(rows, group_size=self.group_size, bits=self.bits)
        old = self.parts or [None] * len(new)
        self.parts = [_grow(buf, start, part, axis=2) for buf, part in zip(old, new, strict=True)]
        for buf, part in zip(self.parts, new, strict=True):
            buf[..., start:end, :] = part
        codes, scales, biases = (p[..., :end, :] for p in self.parts)
        return mx.dequantize(codes, scales, biases, group_size=self.group_size, bits=self.bits)

    @property
    def arrays(self) -> list[mx.array]:
        return self.parts or []


def check_kv_bits(bits: int | None) -> None:
    if bits is not None and bits not in KV_BITS:
        raise ContextError(f"--kv-bits must be 8 or 4 (omit it for a float cache), got {bits}")


def _rows(bits: int | None) -> _Rows | _QuantizedRows:
    check_kv_bits(bits)
    return _Rows() if bits is None else _QuantizedRows(bits)


class LayerCache:
    """What both caches share: an offset, trimming, and the bytes their row buffers hold."""

    def __init__(self, rows: list[_Rows | _QuantizedRows]) -> None:
        self._rows = rows
        self.offset = 0

    def trim(self, n: int) -> int:
        """Drops the last ``n`` tokens (buffers stay allocated); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> list[mx.array]:
        return [a for r in self._rows for a in r.arrays]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class KVCache(LayerCache):
    """Standard per-head cache; ``update_and_fetch`` appends and returns everything so far."""

    def __init__(self, bits: int | None = None) -> None:
        super().__init__([_rows(bits), _rows(bits)])
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: [B, H_kv, L, D] -> everything so far, [B, H_kv, T, D]
        keys, values = self._rows[0].write(self.offset, keys), self._rows[1].write(self.offset, values)
        self.offset = keys.shape[2]
        return keys, values

    def buffers_for(self, batch: int, heads: int, length: int, key_width: int,
                    value_width: int) -> tuple[mx.array, mx.array] | None:
        """Float32 key and value buffers ``[B, H, capacity, D]`` with room for ``length`` more tokens, for an op that
        writes them itself (``kernels.attention_step``), which hands them back to ``advance``; None for a
        quantized cache or rows of another shape or dtype."""
        rows = self._rows
        if self.bits is not None or not all(isinstance(r, _Rows) for r in rows):
            return None
        for r, width in zip(rows, (key_width, value_width), strict=True):
            old = r.buffer
            if old is not None and (old.dtype != mx.float32 or old.shape[:2] != (batch, heads)
                                    or old.shape[3] != width):
                return None
            r.buffer = _room(old, self.offset, (batch, heads, length, width), mx.float32, axis=2)
        return rows[0].buffer, rows[1].buffer

    def room(self, length: int) -> tuple[mx.array, mx.array] | None:
        """The float buffers as they stand when both exist and have room for ``length`` more rows (a fused decode
        step's fast path: the op that wrote them last checked their shapes), else None: ``buffers_for`` makes them."""
        if self.bits is not None:
            return None
        keys, values = self._rows[0].buffer, self._rows[1].buffer
        if keys is None or values is None or self.offset + length > min(keys.shape[2], values.shape[2]):
            return None
        return keys, values

    def advance(self, keys: mx.array, values: mx.array, length: int) -> None:
        """Takes the buffers an op wrote ``length`` new tokens into (see ``buffers_for``)."""
        self._rows[0].buffer, self._rows[1].buffer = keys, values
        self.offset += length


class LatentCache(LayerCache):
    """MLA cache: one ``[B, 1, T, kv_lora_rank + rope_dim]`` latent per token, split on fetch."""

    def __init__(self, bits: int | None = None) -> None:
        super().__init__([_rows(bits)])
        self.bits = bits

    def update_and_fetch(self, latent: mx.array) -> mx.array:
        latent = self._rows[0].write(self.offset, latent)
        self.offset = latent.shape[2]
        return latent


Cache = KVCache | LatentCache


def cache_nbytes(cache: list[Cache]) -> int:
    return sum(c.nbytes for c in cache)


def truncate_cache(cache: list[Cache], length: int) -> None:
    """Cuts every layer back to its first ``length`` tokens (layers may disagree after an interrupt)."""
    for c in cache:
        if c.offset > length:
            c.trim(c.offset - length)


class BatchRows:
    """One layer's caches of several sequences decoded together (the server's continuous batching).

    Each row keeps its own ordinary cache (float, quantized or MLA latent, any length), so a sequence joins
    or leaves a batch without copying anything, and its cache outlives the batch (the server's prompt
    reuse). The layers run their projections over all rows at once and attend row by row (``each_row``),
    which is what makes a batched row compute what it would alone, without padding or masks.
    """

    def __init__(self, rows: list[Cache]) -> None:
        self.rows = rows


def each_row(cache: Cache | BatchRows | None, attend, *arrays: mx.array) -> mx.array:
    """``attend(*arrays, cache)`` for one sequence; for ``BatchRows``, once per row (``arrays`` are
    ``[B, ...]``) with that row's cache, the results stacked back along the batch axis."""
    if not isinstance(cache, BatchRows):
        return attend(*arrays, cache)
    rows = len(cache.rows)
    split = [mx.split(a, rows, axis=0) for a in arrays]  # one op per array, not one slice per row
    return mx.concatenate([attend(*(parts[i] for parts in split), c) for i, c in enumerate(cache.rows)], axis=0)
