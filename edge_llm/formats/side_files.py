"""The files a converted checkpoint carries over from its source folder: tokenizer, templates, README, licence.

Only the source folder's own regular files are copied (``own_files``): a link to anything outside
the folder (or, for a Hub snapshot, outside its repo's blobs) is skipped and named, never followed, so a
hostile folder cannot smuggle ``/proc/self/environ`` or ``/etc/shadow`` into the output. Weights, indexes
and config.json are not copied: the converter writes its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .own_files import copy_own_file, not_own

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass(frozen=True)
class FolderSideFiles:
    """A source folder's side files (``Checkpoint.side_files()`` of a folder)."""

    copy: tuple[tuple[str, Path], ...]  # (name in the folder, real path to copy from)
    skipped: tuple[tuple[str, str], ...]  # (name, why it is not copied)

    @property
    def nbytes(self) -> int:
        return sum(real.stat().st_size for _, real in self.copy)

    def write(self, dest: Path) -> None:
        for name, real in self.copy:
            copy_own_file(real, dest / name)
        for name, why in self.skipped:
            log.warning("not copied into the output: %s (%s)", name, why)


def select_side_files(folder: Path) -> FolderSideFiles:
    """The side files of ``folder`` to copy, and those skipped because they are not the folder's own."""
    copy, skipped = [], []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name in NOT_COPIED or name.endswith(WEIGHT_SUFFIXES):
            continue
        if path.is_dir() and not path.is_symlink():
            continue  # subfolders are not carried over
        why = not_own(folder, path)
        if why is None:
            copy.append((name, path.resolve()))
        elif path.is_symlink():  # a plain FIFO, socket or device is no side file: not worth a warning
            skipped.append((name, why))
    return FolderSideFiles(tuple(copy), tuple(skipped))
