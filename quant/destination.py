"""Where a converted checkpoint may go: refused up front, before any work, when OUT cannot be a new folder
or its disk cannot take it; and the one line a failed write becomes.

The output is built beside OUT and renamed onto it (``writer.AtomicFolder``), and ``--force`` moves an
existing OUT aside first. So OUT must name a folder of its own: not ``""``, ``.`` or ``..`` (the kernel
refuses to rename those, after the whole model was converted), not the filesystem root, a mount point,
the current folder, the home folder or a folder above them (``--force`` would move them away), and not
the source, a folder inside it or above it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from edge_llm.errors import EdgeLLMError
from edge_llm.machine.memory import human_bytes


class QuantizeError(EdgeLLMError):
    """A conversion that cannot be done: bad options, an existing output, a full disk."""


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


def check_destination(source: Path | None, out: str | Path, force: bool) -> None:
    """Raises QuantizeError with ``refusal``'s line."""
    if why := refusal(source, out, force):
        raise QuantizeError(why)


def check_space(out: Path, needed: int) -> None:
    """Refuses up front a destination that is read-only or lacks the space the plan needs."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if probe.is_dir() and not os.access(probe, os.W_OK):
        raise QuantizeError(f"{out}: cannot write there ({probe} is not writable); choose another -o")
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise QuantizeError(f"{out}: needs {human_bytes(needed)} but only {human_bytes(free)} is free on that disk; "
                            "free some space or choose another -o")


def disk_error(out: Path, e: OSError) -> EdgeLLMError | OSError:
    """The line a failed write of ``out`` deserves, naming OUT (not the temporary folder beside it)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return QuantizeError(f"{out}: {e.strerror.lower()} while writing; nothing was written (free some space or "
                             "choose another -o)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return QuantizeError(f"{out}: cannot write there ({e.strerror.lower()}); choose another -o")
    temporary = Path(e.filename or "").name.startswith((f".{out.name}.partial-", f".{out.name}.old-"))
    if e.errno == errno.ENAMETOOLONG and temporary:
        return QuantizeError(f"{out}: name too long for the temporary folder written beside it first "
                             f"(.{out.name}.partial-XXXXXXXX); choose a shorter -o")
    if temporary or f"/.{out.name}.partial-" in str(e.filename or ""):  # name the user's OUT, not our scratch copy
        return QuantizeError(f"{out}: {(e.strerror or str(e)).lower()} while writing; nothing was written")
    return e
