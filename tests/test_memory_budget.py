"""The memory budget: ``--max-memory`` sizes, available RAM, and the cgroup limit (v1 and v2 trees laid out
as fake files, with the layouts real hosts and containers have; then a real v1 cgroup of 700 MiB)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edge_llm.machine.cgroup import cgroup_memory
from edge_llm.machine.memory import memory_budget, parse_size, vm_stat_available

GIB = 1 << 30
UNLIMITED = "9223372036854771712"  # what a v1 group without a limit shows (4 KiB pages)
MEMINFO = "MemTotal:       24683652 kB\nMemFree:        20976892 kB\nMemAvailable:   16000000 kB\n"
AVAILABLE = 16000000 * 1024
# /proc/self/mountinfo of a cgroup v1 host with the v2 hierarchy mounted beside it (this machine's layout)
MOUNTS_HYBRID = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 {v1_root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
MOUNTS_V2 = "29 23 0:26 {v2_root} /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def v1_host(root: Path, group: str, levels: dict[str, tuple[str, int, int]], v1_root: str = "/") -> Path:
    """A v1 host; ``levels``: group path under the memory mount -> (limit, usage, total_inactive_file)."""
    files = {"proc/meminfo": MEMINFO, "proc/self/mountinfo": MOUNTS_HYBRID.format(v1_root=v1_root),
             "proc/self/cgroup": f"9:name=systemd:/\n4:memory:{group}\n1:cpu:/\n0::/\n"}
    for path, (limit, usage, inactive) in levels.items():
        d = f"sys/fs/cgroup/memory/{path}".rstrip("/")
        files[f"{d}/memory.limit_in_bytes"] = f"{limit}\n"
        files[f"{d}/memory.usage_in_bytes"] = f"{usage}\n"
        files[f"{d}/memory.stat"] = f"cache 1\ninactive_file 5\ntotal_cache 1\ntotal_inactive_file {inactive}\n"
    return write(root, files)


def v2_host(root: Path, group: str, levels: dict[str, dict[str, str]], v2_root: str = "/") -> Path:
    files = {"proc/meminfo": MEMINFO, "proc/self/mountinfo": MOUNTS_V2.format(v2_root=v2_root),
             "proc/self/cgroup": f"0::{group}\n"}
    for path, values in levels.items():
        for name, text in values.items():
            files[f"sys/fs/cgroup/{path}/{name}".replace("//", "/")] = text
    return write(root, files)


# --- --max-memory SIZE ---

@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("8G", 8 * 10**9), ("8gb", 8 * 10**9), ("8 GB", 8 * 10**9), ("1.5TB", 15 * 10**11),
    ("512MiB", 512 * 2**20), ("512Mi", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.1GB", 1_100_000_000),
    ("4096", 4096), ("4096B", 4096), ("700K", 700_000), (".5GB", 500_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "8XB", "-1GB", "0", "0.0001B", "1e9", "nan", "8 G B", "8GBs", "eight"])
def test_parse_size_refuses_in_one_line(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


# --- cgroup v1 ---

def test_v1_limit_is_read_and_page_cache_is_room(tmp_path):
    group = "/process_api/abc"
    root = v1_host(tmp_path, group, {"": (UNLIMITED, 9 * GIB, 0), "process_api": (UNLIMITED, 9 * GIB, 0),
                                     "process_api/abc": (700 * 2**20, 500 * 2**20, 200 * 2**20)})
    found = cgroup_memory(root)
    assert (found.version, found.limit_bytes) == (1, 700 * 2**20)
    assert found.path == root / "sys/fs/cgroup/memory/process_api/abc"
    # inactive page cache is reclaimed before the group is killed: working set 300 MiB, room 400 MiB
    assert (found.usage_bytes, found.room_bytes) == (300 * 2**20, 400 * 2**20)
    budget = memory_budget(root=root)
    assert (budget.budget_bytes, budget.source, budget.available_ram_bytes) == (400 * 2**20, "cgroup limit",
                                                                                AVAILABLE)



def test_what_this_process_holds_counts_as_its_own(tmp_path):
    """The estimator's footprint is the whole process, so its resident memory is added back to the room left."""
    group = "/process_api/abc"
    root = v1_host(tmp_path, group, {"process_api/abc": (700 * 2**20, 500 * 2**20, 200 * 2**20)})
    page = os.sysconf("SC_PAGE_SIZE")
    shared = 2000  # file-backed pages: already room as page cache, not added twice
    write(root, {"proc/self/statm": f"90000 {100 * 2**20 // page + shared} {shared} 10 0 5000 0\n"})
    budget = memory_budget(root=root)
    assert (budget.budget_bytes, budget.source) == (500 * 2**20, "cgroup limit")  # 400 MiB room + 100 held
    assert budget.available_ram_bytes == AVAILABLE + 100 * 2**20


