"""GPTQ: error-compensating rounding of one weight matrix, given its inputs' second moment ``H = XᵀX``.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022),
and its reference code (lazy batches of 128 columns, the upper Cholesky factor of H⁻¹). Columns are rounded
one at a time; each column's rounding error, scaled by H⁻¹, is subtracted from the columns not yet rounded,
so they absorb it where the inputs make it cancel: the layer's output error ``‖(W - Ŵ)X‖`` falls, not the
weight error. Columns go in order of decreasing input energy (``diag(H)``: the reference code's act-order),
and each group's affine (scale, offset) is fixed before the sweep as ``affine.quantize``'s error-minimising
choice for the group's original weights ("static groups": MLX's format keeps groups in column order), in the
stored dtype, so the file holds exactly the (s, b, q) the error feedback saw. On SmolLM2 4-bit g64 act-order
lowers the KL from 0.198 to 0.143 (benchmarks/RESULTS.md, "Calibrated quantization").

The factorisation runs in MLX, the column sweep in NumPy (float32); the matrix is held transposed (a column
is a contiguous row).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import affine

DAMP = 0.01  # of the mean diagonal, added to H's diagonal: the reference code's default
BLOCK = 128  # columns per lazy batch; a multiple of every group size (32, 64, 128)


def _inverse_factor(h: np.ndarray, first_damp: float = DAMP) -> np.ndarray:
    """The upper Cholesky factor U of (H + damping)⁻¹ (``U.T @ U = H⁻¹``); more damping if H is singular.

    MLX's CPU linear algebra (float32, as mlx-lm's GPTQ): NumPy's multi-threaded LAPACK stalled for seconds
    per call on this shared two-core machine."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0  # inputs that were always zero: their weights are rounded without feedback
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    for damp in (first_damp, max(first_damp, 0.1), max(first_damp, 1.0)):
        damped = mx.array((h + damp * mean * np.eye(len(h))).astype(np.float32))
        with mx.stream(mx.cpu):
            factor = mx.linalg.cholesky(mx.linalg.cholesky_inv(mx.linalg.cholesky(damped)), upper=True)
        u = np.array(factor)
        if np.isfinite(u).all() and (np.diag(u) > 0).all():
            return u
    return np.diag(1 / np.sqrt(np.diag(h) + mean))  # diagonal: plain rounding


def _group_params(w_t: np.ndarray, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """(scales, biases) ``[groups, rows]`` in float32 for the columns ``w_t [cols, rows]``, in ``dtype``'s values."""
    _, scales, biases = affine.quantize(mx.array(np.ascontiguousarray(w_t.T)), group_size, bits, dtype)
    return (np.array(scales.astype(mx.float32)).T, np.array(biases.astype(mx.float32)).T)


def gptq(w: mx.array, h: np.ndarray, group_size: int, bits: int, dtype: mx.Dtype,
         act_order: bool = True, damp: float = DAMP) -> tuple[mx.array, ...]:
    """Quantizes ``w [out, in]`` for inputs with second moment ``h [in, in]``: (packed, scales, biases) in the
    layout and dtypes of ``affine.quantize(w, group_size, bits, dtype)``.

    ``act_order``: columns are rounded in order of decreasing input energy (``diag(H)``), the reference code's
    ``--act-order``; every group's (s, b) is then fixed up front from the original weights ("static groups"),
    as MLX's format keeps groups in column order."""
    rows, cols = w.shape
    wt = np.array(w.astype(mx.float32)).T.copy()  # [in, out]
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    u = _inverse_factor(h[np.ix_(order, order)], damp).astype(np.float32)
    n = float(2**bits - 1)
    codes = np.empty((cols, rows), dtype=np.uint32)
    scales = np.empty((cols // group_size, rows), dtype=np.float32)
    biases = np.empty_like(scales)
    if act_order:
        scales[:], biases[:] = _group_params(wt, group_size, bits, dtype)
    wt = wt[order]
    for b1 in range(0, cols, BLOCK):
        b2 = min(b1 + BLOCK, cols)
        if not act_order:
            g1 = b1 // group_size
            s_blk, b_blk = _group_params(wt[b1:b2], group_size, bits, dtype)
            scales[g1 : g1 + len(s_blk)], biases[g1 : g1 + len(b_blk)] = s_blk, b_blk
        errors = np.empty((b2 - b1, rows), dtype=np.float32)
        for c in range(b1, b2):
            g = order[c] // group_size
            s, b = scales[g], biases[g]
            col = wt[c]
            q = np.clip(np.rint((col - b) / np.where(s == 0, 1, s)), 0, n)
            codes[order[c]] = q
            err = (col - (s * q + b)) / u[c, c]
            wt[c + 1 : b2] -= np.outer(u[c, c + 1 : b2], err)
            errors[c - b1] = err
        if b2 < cols:
            wt[b2:] -= u[b1:b2, b2:].T @ errors
    packed = affine.pack(mx.array(codes.T), bits)
    return (packed, mx.array(scales.T).astype(dtype), mx.array(biases.T).astype(dtype))
