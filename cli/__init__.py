"""edge-llm's command line: the only package that prints, knows terminals or sets exit codes."""

import edge_llm  # noqa: F401  (first: its OpenBLAS preload must precede any `import mlx.core`)
