"""FP8 checkpoints (DeepSeek-V3/R1 format): e4m3 weights with per-block ``weight_scale_inv``, dequantized on load.

Format (DeepSeek-V3 ``inference/kernel.py::weight_dequant``, transformers' ``FineGrainedFP8`` integration):
``W.weight`` is ``F8_E4M3 [..., M, N]`` and ``W.weight_scale_inv`` is ``F32 [..., ceil(M/bm), ceil(N/bn)]``
with blocks ``quantization_config.weight_block_size`` (default 128x128); the real weight is
``fp8_value * weight_scale_inv`` of its block. ``mx.load`` hands F8_E4M3 tensors over as raw ``uint8``
(MLX 0.32); ``mx.from_fp8`` decodes e4m3 exactly (all 256 codes agree with ``torch.float8_e4m3fn``).
Dequantizing is lazy like the rest of loading and yields float32; the loader then casts to the compute dtype.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import CheckpointError
from .checkpoint import Checkpoint

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_size(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config")
    size = qc.get("weight_block_size") if isinstance(qc, dict) else None
    return (int(size[0]), int(size[1])) if size else DEFAULT_BLOCK


def dequantize_block_fp8(weight: mx.array, scale_inv: mx.array, block: tuple[int, int] = DEFAULT_BLOCK) -> mx.array:
    """``weight`` uint8 e4m3 codes ``[..., M, N]``, ``scale_inv [..., ceil(M/bm), ceil(N/bn)]`` -> float32."""
    *lead, M, N = weight.shape
    bm, bn = block
    gm, gn = math.ceil(M / bm), math.ceil(N / bn)
    w = mx.from_fp8(weight, dtype=mx.float32)
    pad = [(0, 0)] * len(lead) + [(0, gm * bm - M), (0, gn * bn - N)]
    w = mx.pad(w, pad).reshape(*lead, gm, bm, gn, bn)  # edge blocks are partial: pad, scale, cut
    w = w * scale_inv.astype(mx.float32)[..., :, None, :, None]
    return w.reshape(*lead, gm * bm, gn * bn)[..., :M, :N]


def dequantize_fp8(weights: dict[str, mx.array], checkpoint: Checkpoint) -> dict[str, mx.array]:
    """Replaces every F8_E4M3 tensor and its ``*_scale_inv`` by the float32 weight; others pass through."""
    fp8 = [name for name, info in checkpoint.tensors.items() if info.dtype.startswith("F8")]
    if not fp8:
        return weights
    block = block_size(checkpoint.config)
    weights = dict(weights)
    for name in fp8:
        info = checkpoint.tensors[name]
        if info.dtype != "F8_E4M3":
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}; only F8_E4M3 weights are supported")
        scale = weights.pop(name + SCALE_SUFFIX, None)
        if scale is None:
            raise CheckpointError(
                f"{info.file}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}; only block-scaled FP8 "
                "(DeepSeek-V3 format) is supported"
            )
        if len(info.shape) < 2:
            raise CheckpointError(f"{info.file}: FP8 tensor {name!r} has shape {info.shape}; expected a matrix")
        *lead, rows, cols = info.shape
        expected = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{info.file}: {name + SCALE_SUFFIX!r} has shape {tuple(scale.shape)}, expected {expected} for "
                f"{list(block)} blocks of {name!r} {info.shape}"
            )
        weights[name] = dequantize_block_fp8(weights[name], scale, block)
    return weights
