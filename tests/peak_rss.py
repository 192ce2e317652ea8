"""A command in a fresh process, measured: its output, wall time and its own peak resident memory.

The peak is the kernel's high-water mark of that process alone (``ru_maxrss`` from ``wait4`` in a parent
that waits for exactly that child). Shared by the memory-estimate test and the benchmarks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Run:
    stdout: str
    stderr: str
    wall_s: float
    max_rss_bytes: int


def measure(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 1800) -> Run:
    """Runs ``cmd`` in a fresh process; returns its output, wall time and its own peak resident memory."""
    start = time.perf_counter()
    proc = subprocess.run(_with_rss(cmd), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return Run(proc.stdout, proc.stderr, wall, _parse_rss(proc.stderr))


# A parent that waits for exactly one child, so ru_maxrss is that child's peak alone (under mlx.launch, each
# rank's: the line names the rank, "single" outside a launch).
RSS_WRAPPER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f\"\\n@@max_rss_kb={usage.ru_maxrss} rank={os.environ.get('MLX_RANK', 'single')}\\n\")\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _with_rss(cmd: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", RSS_WRAPPER, *cmd]


def _parse_rss(stderr: str) -> int:
    m = re.search(r"@@max_rss_kb=(\d+)", stderr)
    return int(m.group(1)) * 1024 if m else 0
