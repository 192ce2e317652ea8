"""MLX affine quantization with error-minimising scales and offsets, in MLX's own file format.

MLX's affine format stores, per group of ``group_size`` weights along the input dimension, a scale
``s`` and an offset ``b`` (called ``biases``) in the model's float dtype, and ``bits``-bit codes ``q``
packed little-endian into uint32 words; a weight is ``s * q + b``. ``mx.quantize`` picks ``s`` and ``b``
from the group's minimum and maximum. That spends the code range on outliers: the error of the other
weights grows with the span. Here each group instead gets the (s, b) that minimises the squared
reconstruction error, found in three steps:

1. a search over clipping ranges ``[min + t·span, max - t·span]`` for a few ``t`` (keep the best per group),
2. alternating refinement (Lloyd / k-means on a uniform grid): assign the nearest codes, then the
   least-squares (s, b) for those codes, kept only where it lowers the error,
3. rounding s and b to the stored dtype and re-assigning codes against the rounded values, and per
   group keeping whichever of this result and ``mx.quantize``'s min-max has the lower error.

Where a C compiler is found the steps run compiled (``affine_native``: 16 groups per vector lane, every
core, ~20x faster than the graph below), refining from the two best clippings (``SEARCH_STARTS``) and
choosing between them as stored; elsewhere they run as the MLX graph below, chunk by chunk, from the best.

The output is bit-identical in layout to ``mx.quantize`` (checked by ``mx.dequantize`` in the tests),
so ``QuantizedLinear``, ``gather_qmm`` and mlx-lm read it unchanged. References: MLX
``mlx/ops.cpp::affine_quantize`` (format and min-max rule), HQQ and llama.cpp's ``make_qkx2_quants``
(the same idea: search the range, then refit scale and minimum by least squares).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import affine_native

CLIP_GRID = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2)
REFINE_STEPS = 3
# The compiled search refines from the two best clippings and keeps whichever is better as stored (rounded
# to the dtype): per group never worse than refining from the best alone, 1-4% lower error in total.
SEARCH_STARTS = 2
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Weights quantized per step: bounds the float32 temporaries (MLX keeps about 20 chunk-sized arrays
# alive while evaluating one step's graph: 80 MB at this size).
CHUNK_ELEMENTS = 1 << 20


@mx.compile
def _clip_candidate(w: mx.array, lo: mx.array, span: mx.array, t: mx.array, n: mx.array):
    low = lo + t * span
    scale = mx.maximum(span * (1 - 2 * t) / n, 1e-12)
    q = mx.clip(mx.round((w - low) / scale), 0, n)
    return ((scale * q + low - w) ** 2).sum(-1, keepdims=True), scale, low


@mx.compile
def _least_squares(w: mx.array, scale: mx.array, bias: mx.array, n: mx.array):
    """The (s, b) minimising ``||w - s·q - b||²`` for the codes nearest under the current (s, b)."""
    q = mx.clip(mx.round((w - bias) / scale), 0, n)
    g = w.shape[-1]
    sq, sw = q.sum(-1, keepdims=True), w.sum(-1, keepdims=True)
    sqq, sqw = (q * q).sum(-1, keepdims=True), (q * w).sum(-1, keepdims=True)
    det = g * sqq - sq * sq
    ok = det > 0  # all codes equal: the fit is degenerate, keep the old scale
    new_scale = mx.where(ok, (g * sqw - sq * sw) / mx.where(ok, det, 1), scale)
    new_scale = mx.where(mx.abs(new_scale) > 1e-12, new_scale, scale)
    new_bias = mx.where(ok, (sw - new_scale * sq) / g, bias)
    return new_scale, new_bias


@mx.compile
def _codes_and_error(w: mx.array, scale: mx.array, bias: mx.array, n: mx.array):
    # A scale that rounded to 0 in the stored dtype (a constant group): any code decodes to the offset.
    q = mx.clip(mx.round((w - bias) / mx.where(scale == 0, 1, scale)), 0, n)
    return q, ((scale * q + bias - w) ** 2).sum(-1, keepdims=True)


def _keep_better(err, scale, bias, new_err, new_scale, new_bias):
    better = new_err < err
    return mx.where(better, new_err, err), mx.where(better, new_scale, scale), mx.where(better, new_bias, bias)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Packs integer codes ``[..., n]`` (values < 2**bits) into uint32 words ``[..., n*bits/32]``.

    MLX's layout is one little-endian bit stream per row: code j occupies bits ``[j·bits, (j+1)·bits)``.
    """
    codes = codes.astype(mx.uint32)
    *lead, n = codes.shape
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = mx.arange(per_word, dtype=mx.uint32) * bits
        return (codes.reshape(*lead, n // per_word, per_word) << shifts).sum(-1).astype(mx.uint32)
    # 3, 5, 6 bits: every 32 codes fill exactly ``bits`` words; a code may straddle two words.
    blocks = codes.reshape(*lead, n // 32, 32)
    words = [None] * bits
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        c = blocks[..., j]
        part = c << offset
        words[word] = part if words[word] is None else words[word] + part
        if offset + bits > 32:
            spill = c >> (32 - offset)
            words[word + 1] = spill if words[word + 1] is None else words[word + 1] + spill
    return mx.stack(words, axis=-1).reshape(*lead, n * bits // 32).astype(mx.uint32)


@functools.cache
def _group_error_fn(group_size: int, bits: int):
    @mx.compile
    def error(w: mx.array, packed: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        deq = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
        return ((deq - w.astype(mx.float32)) ** 2).reshape(*scales.shape, group_size).sum(-1)

    return error


def _group_error(w: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                 bits: int) -> mx.array:
    """Squared error per group of ``w`` against its dequantized form, as MLX dequantizes it."""
    return _group_error_fn(group_size, bits)(w, packed, scales, biases)


def _quantize_rows(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    rows, cols = w.shape
    n = mx.array(2**bits - 1, dtype=mx.float32)
    g = w.astype(mx.float32).reshape(rows, cols // group_size, group_size)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    span = hi - lo
    err = scale = bias = None
    for t in CLIP_GRID:
        cand = _clip_candidate(g, lo, span, mx.array(t, dtype=mx.float32), n)
        err, scale, bias = cand if err is None else _keep_better(err, scale, bias, *cand)
    for _ in range(REFINE_STEPS):
        new_scale, new_bias = _least_squares(g, scale, bias, n)
        _, new_err = _codes_and_error(g, new_scale, new_bias, n)
        err, scale, bias = _keep_better(err, scale, bias, new_err, new_scale, new_bias)
    # What the file holds is s and b in ``dtype``: assign codes against those rounded values.
    scale, bias = scale.astype(dtype), bias.astype(dtype)
    codes, _ = _codes_and_error(g, scale.astype(mx.float32), bias.astype(mx.float32), n)
    packed, scales, biases = pack(codes.reshape(rows, cols), bits), scale.squeeze(-1), bias.squeeze(-1)
    # Per group, keep whichever of ours and MLX's min-max reconstructs better, as MLX dequantizes them.
    mm_packed, mm_scales, mm_biases = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
    ours_better = _group_error(w, packed, scales, biases, group_size, bits) <= _group_error(
        w, mm_packed, mm_scales, mm_biases, group_size, bits)  # [rows, groups]
    words_per_group = group_size * bits // 32
    packed = mx.where(mx.repeat(ours_better, words_per_group, axis=-1), packed, mm_packed)
    scales = mx.where(ours_better, scales, mm_scales)
    biases = mx.where(ours_better, biases, mm_biases)
    return packed, scales, biases


class NonFinite(ValueError):
    """``quantize`` met NaN or infinite weights, or scales or offsets that overflow the stored dtype."""


def _mlx_quantize(flat: mx.array, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """The search as MLX ops, in row chunks so temporaries stay small (where the compiled one is unavailable)."""
    if not bool(mx.isfinite(flat).all().item()):
        raise NonFinite("holds NaN or infinite values")
    step = max(1, CHUNK_ELEMENTS // flat.shape[1])
    parts = []
    for start in range(0, flat.shape[0], step):
        part = _quantize_rows(flat[start : start + step], group_size, bits, dtype)
        mx.eval(part)
        parts.append(part)
    packed, scales, biases = (mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                              for i in range(3))
    for what, a in (("scales", scales), ("offsets", biases)):
        if not bool(mx.isfinite(a).all().item()):
            raise NonFinite(f"has quantization {what} that overflow {dtype}")
    return packed, scales, biases


def quantize(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """Error-minimising affine quantization of ``w [..., in]``: (packed uint32, scales, biases), evaluated.

    Shapes and dtypes equal ``mx.quantize(w.astype(dtype), group_size, bits)``'s. The search runs compiled
    (``affine_native``: every core, one group at a time in registers) where a C compiler is found, else as
    the MLX graph above, chunk by chunk. Raises NonFinite for NaN or infinite weights, or scales or offsets
    that overflow ``dtype``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    *lead, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of the group size {group_size}")
    flat = w.reshape(-1, cols)
    if affine_native.supports(flat, group_size, bits, dtype):
        try:
            packed, scales, biases = affine_native.quantize(flat, group_size, bits, dtype, CLIP_GRID, SEARCH_STARTS,
                                                            REFINE_STEPS)
        except affine_native.NonFinite as e:
            what = e.what if e.what.startswith("holds") else f"has quantization {e.what} that overflow {dtype}"
            raise NonFinite(what) from None
    else:
        packed, scales, biases = _mlx_quantize(flat, group_size, bits, dtype)
    return (packed.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1))


def reconstruction_error(w: mx.array, packed: mx.array, scales: mx.array, biases: mx.array,
                         group_size: int, bits: int) -> float:
    """Sum of squared differences between ``w`` and its dequantized form (float32)."""
    deq = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    return float(((deq - w.astype(mx.float32)) ** 2).sum().item())
