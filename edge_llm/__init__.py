"""edge-llm: run open language models, above all Mixture-of-Experts models, on this machine."""

from .blas import preload_openblas

preload_openblas()  # must precede the first `import mlx.core` (see blas.py)

# ruff: noqa: E402

from .errors import CheckpointError, EdgeLLMError, TokenizerError
from .loader import load, load_model

__all__ = ["load", "load_model", "EdgeLLMError", "CheckpointError", "TokenizerError"]
__version__ = "0.1.0"
