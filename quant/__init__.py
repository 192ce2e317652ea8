"""Quantization (4/8-bit MLX affine, FP16/BF16) and the memory estimator."""
