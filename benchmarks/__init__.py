"""Speed and memory measurements against mlx-lm (not tests)."""
