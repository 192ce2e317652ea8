"""Errors edge-llm raises at its boundaries.

Each carries one line meant for a person: what went wrong, where, and what to do. The CLI prints
``str(error)`` to stderr and exits 1; nothing else is needed to explain it.
"""


class EdgeLLMError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class CheckpointError(EdgeLLMError):
    """A model folder or file that cannot be read: missing, malformed, unsupported."""


class TokenizerError(EdgeLLMError):
    """Tokenizer files that are missing or unreadable, or a chat template that fails."""


class HubError(EdgeLLMError):
    """A Hugging Face Hub request that failed: not found, gated, offline, disk full."""


class MemoryBudgetError(EdgeLLMError):
    """A model that will not fit in this machine's memory."""


class ContextError(EdgeLLMError):
    """A prompt longer than the context, or a --context / --kv-bits setting the model cannot take."""
