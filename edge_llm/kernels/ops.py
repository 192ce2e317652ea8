"""The matrix products the models call: edge-llm's CPU kernels where they apply, MLX's ops everywhere else.

Each function takes what the MLX op it replaces takes and returns the same result (exact up to summation
order). The kernels serve the CPU device only, affine quantization or float weights, few rows (decoding,
short prompts, MoE experts); Metal and CUDA keep MLX's own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import extension

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _kernels():
    """The kernel module when the default device is the CPU and the kernels load, else None."""
    if mx.default_device() != mx.cpu:
        return None
    return extension.load()


def active() -> bool:
    """Whether the products below run edge-llm's kernels (the CPU is the device and they loaded)."""
    return _kernels() is not None


def _quantized_ok(x: mx.array, group_size: int, bits: int, mode: str) -> bool:
    return mode == "affine" and bits in BITS and group_size in GROUP_SIZES and x.dtype in FLOATS


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                     bits: int, mode: str = "affine") -> mx.array:
    """``mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)``: ``x [..., K] -> [..., N]``."""
    kernels = _kernels()
    if kernels is None or not _quantized_ok(x, group_size, bits, mode):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
    return kernels.matmul(x, w, scales, biases, bits=bits, group_size=group_size)


def dequantized_rows(ids: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                     bits: int, mode: str = "affine") -> mx.array | None:
    """``mx.dequantize(w[ids], scales[ids], biases[ids], ...)`` (a quantized embedding's lookup) as one op, for float32
    scales and biases (the CPU's), the same bits; None where the kernels do not apply."""
    kernels = _kernels()
    if (kernels is None or mode != "affine" or bits not in BITS or group_size not in GROUP_SIZES
            or scales.dtype != mx.float32 or (biases is not None and biases.dtype != mx.float32)
            or not mx.issubdtype(ids.dtype, mx.integer)):
        return None
    return kernels.dequantized_rows(ids, w, scales, biases, bits=bits, group_size=group_size)


def float_matmul(x: mx.array, w: mx.array) -> mx.array | None:
    """``x @ w.T`` for float32 ``x`` and a half-precision ``w [N, K]`` without a float32 copy of ``w``;
    None where the kernels do not apply (the caller keeps its own path)."""
    kernels = _kernels()
    if kernels is None or x.dtype != mx.float32 or w.dtype not in FLOATS:
        return None
    return kernels.matmul(x, w)


MAX_WEIGHTS = 8  # csrc/kernels.h EL_MAX_WEIGHTS


@dataclass(frozen=True)
class Weights:
    """Weight matrices as the kernels take them together: ``arrays`` lists each one's w (float), or w, scales[,
    biases] (quantized alike: ``bits`` > 0, the same group size, scale dtype and presence of biases)."""

    arrays: list[mx.array]
    bits: int = 0
    group_size: int = 0
    has_biases: bool = False

    @property
    def count(self) -> int:
        return len(self.arrays) // (1 if not self.bits else 3 if self.has_biases else 2)

    @property
    def format(self) -> tuple[int, int, bool]:
        """(bits, group_size, has_biases), as the kernels' fused ops take a set's format."""
        return self.bits, self.group_size, self.has_biases

    @classmethod
    def quantized(cls, weights: list[tuple[mx.array, mx.array, mx.array | None]], group_size: int, bits: int,
                  mode: str = "affine") -> Weights | None:
        """Affine-quantized (w, scales, biases) triples; None where the kernels do not take them together."""
        if (mode != "affine" or bits not in BITS or group_size not in GROUP_SIZES
                or not 1 <= len(weights) <= MAX_WEIGHTS or len({(s.dtype, b is None) for _, s, b in weights}) != 1):
            return None
        has_biases = weights[0][2] is not None
        flat = [a for w, s, b in weights for a in ((w, s, b) if has_biases else (w, s))]
        return cls(flat, bits, group_size, has_biases)

    @classmethod
    def floats(cls, weights: list[mx.array]) -> Weights | None:
        """Float matrices ``[N, K]`` of any float dtype; None where the kernels do not take them."""
        if not 1 <= len(weights) <= MAX_WEIGHTS or any(w.dtype not in FLOATS or w.ndim != 2 for w in weights):
            return None
        return cls(list(weights))


def _takes(x: mx.array, weights: Weights | None) -> bool:
    """Whether the kernels run these products of x: the CPU, loaded, x a float (float weights: float32 x)."""
    if weights is None or _kernels() is None:
        return False
    return x.dtype in FLOATS if weights.bits else x.dtype == mx.float32


