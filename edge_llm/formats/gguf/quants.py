"""ggml tensor blocks -> MLX arrays: most types repacked exactly into MLX's affine format, the rest dequantized.

References: llama.cpp ``ggml/src/ggml-quants.c`` (``dequantize_row_*``, block layouts in
``ggml-common.h``) and MLX's affine quantization (``w = scale * q + bias`` per group of 32 here, ``q``
packed as a little-endian bit stream into uint32 words).

Kept quantized, exactly (every weight the same value ggml computes; tests/test_gguf_reader.py):
- Q4_0 ``d * (q - 8)``, Q4_1 ``d * q + m``, Q8_0 ``d * q`` (q int8), Q5_0 ``d * (q - 16)``, Q5_1 ``d * q + m``:
  one float16 scale (and min) per 32 values, so scale ``d`` and bias ``-8d`` / ``m`` / ``-128d`` / ``-16d``
  / ``m`` (exact in float16: powers of two). Q4_0/Q4_1/Q8_0 equal what ``mx.load(file.gguf)`` makes.
- Q4_K, Q5_K: 256-value super-blocks of eight 32-value sub-blocks, each ``(d * sc) * q - dmin * m``
  with 6-bit ``sc``/``m``: affine per 32 values with scale ``d * sc`` and bias ``-dmin * m``, kept in
  float32 (the products need more bits than float16 has).
Dequantized to float16: Q2_K, Q3_K, Q6_K, whose 16-value sub-blocks each carry their own scale (MLX's
smallest group is 32). (``mx.load`` dequantizes Q4_K itself, but gives every odd sub-block the scale
of the even one before it: wrong weights. Measured with MLX 0.32.4 against llama.cpp's gguf-py.)
Every other type (IQ*, TQ*, MXFP4, ...) is refused by the caller.
"""

from __future__ import annotations

import numpy as np

