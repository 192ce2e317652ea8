"""Quantization (4/8-bit MLX affine, FP16/BF16) and the memory estimator."""

import edge_llm  # noqa: F401  (first: its OpenBLAS preload must precede this package's `import mlx.core`)
