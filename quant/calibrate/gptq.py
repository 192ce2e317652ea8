"""GPTQ: error-compensating rounding of one weight matrix, given its inputs' second moment ``H = XᵀX``.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022),
and its reference code (lazy batches of columns, the upper Cholesky factor of H⁻¹). Columns are rounded
one at a time; each column's rounding error, scaled by H⁻¹, is subtracted from the columns not yet rounded,
so they absorb it where the inputs make it cancel: the layer's output error ``‖(W - Ŵ)X‖`` falls, not the
weight error. Columns go in order of decreasing input energy (``diag(H)``: the reference code's act-order),
and each group's affine (scale, offset) is fixed before the sweep as ``affine.quantize``'s error-minimising
choice for the group's original weights ("static groups": MLX's format keeps groups in column order), in the
stored dtype, so the file holds exactly the (s, b, q) the error feedback saw. On SmolLM2 4-bit g64 act-order
lowers the KL from 0.198 to 0.143 (benchmarks/RESULTS.md, "Calibrated quantization").

NumPy throughout: float64 for the factorisation, float32 for the column sweep; the matrix is held transposed
(a column is a contiguous row).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import affine

DAMP = 0.01  # of the mean diagonal, added to H's diagonal: the reference code's default
BLOCK = 32  # columns per lazy batch: the rest of the matrix is updated once per batch, by a matrix product


def _inverse_factor(h: np.ndarray, first_damp: float = DAMP) -> np.ndarray:
    """The upper Cholesky factor U of (H + damping)⁻¹ (``U.T @ U = H⁻¹``); more damping if H is singular.

    With J the reversal, ``L = chol(J H J)`` gives ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)``, so ``U = J L⁻¹ J``: one
    factorisation and one triangular inverse instead of the reference code's three steps (float64, NumPy)."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0  # inputs that were always zero: their weights are rounded without feedback
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    eye = np.eye(len(h))
    for damp in (first_damp, max(first_damp, 0.1), max(first_damp, 1.0)):
        try:
            lower = np.linalg.cholesky((h + damp * mean * eye)[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        return np.linalg.inv(lower)[::-1, ::-1].copy()
    return np.diag(1 / np.sqrt(np.diag(h) + mean))  # diagonal: plain rounding


def _group_params(w_t: np.ndarray, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """(scales, biases) ``[groups, rows]`` in float32 for the weights ``w_t [cols, rows]``, in ``dtype``'s values."""
    _, scales, biases = affine.quantize(mx.array(np.ascontiguousarray(w_t.T)), group_size, bits, dtype)
    return (np.array(scales.astype(mx.float32)).T, np.array(biases.astype(mx.float32)).T)


def gptq(w: mx.array, h: np.ndarray, group_size: int, bits: int, dtype: mx.Dtype,
         damp: float = DAMP) -> tuple[mx.array, ...]:
    """Quantizes ``w [out, in]`` for inputs with second moment ``h [in, in]``: (packed, scales, biases) in the
    layout and dtypes of ``affine.quantize(w, group_size, bits, dtype)``; ``damp`` is the share of H's mean
    diagonal added to it."""
    rows, cols = w.shape
    wt = np.array(w.astype(mx.float32)).T.copy()  # [in, out]
    scales, biases = _group_params(wt, group_size, bits, dtype)  # [groups, out], static
    inverse_scales = 1 / np.where(scales == 0, 1, scales)  # a constant group's scale rounds to 0: any code fits
    order = np.argsort(-np.diag(h), kind="stable")
    u = _inverse_factor(h[np.ix_(order, order)], damp).astype(np.float32)
    wt = wt[order]
    group = order // group_size
    n = float(2**bits - 1)
    codes = np.empty((cols, rows), dtype=np.uint32)
    for b1 in range(0, cols, BLOCK):
        b2 = min(b1 + BLOCK, cols)
        errors = np.empty((b2 - b1, rows), dtype=np.float32)
        for c in range(b1, b2):
            g = group[c]
            col = wt[c]
            q = np.rint((col - biases[g]) * inverse_scales[g])
            np.clip(q, 0, n, out=q)
            codes[order[c]] = q
            err = (col - (scales[g] * q + biases[g])) / u[c, c]
            wt[c + 1 : b2] -= u[c, c + 1 : b2, None] * err
            errors[c - b1] = err
        if b2 < cols:
            wt[b2:] -= u[b1:b2, b2:].T @ errors
    packed = affine.pack(mx.array(codes.T), bits)
    return (packed, mx.array(scales.T).astype(dtype), mx.array(biases.T).astype(dtype))