# type -> bits of the MLX affine form (group size 32)
MLX_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
MX_LOAD_NATIVE = ("Q4_0", "Q4_1", "Q8_0")  # what mx.load itself turns into the same arrays
FLOAT32_SCALES = ("Q4_K", "Q5_K")
DEQUANTIZED = ("Q2_K", "Q3_K", "Q6_K")
DEQUANTIZED_BITS = {"Q2_K": 2, "Q3_K": 3, "Q6_K": 6}  # nominal bits, for re-quantizing them
FLOATS = ("F32", "F16", "BF16")
GROUP_SIZE = 32
QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row (little-endian float16) -> float32 column [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _half(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values [rows, n] -> MLX's packing [rows, n * bits / 32] uint32: a little-endian
    bit stream, value i in bits [i * bits, (i + 1) * bits)."""
    rows = values.shape[0]
    if bits == 8:
        packed = values.astype(np.uint8)
    elif bits == 4:
        packed = values[:, 0::2] | (values[:, 1::2] << 4)
    elif bits == 5:  # 8 values fill 5 bytes
        v = [x[..., 0] for x in np.split(values.reshape(rows, -1, 8).astype(np.uint16), 8, axis=-1)]
        packed = np.stack([
            v[0] | (v[1] << 5), (v[1] >> 3) | (v[2] << 2) | (v[3] << 7), (v[3] >> 1) | (v[4] << 4),
            (v[4] >> 4) | (v[5] << 1) | (v[6] << 6), (v[6] >> 2) | (v[7] << 3),
        ], axis=-1).astype(np.uint8)  # fmt: skip  (astype keeps the low byte of each)
    else:
        raise ValueError(f"no packing for {bits}-bit values")
    return np.ascontiguousarray(packed, dtype=np.uint8).reshape(rows, -1).view(np.uint32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q5_0 nibbles: byte j holds value j (low) and value j + 16 (high) -> [..., 32] in order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def to_mlx_quantized(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """(weight uint32, scales, biases) in MLX's affine form (group 32) of a tensor [..., cols]."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if type_name in ("Q4_K", "Q5_K"):
        values, scales, biases = _k_affine(raw.reshape(-1, 144 if type_name == "Q4_K" else 176), type_name)
    else:
        blocks = raw.reshape(rows * cols // GROUP_SIZE, -1)  # [groups, block bytes]
        d = _half(blocks[:, 0:2])
        if type_name == "Q8_0":
            values, scales, biases = blocks[:, 2:] ^ np.uint8(0x80), d, d * np.float16(-128)  # int8 -> q + 128
        elif type_name in ("Q4_0", "Q4_1"):
            first = 4 if type_name == "Q4_1" else 2
            values = _low_high(blocks[:, first:])
            scales, biases = d, _half(blocks[:, 2:4]) if type_name == "Q4_1" else d * np.float16(-8)
        else:  # Q5_0 / Q5_1: the fifth bits of the 32 values in 4 bytes (bit j: value j)
            first = 4 if type_name == "Q5_1" else 2
            high = np.unpackbits(blocks[:, first : first + 4], axis=-1, bitorder="little")
            values = _low_high(blocks[:, first + 4 :]) | (high << 4)
            scales, biases = d, _half(blocks[:, 2:4]) if type_name == "Q5_1" else d * np.float16(-16)
    weight = _pack(values.reshape(rows, cols), MLX_QUANTIZED[type_name])
    out = tuple(shape[:-1])
    return weight.reshape(*out, -1), scales.reshape(*out, -1), biases.reshape(*out, -1)


def _k_affine(b: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-blocks -> (values [n * 8, 32], scales float32 [n, 8], biases [n, 8])."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    if type_name == "Q4_K":
        values = _split_nibbles(b[:, 16:144], 32)
    else:
        values = _split_nibbles(b[:, 48:176], 32) | (_bits(b[:, 16:48], 1, 32) << 4)
    return values, d * sc, -(dmin * mn)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed into 12 bytes (Q4_K, Q5_K): ``get_scale_min_k4``."""
    s = scales.astype(np.uint8)
    lo, hi = s[:, 0:4], s[:, 4:8]  # sub-blocks 0..3: 6 low bits; 4..7: top 2 bits of these + byte 8..11
    tail = s[:, 8:12]
    sc = np.concatenate([lo & 63, (tail & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _split_nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """[n, bytes] -> [n, 2 * bytes]: each ``chunk`` bytes give their low nibbles, then their high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, chunk)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(qs.shape[0], -1)


def _bits(q: np.ndarray, width: int, group: int) -> np.ndarray:
    """[n, bytes] -> [n, bytes * 8 / width]: for each run of ``group`` bytes, the 1st ``width``-bit field of
    every byte, then the 2nd, ... (the crumb order of Q2_K/Q3_K/Q6_K)."""
    fields = 8 // width
    q = q.reshape(q.shape[0], -1, 1, group)
    shifts = (np.arange(fields, dtype=np.uint8) * width).reshape(1, 1, fields, 1)
    return ((q >> shifts) & ((1 << width) - 1)).reshape(q.shape[0], -1)


def _q2_k(b: np.ndarray) -> np.ndarray:
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _bits(qs, 2, 32).reshape(-1, 16, 16)  # 16 sub-blocks of 16
    dl = (d * (scales & 0x0F)).reshape(-1, 16, 1)
    ml = (dmin * (scales >> 4)).reshape(-1, 16, 1)
    return dl * q - ml


def _q3_k(b: np.ndarray) -> np.ndarray:
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)  # 16 x 4 low bits
    high = _bits(packed[:, 8:12], 2, 4)  # 16 x 2 high bits
    scales = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)
    q = _bits(qs, 2, 32).astype(np.int8)
    # a clear bit in hmask subtracts 4: values -4..3
    q = q - ((_bits(hmask, 1, 32) ^ 1) << 2).astype(np.int8)
    return (d * scales).reshape(-1, 16, 1) * q.reshape(-1, 16, 16)


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    low = _split_nibbles(ql, 64)  # two halves of 128 values, each from 64 bytes
    high = _bits(qh.reshape(-1, 32), 2, 32).reshape(-1, 256)
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)
    dl = (d * scales.view(np.int8).astype(np.float32)).reshape(-1, 16, 1)
    return dl * q.reshape(-1, 16, 16)


_K_QUANTS = {"Q2_K": (_q2_k, 84), "Q3_K": (_q3_k, 110), "Q6_K": (_q6_k, 210)}


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], chunk_blocks: int = 1 << 16) -> np.ndarray:
    """A K-quant tensor as float16 [shape], dequantized in float32 a chunk of blocks at a time."""
    fn, block_bytes = _K_QUANTS[type_name]
    blocks = raw.reshape(-1, block_bytes)
    out = np.empty((blocks.shape[0], QK_K), dtype=np.float16)
    for start in range(0, blocks.shape[0], chunk_blocks):
        part = blocks[start : start + chunk_blocks]
        out[start : start + len(part)] = fn(part).reshape(len(part), QK_K)
    return out.reshape(shape)


def floats(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """F32/F16 as numpy arrays; BF16 as its uint16 bit pattern (numpy has no bfloat16)."""
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[type_name]
    return raw.view(dtype).reshape(shape)
