"""The error-minimising affine search, restated in numpy float32 as the tests' reference.

Step for step what ``quant/affine.py`` documents (a clipping search over ``CLIP_GRID``, least-squares
refinement, scale and offset rounded to the stored dtype, then per group the better of that and MLX's min-max
as ``mx.dequantize`` reconstructs), written for one purpose: to be read and trusted. Every float operation is
numpy's IEEE float32 on whole columns of groups, in the order of the compiled routine
(``quant/affine_native.c``: sums over a group's weights in index order, the clipping search's in two
interleaved halves), so the two agree bit for bit. With ``starts=1`` it is the search as it ran before it was
compiled (refinement from the best clipping only); the compiled default, ``starts=2``, also refines from the
second best and keeps, per group, whichever is better as stored.
"""

from __future__ import annotations

import numpy as np

F = np.float32


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to bfloat16 or float16 precision (nearest, ties to even), as float32."""
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(F)
    u = x.astype(F).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)).view(F)


def _codes(x: np.ndarray, n: float) -> np.ndarray:
    return np.rint(np.clip(x, F(0), F(n)))


def _search_error(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, n: float) -> np.ndarray:
    inv = F(1) / scale
    acc = [np.zeros(w.shape[0], F), np.zeros(w.shape[0], F)]
    for j in range(w.shape[1]):
        d = scale * _codes((w[:, j] - bias) * inv, n) + bias - w[:, j]
        acc[j % 2] = acc[j % 2] + d * d
    return acc[0] + acc[1]


def _least_squares(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, sw: np.ndarray, n: float):
    inv = F(1) / scale
    sq, sqq, sqw = (np.zeros(w.shape[0], F) for _ in range(3))
    for j in range(w.shape[1]):
        q = _codes((w[:, j] - bias) * inv, n)
        sq, sqq, sqw = sq + q, sqq + q * q, sqw + q * w[:, j]
    g = F(w.shape[1])
    det = g * sqq - sq * sq
    ok = det > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        new_scale = np.where(ok, (g * sqw - sq * sw) / np.where(ok, det, F(1)), scale)
    new_scale = np.where(np.abs(new_scale) > F(1e-12), new_scale, scale)
    return new_scale, np.where(ok, (sw - new_scale * sq) / g, bias)


def _stored_error(w, x, scale_for_codes, bias_for_codes, scale, bias, n, dtype, multiply):
    """Codes of ``x`` for (scale_for_codes, bias_for_codes) and the error against ``w`` as mx.dequantize
    reconstructs with the stored (scale, bias): T(T(s*q) + b)."""
    codes = np.empty_like(w)
    acc = np.zeros(w.shape[0], F)
    for j in range(w.shape[1]):
        v = x[:, j] - bias_for_codes
        q = _codes(v * scale_for_codes if multiply else v / scale_for_codes, n)
        codes[:, j] = q
        d = round_to(round_to(scale * q, dtype) + bias, dtype) - w[:, j]
        acc = acc + d * d
    return codes, acc


def _min_max(x: np.ndarray, n: float):
    """MLX's rule (mlx/backend/cpu/quantized.cpp): the scale and offset in float32, before rounding."""
    lo, hi = x.min(1), x.max(1)
    mask = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / F(n), F(1e-7))
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, lo, hi)
    q0 = np.rint(edge / scale)
    moved = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(moved, edge / np.where(moved, q0, F(1)), scale)
    return scale, np.where(moved, edge, F(0))


def quantize_groups(w: np.ndarray, bits: int, dtype: str, grid: tuple[float, ...], starts: int = 2,
                    steps: int = 3, round_input: bool = True):
    """Groups ``w [groups, group_size]`` (float32) -> codes [groups, group_size] and the stored scales and
    biases (float32 values of ``dtype``). ``round_input``: MLX's min-max sees the weights rounded to the
    dtype (always, unless they are already of it)."""
    w = w.astype(F)
    n = float(2**bits - 1)
    groups = w.shape[0]
    lo, hi = w.min(1), w.max(1)
    sw = np.zeros(groups, F)
    for j in range(w.shape[1]):
        sw = sw + w[:, j]
    span = hi - lo
    top = [(np.full(groups, np.inf, F), np.ones(groups, F), np.zeros(groups, F)) for _ in range(starts)]
    for t in grid:
        t = F(t)
        low, scale = lo + t * span, np.maximum(span * (F(1) - F(2) * t) / F(n), F(1e-12))
        cand = (_search_error(w, scale, low, n), scale, low)
        for k in range(starts):  # into the sorted list of the best, pushing the rest down
            better = cand[0] < top[k][0]
            top[k], cand = (tuple(np.where(better, c, o) for c, o in zip(cand, top[k], strict=True)),
                            tuple(np.where(better, o, c) for c, o in zip(cand, top[k], strict=True)))
    results = []
    for best, scale, bias in top[: min(starts, len(grid))]:
        for _ in range(steps):
            s, b = _least_squares(w, scale, bias, sw, n)
            e = _search_error(w, s, b, n)
            better = e < best
            best, scale, bias = np.where(better, e, best), np.where(better, s, scale), np.where(better, b, bias)
        scale, bias = round_to(scale, dtype), round_to(bias, dtype)
        by = F(1) / np.where(scale == 0, F(1), scale)
        codes, err = _stored_error(w, w, by, bias, scale, bias, n, dtype, multiply=True)
        results.append((err, codes, scale, bias))
    err, codes, scale, bias = results[0]
    for e, c, s, b in results[1:]:  # ties keep the earlier
        better = e < err
        err, scale, bias = np.where(better, e, err), np.where(better, s, scale), np.where(better, b, bias)
        codes = np.where(better[:, None], c, codes)
    x = round_to(w, dtype) if round_input else w
    mm_scale, mm_bias = _min_max(x, n)
    st_scale, st_bias = round_to(mm_scale, dtype), round_to(mm_bias, dtype)
    mm_codes, mm_err = _stored_error(w, x, mm_scale, mm_bias, st_scale, st_bias, n, dtype, multiply=False)
    ours = err <= mm_err
    return (np.where(ours[:, None], codes, mm_codes).astype(np.uint32), np.where(ours, scale, st_scale),
            np.where(ours, bias, st_bias))
