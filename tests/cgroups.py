"""A real memory limit for a child process (tests and benchmarks run as root): a cgroup, v1 or v2.

    group = memory_cgroup("name", limit_bytes)      # None where this process cannot make one
    subprocess.run(in_cgroup(group, [cmd, ...]))    # the command runs inside it; a process over it is killed (137)
    group.rmdir()                                   # once its processes have exited
"""

from __future__ import annotations

from pathlib import Path


def memory_cgroup(name: str, limit: int) -> Path | None:
    """A memory cgroup limited to ``limit`` bytes (v1 or v2), or None where this process cannot make one."""
    for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                             (Path("/sys/fs/cgroup"), "memory.max")):
        if (root / limit_file).exists() or (root / "cgroup.controllers").exists():
            group = root / name
            try:
                group.mkdir(exist_ok=True)
                (group / limit_file).write_text(str(limit))
                return group
            except OSError:
                continue
    return None


def in_cgroup(group: Path, command: list[str]) -> list[str]:
    """``command`` run by a shell that first moves itself into ``group``."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