def matmuls(x: mx.array, weights: Weights | None, norm: tuple[mx.array, float] | None = None) -> list[mx.array] | None:
    """``[x @ W.T for W in weights]`` as one product (one dispatch, one job for the threads): a layer's q/k/v or
    gate/up; with ``norm`` (weight, eps), of ``rms_norm(x, weight, eps)`` (float32 x), the norm in the same op.
    The same bits as one by one; None where the kernels do not apply (the caller goes one by one)."""
    if not _takes(x, weights) or (norm is not None and (x.dtype != mx.float32 or norm[0].dtype not in FLOATS)):
        return None
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    return _kernels().matmul_many(x, weights.arrays, bits=weights.bits, group_size=weights.group_size,
                                  has_biases=weights.has_biases, norm=norm_weight, eps=eps)


def mlp_block_applies(h: mx.array, norm_weight: mx.array, weights: Weights | None) -> bool:
    """Whether ``mlp_block`` runs on the kernels for these arguments."""
    return _takes(h, weights) and h.dtype == mx.float32 and weights.count == 3 and norm_weight.dtype in FLOATS


def mlp_block(h: mx.array, norm_weight: mx.array, eps: float, weights: Weights | None) -> mx.array | None:
    """``h + down(silu(gate(n)) * up(n))`` for ``n = rms_norm(h, norm_weight, eps)``, one op (weights: gate, up,
    down); the same bits as those ops one by one. None where the kernels do not apply."""
    if not mlp_block_applies(h, norm_weight, weights):
        return None
    return _kernels().mlp_block(h, norm_weight, eps, weights.arrays, bits=weights.bits,
                                group_size=weights.group_size, has_biases=weights.has_biases)


def attention_block_applies(x: mx.array, norm_weight: mx.array, qkv: Weights | None, out_proj: Weights | None) -> bool:
    """Whether ``attention_block`` runs on the kernels for ``x`` and these weights (the caches aside)."""
    return (_takes(x, qkv) and _takes(x, out_proj) and qkv.count == 3 and out_proj.count == 1 and x.ndim == 3
            and x.dtype == mx.float32 and x.shape[1] <= ATTENTION_MAX_QUERIES and norm_weight.dtype in FLOATS)


def attention_block(x: mx.array, norm: tuple[mx.array, float], qkv: Weights | None, out_proj: Weights | None,
                    k_cache: mx.array, v_cache: mx.array, offset: int, rope: tuple[int, bool, mx.array, float],
                    scale: float) -> tuple[mx.array, mx.array, mx.array] | None:
    """A decoder layer's attention half in one op: ``x + o(attention)`` for q/k/v the projections (``qkv``: three
    weights) of ``rms_norm(x, *norm)``, rotated and written into the caches as ``attention_step`` does, ``out_proj``
    one weight. The bits of ``matmuls(x, qkv, norm)`` then ``attention_step(..., out_proj, residual=x)``. Returns
    (out, the caches with the new rows), or None where the kernels do not apply."""
    if (not attention_block_applies(x, norm[0], qkv, out_proj) or offset + x.shape[1] > k_cache.shape[2]
            or any(a.dtype != mx.float32 for a in (k_cache, v_cache))):
        return None
    dims, traditional, inv_freq, rope_scale = rope
    return tuple(_kernels().attention_block(
        x, norm[0], norm[1], qkv.arrays, out_proj.arrays, k_cache, v_cache, offset, dims, traditional, inv_freq,
        rope_scale, scale, x.shape[1] > 1, qkv.format, out_proj.format))


def decode_plan():
    """An empty ``DecodePlan`` (csrc/decode_plan.h: a dense stack's layers as attention_block + mlp_block each, made
    in one call per step), or None where the kernels do not run."""
    kernels = _kernels()
    return None if kernels is None else kernels.DecodePlan()


def _gathered_rows(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, tuple[int, ...]]:
    """``x [..., M, K]`` and ``indices [...]`` broadcast together -> (rows [B * M, K], ids [B], batch shape)."""
    batch = tuple(mx.broadcast_shapes(x.shape[:-2], indices.shape))
    rows = mx.broadcast_to(x, (*batch, *x.shape[-2:])).reshape(-1, x.shape[-1])
    ids = mx.broadcast_to(indices, batch).flatten()
    return rows, ids if ids.dtype == mx.uint32 else ids.astype(mx.uint32), batch


def gather_quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None,
                            indices: mx.array, group_size: int, bits: int, mode: str = "affine",
                            sorted_indices: bool = False) -> mx.array:
    """``mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, transpose=True, ...)``:
    ``x [..., M, K]``, experts ``w [E, N, K']`` -> ``[batch..., M, N]``."""
    kernels = _kernels()
    if kernels is None or not _quantized_ok(x, group_size, bits, mode):
        return mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, transpose=True, group_size=group_size,
                             bits=bits, mode=mode, sorted_indices=sorted_indices)
    rows, ids, batch = _gathered_rows(x, indices)
    out = kernels.matmul(rows, w, scales, biases, ids, bits=bits, group_size=group_size)
    return out.reshape(*batch, x.shape[-2], w.shape[-2])


