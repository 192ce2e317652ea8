"""edge-llm's CPU kernels: quantized and half-precision matrix products for MLX's CPU backend.

MLX's CPU backend reads a 4-bit matrix at under 1 GB/s and upcasts a bf16 weight to float32 in full for
every product; decoding is memory-bound, so that sets the speed. And its CPU fast ops (RMS norm, rope,
attention) run as graphs of many small ops, each a dispatch: a small model's decode step spends more time
dispatching than computing. ``ops`` replaces both on the CPU. These kernels (``csrc/``: C with
vector types, AVX2/FMA on x86-64, NEON on arm64, a small thread pool over output rows) read the weights
as stored, once, at the memory's pace. They plug in as an MLX custom primitive (``csrc/primitive.cpp``)
so the graph stays lazy. ``ops`` is what the models call; ``extension.status()`` says whether the
kernels run here, and why not when they do not (``edge-llm doctor`` prints it).
"""

from .extension import ENV, KernelStatus, status
from .ops import (
    ATTENTION_MAX_QUERIES,
    KERNEL_MAX_ROWS,
    Weights,
    active,
    attention,
    attention_block,
    attention_block_applies,
    attention_step,
    decode_plan,
    dequantized_rows,
    float_matmul,
    gather_float_matmul,
    gather_quantized_matmul,
    matmuls,
    mlp_block,
    mlp_block_applies,
    quantized_matmul,
    rms_norm,
    rope,
)

__all__ = ["ENV", "active", "KernelStatus", "status", "quantized_matmul", "float_matmul", "gather_quantized_matmul",
           "gather_float_matmul", "rms_norm", "rope", "attention", "attention_block", "attention_step",
           "ATTENTION_MAX_QUERIES", "KERNEL_MAX_ROWS", "Weights", "matmuls", "mlp_block", "decode_plan",
           "dequantized_rows", "attention_block_applies", "mlp_block_applies"]