def test_v1_active_page_cache_is_room_too(tmp_path):
    """A streamed model's reads fill the group's page cache (active after a second read): the kernel reclaims it."""
    root = v1_host(tmp_path, "/g", {"g": (700 * 2**20, 500 * 2**20, 100 * 2**20)})
    stat = root / "sys/fs/cgroup/memory/g/memory.stat"
    stat.write_text(stat.read_text() + f"total_active_file {200 * 2**20}\n")
    assert cgroup_memory(root).room_bytes == 500 * 2**20

def test_v1_without_limit_leaves_available_ram(tmp_path):
    root = v1_host(tmp_path, "/user", {"": (UNLIMITED, GIB, 0), "user": (UNLIMITED, GIB, 0)})
    assert cgroup_memory(root) is None
    budget = memory_budget(root=root)
    assert (budget.budget_bytes, budget.source, budget.cgroup) == (AVAILABLE, "available RAM", None)


def test_v1_parent_limit_binds_a_child_without_one(tmp_path):
    root = v1_host(tmp_path, "/jobs/7", {"": (UNLIMITED, 0, 0), "jobs": (2 * GIB, GIB, 0),
                                         "jobs/7": (UNLIMITED, GIB // 2, 0)})
    found = cgroup_memory(root)
    assert (found.limit_bytes, found.room_bytes) == (2 * GIB, GIB)
    assert found.path == root / "sys/fs/cgroup/memory/jobs"


def test_v1_ram_tighter_than_the_cgroup(tmp_path):
    root = v1_host(tmp_path, "/big", {"big": (64 * GIB, GIB, 0)})
    assert memory_budget(root=root).source == "available RAM"


def test_v1_container_sees_its_own_group_as_the_mount(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host path, the mount shows that group."""
    group = "/docker/0123abcd"
    root = v1_host(tmp_path, group, {"": (3 * GIB, GIB, 0)}, v1_root=group)
    found = cgroup_memory(root)
    assert (found.limit_bytes, found.room_bytes, found.path) == (3 * GIB, 2 * GIB, root / "sys/fs/cgroup/memory")


# --- cgroup v2 ---

def test_v2_max_and_current(tmp_path):
    root = v2_host(tmp_path, "/user.slice/app.scope", {
        "user.slice": {"memory.max": "max\n", "memory.high": "max\n", "memory.current": "100\n"},
        "user.slice/app.scope": {"memory.max": f"{4 * GIB}\n", "memory.high": "max\n",
                                 "memory.current": f"{3 * GIB}\n",
                                 "memory.stat": f"anon 1\ninactive_file {GIB // 2}\nactive_file {GIB // 2}\n"},
    })
    found = cgroup_memory(root)
    assert (found.version, found.limit_bytes, found.usage_bytes, found.room_bytes) == (2, 4 * GIB, 2 * GIB, 2 * GIB)
    assert memory_budget(root=root).budget_bytes == 2 * GIB


def test_v2_high_is_a_limit_too(tmp_path):
    root = v2_host(tmp_path, "/a", {"a": {"memory.max": f"{8 * GIB}", "memory.high": f"{3 * GIB}",
                                         "memory.current": f"{GIB}"}})
    assert cgroup_memory(root).limit_bytes == 3 * GIB


def test_v2_max_means_no_limit(tmp_path):
    root = v2_host(tmp_path, "/", {"": {"memory.max": "max\n", "memory.current": "5\n"}})
    assert cgroup_memory(root) is None


def test_v2_container_with_its_own_namespace(tmp_path):
    """Docker/Podman on a v2 host: the process sees "0::/" and its group at the mount point."""
    root = v2_host(tmp_path, "/", {"": {"memory.max": "700000000\n", "memory.current": "200000000\n"}})
    assert cgroup_memory(root).room_bytes == 500_000_000


def test_hybrid_host_reads_v1_memory_not_the_empty_v2_tree(tmp_path):
    root = v1_host(tmp_path, "/g", {"g": (GIB, GIB // 4, 0)})
    write(root, {"sys/fs/cgroup/unified/cgroup.procs": "1\n"})  # the v2 tree carries no memory controller
    found = cgroup_memory(root)
    assert (found.version, found.room_bytes) == (1, 3 * GIB // 4)


def test_over_the_limit_has_no_room(tmp_path):
    root = v2_host(tmp_path, "/", {"": {"memory.max": "1000", "memory.current": "5000"}})
    assert cgroup_memory(root).room_bytes == 0


def test_no_proc_no_cgroup(tmp_path):
    """macOS, or a sandbox without /proc: no limit, and RAM from the OS's page counts."""
    assert cgroup_memory(tmp_path) is None
    budget = memory_budget(root=tmp_path)
    assert budget.cgroup is None and budget.budget_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- what else bounds the budget ---

def test_max_memory_is_the_budget_and_the_measured_one_is_kept(tmp_path):
    root = v1_host(tmp_path, "/g", {"g": (2 * GIB, 0, 0)})
    budget = memory_budget(8 * 10**9, root=root)
    assert (budget.budget_bytes, budget.source, budget.requested_bytes) == (8 * 10**9, "--max-memory", 8 * 10**9)
    assert budget.measured_bytes == 2 * GIB


def test_metal_working_set_and_cuda_vram(tmp_path):
    write(tmp_path, {"proc/meminfo": MEMINFO})
    metal = memory_budget(root=tmp_path, device_kind="unified", device_bytes=10 * GIB)
    assert (metal.budget_bytes, metal.source) == (10 * GIB, "GPU working set")
    # CUDA: weights live in VRAM, whatever host RAM is free
    cuda = memory_budget(root=tmp_path, device_kind="vram", device_bytes=80 * GIB)
    assert (cuda.budget_bytes, cuda.source, cuda.available_ram_bytes) == (80 * GIB, "VRAM", AVAILABLE)


def test_vm_stat_output():
    """``vm_stat`` as macOS 14 prints it on an Apple Silicon Mac (16 KiB pages)."""
    out = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3000.
Pages active:                            400000.
Pages inactive:                          200000.
Pages speculative:                         1000.
Pages throttled:                              0.
Pages wired down:                        150000.
Pages purgeable:                            500.
"Translation faults":                 123456789.
Pages copy-on-write:                    5000000.
"""
    assert vm_stat_available(out) == (3000 + 200000 + 1000) * 16384
    assert vm_stat_available("garbage") is None


# --- a real cgroup (v1, as root) ---

def _own_v1_memory_dir() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return base / path.lstrip("/")
    return None


def test_real_v1_cgroup_limit_is_seen_by_a_process_inside_it():
    parent = _own_v1_memory_dir() if Path("/proc/self/cgroup").exists() else None
    if os.geteuid() != 0 or parent is None or not (parent / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy (the fake-tree tests cover the logic)")
    group = parent / f"edge-llm-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text("700M")
        code = ("from edge_llm.machine.memory import process_budget; b = process_budget(); "
                "print(b.cgroup.limit_bytes, b.cgroup.room_bytes, b.budget_bytes, b.source)")
        out = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable,
                              code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
        assert out.returncode == 0, out.stderr
        limit, room, budget, source = out.stdout.split(maxsplit=3)
        assert int(limit) == 700 * 2**20
        # the interpreter and MLX are already in the group's usage: some room is spent, most is left
        assert 400 * 2**20 < int(room) < 700 * 2**20
        # what the process itself holds is its own: the budget is the room plus that, never past the limit
        assert source.strip() == "cgroup limit" and int(room) < int(budget) <= int(limit)
    finally:
        group.rmdir()
