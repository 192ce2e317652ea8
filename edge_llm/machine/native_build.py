"""Building native code on this machine, once: what the CPU kernels (``edge_llm/kernels/build.py``) and the
compiled quantization search (``quant/affine_native.py``) share.

The compilers are found on PATH (or named by an environment variable, and then only that one), their versions
go into the cache keys, and a library is built in a temporary folder beside its final place and renamed into
it, so a crash never leaves half a library and a second process building the same one at once keeps the first
(which may already be loaded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPILE_TIMEOUT = 300  # seconds for one compiler call; a compiler that hangs must not hang the command


class BuildError(RuntimeError):
    """Why native code could not be built here (one line, for ``edge-llm doctor``)."""


def find_tool(names: tuple[str, ...], env: str) -> str:
    """The path of ``$env`` where set (and only it), else of the first of ``names`` on PATH; BuildError if none."""
    chosen = os.environ.get(env)
    for name in (chosen,) if chosen else names:
        path = shutil.which(name)
        if path:
            return path
    wanted = " or ".join((chosen,) if chosen else names)
    raise BuildError(f"no {wanted} compiler on PATH (install gcc/g++ or set {env})")


def tool_version(tool: str) -> str:
    """What ``tool --version`` prints (part of a cache key: another compiler builds another library)."""
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def run_compiler(command: list[str]) -> None:
    """Runs one compiler or linker call; BuildError with its first error line when it fails or hangs."""
    name = Path(command[0]).name
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{name} took over {COMPILE_TIMEOUT} s") from None
    except OSError as e:
        raise BuildError(f"{name} could not run: {e}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
        raise BuildError(f"{name} failed: {first_error.strip()}")


def build_once(target: Path, library: str, make: Callable[[Path], None], force: bool = False) -> Path:
    """``target/library``, built first if missing (or ``force``): ``make(folder)`` writes it into a temporary
    folder, which is then renamed to ``target``. Object files (``*.o``) left in the folder are removed."""
    path = target / library
    if path.exists() and not force:
        return path
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        make(work)
        for obj in work.glob("*.o"):
            obj.unlink()
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(work, target)
        except OSError:  # another process finished the same build first: keep its library (it may be loaded)
            if not path.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
