"""Which files of a model folder are its own: the rule for anything copied out of a folder or read verbatim.

A folder handed to edge-llm may hold links. Followed blindly, ``README.md -> /proc/self/environ`` or
``NOTICE -> /etc/shadow`` would carry the environment (HF_TOKEN included) or the password hashes into a
quantized output a user then uploads, or into a chat template the model reads. So a file counts as the
folder's own only when, links resolved, it is a regular file inside the folder itself, or, for a Hub
snapshot (``models--{owner}--{name}/snapshots/{commit}``), inside that repo's ``blobs/`` folder, where
huggingface_hub keeps the real files its snapshot links point to.

Files that are parsed and checked rather than passed on (config.json, safetensors weights, tokenizer
files) may be links anywhere: a folder a user assembled by hand from links to weights elsewhere is
legitimate, and the parsers refuse what is not a model file. What is copied into an output or read
as text for the model (README, NOTICE, chat templates, ...) must be the folder's own.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

_COPY_CHUNK = 1 << 20


def own_roots(folder: Path) -> list[Path]:
    """The real folders a file of ``folder`` may live in: the folder, and a Hub snapshot's blobs folder."""
    real = folder.resolve()
    roots = [real]
    for snapshot in (folder, real):
        if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
            blobs = (snapshot.parent.parent / "blobs").resolve()
            if blobs not in roots:
                roots.append(blobs)
    return roots


def not_own(folder: Path, path: Path) -> str | None:
    """Why ``path`` (an entry of ``folder``) is not the folder's own regular file, or None when it is."""
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):  # a dangling link, a loop, no permission
        return "a broken link" if path.is_symlink() else "unreadable"
    if not any(real == root or root in real.parents for root in own_roots(folder)):
        return f"a link to {os.readlink(path) if path.is_symlink() else real}, outside the model folder"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def copy_own_file(real: Path, dest: Path) -> None:
    """Copies the regular file ``real`` (a resolved path) to ``dest``, refusing to follow a link swapped in since
    it was checked, or anything but a regular file; keeps its permission bits (set-id bits dropped) and times."""
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{real}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as src, open(dest, "xb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.chmod(dest, stat.S_IMODE(st.st_mode) & 0o777)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)
