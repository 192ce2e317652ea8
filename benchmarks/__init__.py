"""Speed and memory measurements against mlx-lm (not tests)."""

import edge_llm  # noqa: F401  (first: its OpenBLAS preload must precede any `import mlx.core`)
