"""ggml tensor blocks -> MLX arrays: Q4_0/Q4_1/Q8_0 repacked into MLX's affine format, K-quants dequantized.

References: llama.cpp ``ggml/src/ggml-quants.c`` (``dequantize_row_*``, block layouts in
``ggml-common.h``) and MLX's affine quantization (``w = scale * q + bias`` per group, ``q`` packed
little-endian into uint32 words, 8 x 4-bit or 4 x 8-bit per word).

- Q4_0 ``d * (q - 8)``, Q4_1 ``d * q + m`` and Q8_0 ``d * q`` (q int8) are affine with group 32, so they
  stay quantized: scale ``d``, bias ``-8d`` / ``m`` / ``-128d`` (exact in float16: powers of two).
  This matches what ``mx.load(file.gguf)`` produces for them (tests/test_gguf_quants.py).
- Q2_K..Q6_K have two-level scales that MLX's affine format cannot hold; they are dequantized to
  float16. (``mx.load`` dequantizes Q4_K itself, but gives every odd 32-value sub-block the scale of
  the even one before it: wrong weights. Measured with MLX 0.32.4 against llama.cpp's gguf-py.)
- Every other type (Q5_0, Q5_1, IQ*, TQ*, MXFP4...) is refused by the caller.
"""

from __future__ import annotations

import numpy as np

MLX_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # type -> bits; group size 32
DEQUANTIZED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLOATS = ("F32", "F16", "BF16")
GROUP_SIZE = 32
QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row (little-endian float16) -> float32 column [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def to_mlx_quantized(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """(weight uint32, scales float16, biases float16) of a Q4_0/Q4_1/Q8_0 tensor [..., cols]."""
    rows = int(np.prod(shape[:-1]))
    blocks = raw.reshape(rows, shape[-1] // GROUP_SIZE, -1)  # [rows, groups, block bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [rows, groups]
    if type_name == "Q8_0":
        packed = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q -> unsigned q + 128, one byte each
        biases = d * np.float16(-128)
    else:
        first = 4 if type_name == "Q4_1" else 2
        # ggml: byte j holds value j (low nibble) and value j + 16 (high). MLX: byte i holds values 2i
        # (low) and 2i + 1 (high). Read the 16 bytes as 8 little-endian pairs w = b[2k] | b[2k+1] << 8.
        w = blocks[..., first:].copy().view(np.uint16)  # [rows, groups, 8]
        low = (w & 0x0F) | ((w >> 4) & 0xF0)  # values 2k, 2k + 1
        high = ((w >> 4) & 0x0F) | ((w >> 8) & 0xF0)  # values 16 + 2k, 16 + 2k + 1
        packed = np.concatenate([low, high], axis=-1).astype(np.uint8)
        biases = blocks[..., 2:4].copy().view(np.float16)[..., 0] if type_name == "Q4_1" else d * np.float16(-8)
    # little-endian bytes -> uint32 words keep the first value in the low bits, as MLX packs them
    weight = np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)
    out_shape = tuple(shape[:-1])
    return weight.reshape(*out_shape, -1), d.reshape(*out_shape, -1), biases.reshape(*out_shape, -1)


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


def _q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _split_nibbles(b[:, 16:144], 32).reshape(-1, 8, 32)
    return (d * sc).reshape(-1, 8, 1) * q - (dmin * mn).reshape(-1, 8, 1)


def _q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176]
    q = _split_nibbles(qs, 32) | (_bits(qh, 1, 32) << 4)
    return (d * sc).reshape(-1, 8, 1) * q.reshape(-1, 8, 32) - (dmin * mn).reshape(-1, 8, 1)


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    low = _split_nibbles(ql, 64)  # two halves of 128 values, each from 64 bytes
    high = _bits(qh.reshape(-1, 32), 2, 32).reshape(-1, 256)
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)
    dl = (d * scales.view(np.int8).astype(np.float32)).reshape(-1, 16, 1)
    return dl * q.reshape(-1, 16, 16)


_K_QUANTS = {"Q2_K": (_q2_k, 84), "Q3_K": (_q3_k, 110), "Q4_K": (_q4_k, 144), "Q5_K": (_q5_k, 176),
             "Q6_K": (_q6_k, 210)}  # fmt: skip


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
