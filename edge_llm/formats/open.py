"""The one door to checkpoints: a path in, the reader for its format chosen, a ``Checkpoint`` out."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import Checkpoint
from .folder import read_folder
from .gguf.checkpoint import is_gguf, read_gguf_checkpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Reads config and tensor headers of a model folder (config.json + safetensors) or a GGUF file,
    validating what can be checked cheaply; raises CheckpointError with one line for anything else."""
    target = Path(path).expanduser()
    if not target.exists():
        raise CheckpointError(f"{target}: no such model folder")
    if target.is_dir():
        return read_folder(target)
    if is_gguf(target):
        return read_gguf_checkpoint(target)
    raise CheckpointError(f"{target}: expected a model folder (config.json + *.safetensors) or a .gguf file")
