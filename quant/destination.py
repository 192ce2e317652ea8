"""Where a converted checkpoint may go: refused up front, before any work, when OUT cannot be a new folder.

The output is built beside OUT and renamed onto it (``writer.AtomicFolder``), and ``--force`` moves an
existing OUT aside first. So OUT must name a folder of its own: not ``""``, ``.`` or ``..`` (the kernel
refuses to rename those, after the whole model was converted), not the filesystem root, a mount point,
the current folder, the home folder or a folder above them (``--force`` would move them away), and not
the source, a folder inside it or above it.
"""

from __future__ import annotations

import os
from pathlib import Path


def _inside_or_above(a: Path, b: Path) -> bool:
    return a == b or a in b.parents


def _cwd() -> Path | None:
    try:
        return Path.cwd()
    except OSError:  # the current folder was removed
        return None


def refusal(source: Path | None, out: str | Path, force: bool) -> str | None:
    """Why ``out`` cannot receive a conversion of ``source`` (one line, saying what to do), or None. With
    ``source`` None, only what can be told before the source is found (so a pull is not wasted)."""
    text = str(out)
    if not text.strip():
        return "-o is empty: name the output folder, e.g. -o ./model-4bit"
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        return f"{text}: the output must be a new folder of its own, not '.', '..' or '/'; e.g. -o ./model-4bit"
    dst = path.resolve()
    if source is not None and (_inside_or_above(dst, source.resolve()) or source.resolve() in dst.parents):
        return f"{text}: the output must not be the source folder, inside it, or contain it"
    if dst.parent == dst or os.path.ismount(dst):
        return f"{text}: is a mount point or the filesystem root; choose a new folder inside it"
    for what, folder in (("the current folder", _cwd()), ("your home folder", Path.home())):
        if folder is not None and _inside_or_above(dst, folder.resolve()):
            return f"{text}: is {what} or a folder above it; choose a new folder for the output"
    if (path.exists() or path.is_symlink()) and not force:
        return f"{text}: already exists; choose another -o or pass --force to replace it"
    return None
