"""How much memory this process may really use, ``--max-memory SIZE`` read as bytes, and byte sizes written
for people (``human_bytes``: the one formatter of sizes, in messages and the CLI's tables alike).

The budget is the tightest of: RAM available now (Linux ``MemAvailable``: free memory plus the page cache
and slabs the kernel can reclaim; macOS: free, inactive and speculative pages as ``vm_stat`` counts them,
the figure psutil uses plus the read-ahead cache), the room left under this process's cgroup limit
(``cgroup.py``: a container's limit), and on Apple's GPU the Metal working set (``backend.detect``).
On CUDA the model lives in VRAM, so the device's memory is the budget and host RAM only is reported.
What this process already holds counts as its own: the estimator's footprint is the whole process (its
base included), so the process's private memory is added back to what the system and the cgroup have left
(its file-backed pages already count as reclaimable page cache there).
An explicit ``--max-memory`` is the budget as given: the measured figures stay in the result so the
caller can warn when it exceeds them.

Every OS file is read under ``root`` so tests can use fake trees.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from .cgroup import CgroupMemory, cgroup_memory

# Decimal units as disks and the Hub count (and as edge-llm prints sizes); binary ones as RAM is sold.
_POWERS = {p: i + 1 for i, p in enumerate("KMGT")}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")
SIZE_HELP = ("Memory budget, e.g. 8GB, 16G, 512MiB, 1.5TB or plain bytes (KB/MB/GB/TB and K/M/G/T are powers "
             "of 1000; KiB/MiB/GiB/TiB powers of 1024). Default: the available RAM, within the cgroup limit.")


def _unit(name: str) -> int | None:
    """Bytes per ``name``: B or nothing, K/KB ... T/TB (powers of 1000), Ki/KiB ... Ti/TiB (of 1024)."""
    name = name.upper()
    if name in ("", "B"):
        return 1
    power = _POWERS.get(name[:1])
    if power is None:
        return None
    if name[1:] in ("", "B"):
        return 1000**power
    return 1024**power if name[1:] in ("I", "IB") else None


def parse_size(text: str) -> int:
    """``"8GB"`` -> 8_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1.5TB"``, ``"4096"``; ValueError otherwise."""
    m = _SIZE.fullmatch(text)
    unit = _unit(m.group(2)) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a size: write a number and a unit, e.g. 8GB, 16G, 512MiB or 1.5TB")
    value = int(Decimal(m.group(1)) * unit)  # Decimal: "1.1GB" is 1_100_000_000 exactly
    if value < 1:
        raise ValueError(f"{text!r} is not a size: it must be at least one byte")
    return value


def human_bytes(n: float) -> str:
    """``512 B``, ``9.87 MB``, ``45.6 GB`` (decimal units, as ``parse_size`` reads them): whole bytes, else two
    decimals under 10 and one above."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable: the last unit returns")


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def meminfo_available(text: str) -> int | None:
    """``MemAvailable`` from the text of /proc/meminfo, in bytes."""
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def vm_stat_available(text: str) -> int | None:
    """Free + inactive + speculative pages from macOS ``vm_stat`` output, in bytes."""
    page = re.search(r"page size of (\d+) bytes", text)
    counts = dict(re.findall(r'^"?Pages (free|inactive|speculative)"?:\s+(\d+)\.', text, re.MULTILINE))
    if page is None or "free" not in counts:
        return None
    return int(page.group(1)) * sum(int(v) for v in counts.values())


def available_ram_bytes(root: Path = Path("/")) -> int:
    """RAM a new allocation can have now without swapping; total RAM where the OS does not say."""
    if platform.system() == "Darwin" and root == Path("/"):
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        found = vm_stat_available(out)
    else:
        try:
            found = meminfo_available((root / "proc/meminfo").read_text())
        except (OSError, UnicodeDecodeError):
            found = None
    return found if found is not None else total_ram_bytes()


def own_anonymous_bytes(root: Path = Path("/")) -> int:
    """This process's private resident memory now (Linux ``/proc/self/statm``: resident less file-backed shared
    pages, which the page cache and MemAvailable already count as reclaimable); 0 where it cannot be read."""
    try:
        fields = (root / "proc/self/statm").read_text().split()
        pages = int(fields[1]) - int(fields[2])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return 0
    return max(0, pages) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryBudget:
    """What a model may take in this process, and each figure it was the tightest of."""

    budget_bytes: int
    source: str  # what set it: "--max-memory", "available RAM", "cgroup limit", "GPU working set" or "VRAM"
    available_ram_bytes: int
    cgroup: CgroupMemory | None  # None: no cgroup limit over this process
    device_bytes: int | None  # the Metal working set or the VRAM; None on the CPU
    measured_bytes: int  # the tightest of the figures above: the budget without --max-memory
    requested_bytes: int | None = None  # --max-memory


def memory_budget(max_memory: int | None = None, *, device_kind: str = "ram", device_bytes: int | None = None,
                  root: Path = Path("/")) -> MemoryBudget:
    """The memory budget for ``device_kind`` ("ram", "unified" or "vram", as ``BackendInfo.memory_kind``)."""
    own = own_anonymous_bytes(root)
    ram = available_ram_bytes(root) + own
    group = cgroup_memory(root)
    figures = [(ram, "available RAM")]
    if group:
        figures.append((min(group.limit_bytes, group.room_bytes + min(own, group.usage_bytes)), "cgroup limit"))
    if device_kind == "unified" and device_bytes:
        figures.append((device_bytes, "GPU working set"))
    elif device_kind == "vram" and device_bytes:
        figures = [(device_bytes, "VRAM")]
    measured, source = min(figures)
    budget, source = (max_memory, "--max-memory") if max_memory is not None else (measured, source)
    return MemoryBudget(budget, source, ram, group, device_bytes if device_kind != "ram" else None, measured,
                        max_memory)


def process_budget(max_memory: int | None = None) -> MemoryBudget:
    """The budget on the backend MLX runs on here (imports MLX to ask for the GPU's memory)."""
    from .backend import detect

    info = detect()
    return memory_budget(max_memory, device_kind=info.memory_kind,
                         device_bytes=info.memory_bytes if info.memory_kind != "ram" else None)