def gather_float_matmul(x: mx.array, w: mx.array, indices: mx.array) -> mx.array | None:
    """``x [..., M, K] @ w[indices].T`` for float experts ``w [E, N, K]`` (any float dtype, never copied to
    float32) -> ``[batch..., M, N]`` in float32; None where the kernels do not apply."""
    kernels = _kernels()
    if kernels is None or w.dtype not in FLOATS:
        return None
    rows, ids, batch = _gathered_rows(x.astype(mx.float32), indices)
    return kernels.matmul(rows, w, indices=ids).reshape(*batch, x.shape[-2], w.shape[-2])


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """``mx.fast.rms_norm``; on the CPU one op instead of MLX's graph of about ten."""
    kernels = _kernels()
    if kernels is None or weight is None or x.dtype != mx.float32 or weight.dtype not in FLOATS:
        return mx.fast.rms_norm(x, weight, eps)
    return kernels.rms_norm(x, weight, eps)


def rope(x: mx.array, dims: int, traditional: bool, inv_freq: mx.array, scale: float, offset) -> mx.array | None:
    """``mx.fast.rope`` with angles ``position * scale * inv_freq`` (``inv_freq`` float32, ``dims / 2``); None where
    the kernels do not apply (a GPU, an offset per row): the caller runs ``mx.fast.rope``."""
    kernels = _kernels()
    if kernels is None or x.dtype != mx.float32 or not isinstance(offset, int) or x.ndim < 2:
        return None
    return kernels.rope(x, dims, traditional, inv_freq, scale, offset)


# Rows of x up to which the models run their products on the kernels (models/layers.DEQUANTIZE_MIN_ROWS: from one
# more, a prompt's linears convert their weights a block at a time and run BLAS), and queries the attention kernel
# takes at once: a short prompt's too, as its products. Measured on SmolLM2 Q8_0, 46-token prompts: 287 -> 343 tok/s
# against MLX's graph on OpenBLAS. Longer prompts were faster this way too (256 tokens 210 -> 280), but next to the
# BLAS products they peaked ~17 MB higher (RSS, 70 tokens), past what `estimate` predicts.
KERNEL_MAX_ROWS = 63
ATTENTION_MAX_QUERIES = KERNEL_MAX_ROWS


def _attention_shapes_ok(q: mx.array, k: mx.array, v: mx.array, causal: bool) -> bool:
    """q [B, Hq, L, D] with few queries, k [B, Hkv, T, D], v [B, Hkv, T, Dv], float32, Hkv dividing Hq."""
    if not (q.ndim == k.ndim == v.ndim == 4 and q.dtype == k.dtype == v.dtype == mx.float32):
        return False
    (b, hq, queries, d), (bk, hkv, keys, dk) = q.shape, k.shape
    return (queries <= ATTENTION_MAX_QUERIES and b == bk and d == dk and v.shape[:3] == k.shape[:3]
            and hkv > 0 and hq % hkv == 0 and (not causal or keys >= queries))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention``; on the CPU, for a few queries (decoding), one op."""
    kernels = _kernels()
    if (kernels is None or not (mask is None or (isinstance(mask, str) and mask == "causal"))
            or not _attention_shapes_ok(q, k, v, causal=mask is not None)):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return kernels.attention(q, k, v, scale, mask == "causal")


def attention_step(q: mx.array, k: mx.array, v: mx.array, k_cache: mx.array, v_cache: mx.array, offset: int,
                   rope: tuple[int, bool, mx.array, float], scale: float, out_proj: Weights | None = None,
                   residual: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array] | None:
    """A decode step's attention in one op: ``q [B, L, Hq * D]``, ``k``/``v [B, L, Hkv * D]`` from the projections,
    rotated (``rope``: dims, traditional, per-pair angles, position scale) at positions ``offset..``, written into
    the float cache buffers ``[B, Hkv, capacity, D]`` at those rows, causal attention over all ``offset + L``.
    With ``out_proj`` (one weight) and ``residual`` ``[B, L, hidden]``: out is ``residual + out @ W_o.T``, in the
    same op. Returns (out ``[B, L, Hq * D]``, the caches with the new rows), or None where the kernels do not
    apply: the caller runs rope, the cache update and ``attention`` one by one (the same bits)."""
    kernels = _kernels()
    if (kernels is None or q.shape[1] > ATTENTION_MAX_QUERIES or offset + q.shape[1] > k_cache.shape[2]
            or any(a.dtype != mx.float32 for a in (q, k, v, k_cache, v_cache))):
        return None
    if out_proj is not None and (out_proj.count != 1 or residual is None or residual.dtype != mx.float32):
        return None
    dims, traditional, inv_freq, rope_scale = rope
    extra = {} if out_proj is None else {"out_proj": out_proj.arrays, "bits": out_proj.bits,
                                         "group_size": out_proj.group_size, "has_biases": out_proj.has_biases,
                                         "residual": residual}
    return tuple(kernels.attention_step(q, k, v, k_cache, v_cache, offset, dims, traditional, inv_freq, rope_scale,
                                        scale, q.shape[1] > 1, **extra))
