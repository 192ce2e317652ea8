"""edge-llm: run open language models, above all Mixture-of-Experts models, on this machine.

Importing the package is cheap: the loader (and with it MLX, tokenizers and jinja2) is imported the first
time ``edge_llm.load`` or ``edge_llm.load_model`` is used. What it does at once is load an optimized
OpenBLAS, when the system has one (``machine/blas.py``): it must be in the process before ``mlx.core``
is, and every module of edge-llm, ``quant`` and ``cli`` imports this package first (the parent package
of any module is imported before the module), so no import order can put MLX ahead of it.
"""

from .machine.blas import preload_openblas

preload_openblas()

# ruff: noqa: E402

from .errors import CheckpointError, EdgeLLMError, TokenizerError

__all__ = ["load", "load_model", "EdgeLLMError", "CheckpointError", "TokenizerError"]
__version__ = "0.1.0"

_LAZY = {"load", "load_model"}


def __getattr__(name: str):
    """``edge_llm.load`` / ``edge_llm.load_model``, imported on first use."""
    if name in _LAZY:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
