"""This machine as edge-llm sees it: MLX backend and device, memory, bandwidth, the BLAS MLX's CPU uses."""
