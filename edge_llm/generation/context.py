"""The context window a run uses: how many tokens its KV cache may hold, bounded by the model's limit.

The default is the model's limit capped at ``DEFAULT_CONTEXT`` tokens. 4,096 is what ``edge-llm
estimate`` assumes by default and what ollama gives a model, so the memory check and the runtime agree.
The KV cache grows with it, and on the CPU it is kept in float32: a Llama-2-7B (32 layers, 32 key/value
heads of 128) takes 1 MB per token, 4.3 GB at 4,096 tokens and 8.6 GB at 8,192, already more than its
4-bit weights (about 4 GB). ``--kv-bits 8`` or ``4`` shrinks it 3.6x or 6.4x.
"""

from __future__ import annotations

from typing import Any

from ..errors import ContextError

DEFAULT_CONTEXT = 4096


def model_context_limit(config: dict[str, Any] | Any) -> int | None:
    """The model's own limit (``max_position_embeddings``; a GGUF's ``context_length`` arrives under that
    name) from a config dict or a ModelArgs; None when it names none that makes sense."""
    value = config.get("max_position_embeddings") if isinstance(config, dict) else (
        getattr(config, "max_position_embeddings", None))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def context_window(limit: int | None, requested: int | None = None) -> int:
    """``requested`` tokens if the model allows them, else the default; ContextError past the limit."""
    if requested is None:
        return min(limit, DEFAULT_CONTEXT) if limit else DEFAULT_CONTEXT
    if requested < 1:
        raise ContextError(f"--context must be at least 1 token, got {requested}")
    if limit and requested > limit:
        raise ContextError(f"--context {requested} is over the model's limit of {limit} tokens "
                           f"(max_position_embeddings, or a GGUF's context_length); pass at most {limit}")
    return requested
