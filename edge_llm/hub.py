"""Model references -> local folders.

A reference is a local checkpoint folder today; Hub repo ids (from the cache, or pulled) and GGUF
files resolve here too as they are added, so every command accepts the same MODEL argument.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def resolve_model(ref: str | Path) -> Path:
    """The local folder for ``ref``; raises CheckpointError with what to do when there is none."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    raise CheckpointError(f"{ref}: no such model folder")
