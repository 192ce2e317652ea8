"""The memory limit of this process's cgroup (Linux), so a container's limit is honoured.

Which cgroup: ``/proc/self/cgroup`` names it per hierarchy (v1: ``ID:memory,...:/path``; v2: ``0::/path``),
and ``/proc/self/mountinfo`` says where that hierarchy is mounted and which of its directories the mount
shows (a container usually sees its own group as the mount's root). v1 (the ``memory`` controller is
checked first: a hybrid host mounts v2 without it) reads ``memory.limit_in_bytes`` and
``memory.usage_in_bytes``; v2 reads ``memory.max`` and ``memory.high`` (past ``high`` the kernel throttles
the group hard, so it is a limit too) and ``memory.current``. Limits nest: every ancestor up to the mount
is read and the tightest room wins. Usage counts the page cache (of the model's own files too: a streamed
model's reads fill it), which the kernel reclaims, active or inactive, before it kills anything, so
room = limit - (usage - file pages): what is left beside anonymous memory and the kernel's own.

Every path is read under ``root`` so tests can lay out fake v1 and v2 trees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# v1 writes "no limit" as the largest page-aligned 64-bit value (9223372036854771712 with 4 KiB pages)
UNLIMITED_V1 = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit among this process's cgroup and its ancestors."""

    version: int  # 1 or 2
    path: Path  # the directory whose limit binds (under ``root``)
    limit_bytes: int
    usage_bytes: int  # usage less the page cache (file pages, which the kernel reclaims first)
    room_bytes: int  # limit - usage, never negative


@dataclass(frozen=True)
class _Mount:
    root: str  # the hierarchy's directory the mount shows
    point: Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, *keys: str) -> int:
    """The first of ``keys`` found in a ``memory.stat`` file, or 0."""
    values = {}
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    for key in keys:
        try:
            return int(values[key])
        except (KeyError, ValueError):
            continue
    return 0


def _own_groups(root: Path) -> tuple[str | None, str | None]:
    """(v1 memory group path, v2 group path) from /proc/self/cgroup."""
    v1 = v2 = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            v1 = path
        elif hierarchy == "0" and controllers == "":
            v2 = path
    return v1, v2


def _mounts(root: Path) -> tuple[_Mount | None, _Mount | None]:
    """(v1 memory mount, v2 mount) from /proc/self/mountinfo, their points placed under ``root``."""
    v1 = v2 = None
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        mount = _Mount(fields[3], root / fields[4].lstrip("/"))
        if fstype == "cgroup" and "memory" in options and v1 is None:
            v1 = mount
        elif fstype == "cgroup2" and v2 is None:
            v2 = mount
    return v1, v2


def _group_dir(mount: _Mount, group: str) -> Path:
    """The directory of ``group`` under the mount; the mount itself when it shows the group (a container)."""
    rel = Path(group).relative_to(mount.root) if Path(group).is_relative_to(mount.root) else Path(".")
    directory = mount.point / rel
    return directory if directory.is_dir() else mount.point


def _chain(mount: _Mount, group: str) -> list[Path]:
    """The group's directory and each ancestor up to the mount point."""
    directory = _group_dir(mount, group)
    chain = [directory]
    while chain[-1] != mount.point and mount.point in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _v1(directory: Path) -> tuple[int, int] | None:
    limit = _int(directory / "memory.limit_in_bytes")
    usage = _int(directory / "memory.usage_in_bytes")
    if limit is None or usage is None or limit >= UNLIMITED_V1:
        return None
    stat = directory / "memory.stat"
    cache = (_stat_value(stat, "total_inactive_file", "inactive_file")
             + _stat_value(stat, "total_active_file", "active_file"))
    return limit, usage - cache


def _v2(directory: Path) -> tuple[int, int] | None:
    limits = [v for v in (_int(directory / "memory.max"), _int(directory / "memory.high")) if v is not None]
    usage = _int(directory / "memory.current")
    if not limits or usage is None:
        return None
    stat = directory / "memory.stat"
    return min(limits), usage - _stat_value(stat, "inactive_file") - _stat_value(stat, "active_file")


def cgroup_memory(root: Path = Path("/")) -> CgroupMemory | None:
    """The tightest cgroup memory limit over this process, or None where none is set (or not Linux)."""
    group_v1, group_v2 = _own_groups(root)
    mount_v1, mount_v2 = _mounts(root)
    candidates = []
    if group_v1 is not None and mount_v1 is not None:
        candidates += [(1, d, _v1(d)) for d in _chain(mount_v1, group_v1)]
    if group_v2 is not None and mount_v2 is not None:
        candidates += [(2, d, _v2(d)) for d in _chain(mount_v2, group_v2)]
    found = [CgroupMemory(version, d, limit, max(used, 0), max(limit - max(used, 0), 0))
             for version, d, read in candidates if read is not None for limit, used in [read]]
    if not found:
        return None
    tightest = min(found, key=lambda c: c.room_bytes)
    log.debug("cgroup v%d limit %d at %s, room %d", tightest.version, tightest.limit_bytes, tightest.path,
              tightest.room_bytes)
    return tightest
