"""Common machines for ``edge-llm estimate MODEL --devices``: memory, the share of it a model may use,
memory bandwidth and disk read bandwidth, as their makers publish them, plus this machine as measured.

Units: memory as sold is binary (Apple's "16GB" and NVIDIA's "24 GB" are GiB: nvidia-smi shows an A100
80GB as 81920 MiB); bandwidths are decimal (GB/s = 1e9 bytes/s), as the data sheets count them. Memory
bandwidth is the peak the maker quotes (measured decode speeds reach ~60-80% of it), so every speed
derived from these figures is a ceiling.

What a model may use (``usable_bytes``), an assumption per kind of memory, stated once here:
- Apple unified memory: the Metal working set macOS recommends by default, 2/3 of RAM up to 32 GiB
  and 3/4 above (llama.cpp's logs of ``recommendedMaxWorkingSetSize``: 16 GiB -> 10922.67 MiB
  (abetlen/llama-cpp-python#687); 64 GiB -> ~48 GiB (ggml-org/llama.cpp#1870)); ``sudo sysctl
  iogpu.wired_limit_mb=N`` raises it.
- NVIDIA VRAM: all of it less 512 MiB for the CUDA context and driver.
- PC RAM and DGX Spark: all of it less 2 GiB (4 GiB on the Spark) for the OS and desktop.

Disk bandwidth (for streamed experts) is a sequential-read figure: Apple publishes none for its SSDs; ~3
GB/s on base chips (their 256/512 GB SSDs) and ~5 GB/s on Pro/Max/Ultra are typical published
measurements (Blackmagic Disk Speed Test reviews), so those are assumptions; a PCIe 4 NVMe reads ~7 GB/s
(Samsung 990 PRO data sheet: 7,450 MB/s), a PCIe 3 one ~3.5 GB/s (Samsung 970 EVO Plus: 3,500 MB/s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
GB = 10**9

APPLE_BASE_DISK = 3 * GB
APPLE_PRO_DISK = 5 * GB
PCIE3_NVME = 3.5 * GB
PCIE4_NVME = 7 * GB


@dataclass(frozen=True)
class Device:
    name: str
    family: str  # "apple", "nvidia", "pc" or "this"
    kind: str  # "unified", "vram" or "ram", as edge_llm.machine.backend.BackendInfo.memory_kind
    memory_bytes: int  # as sold
    usable_bytes: int  # what a model may take (see the module's docstring)
    bandwidth: float | None  # memory, bytes/s; None: this machine, never measured
    disk_bandwidth: float | None  # bytes/s read from the disk a model sits on; None: unknown


def metal_working_set(memory_bytes: int) -> int:
    """macOS's default GPU working set for a Mac with ``memory_bytes`` of unified memory."""
    return memory_bytes * 2 // 3 if memory_bytes <= 32 * GIB else memory_bytes * 3 // 4


def _apple(chip: str, gbps: float, sizes: tuple[int, ...], disk: float = APPLE_PRO_DISK) -> list[Device]:
    return [Device(f"Apple {chip} {gib}GB", "apple", "unified", gib * GIB, metal_working_set(gib * GIB), gbps * GB,
                   disk) for gib in sizes]


def _nvidia(name: str, gib: int, gbps: float, disk: float = PCIE4_NVME) -> Device:
    return Device(f"NVIDIA {name} {gib}GB", "nvidia", "vram", gib * GIB, gib * GIB - 512 * (1 << 20), gbps * GB, disk)


def _pc(name: str, gib: int, gbps: float, disk: float) -> Device:
    return Device(f"{name} {gib}GB", "pc", "ram", gib * GIB, (gib - 2) * GIB, gbps * GB, disk)


# Apple: unified memory configurations and memory bandwidth from Apple's tech specs of the Macs that carry
# each chip (support.apple.com/specs: MacBook Air/Pro, Mac mini, Mac Studio) and the chips' announcements
# (apple.com/newsroom: M1 Pro/Max 2021-10, M1 Ultra 2022-03, M2 2022-06, M2 Pro/Max 2023-01, M2 Ultra 2023-06,
# M3 family 2023-10, M4 2024-05, M4 Pro/Max 2024-10, M3 Ultra 2025-03, M5 2025-10). The lower-binned M3 Max
# (30-core GPU) and M4 Max (32-core GPU) have narrower memory buses, so they are separate rows.
APPLE = [
    *_apple("M1", 68.25, (8, 16), APPLE_BASE_DISK),
    *_apple("M1 Pro", 200, (16, 32)),
    *_apple("M1 Max", 400, (32, 64)),
    *_apple("M1 Ultra", 800, (64, 128)),
    *_apple("M2", 100, (8, 16, 24), APPLE_BASE_DISK),
    *_apple("M2 Pro", 200, (16, 32)),
    *_apple("M2 Max", 400, (32, 64, 96)),
    *_apple("M2 Ultra", 800, (64, 128, 192)),
    *_apple("M3", 100, (8, 16, 24), APPLE_BASE_DISK),
    *_apple("M3 Pro", 150, (18, 36)),
    *_apple("M3 Max 30-core GPU", 300, (36, 96)),
    *_apple("M3 Max 40-core GPU", 400, (48, 64, 128)),
    *_apple("M3 Ultra", 819, (96, 256, 512)),
    *_apple("M4", 120, (16, 24, 32), APPLE_BASE_DISK),
    *_apple("M4 Pro", 273, (24, 48, 64)),
    *_apple("M4 Max 32-core GPU", 410, (36,)),
    *_apple("M4 Max 40-core GPU", 546, (48, 64, 128)),
    *_apple("M5", 153, (16, 24, 32), APPLE_BASE_DISK),
]

# NVIDIA: memory and bandwidth from the product pages and data sheets (nvidia.com: GeForce RTX 3060 / 3090 /
# 4060 Ti / 4090 / 5090 specifications; RTX 6000 Ada, L4, L40S, A100, H100 and H200 data sheets; DGX Spark
# product page). A100 40GB: 1,555 GB/s; 80GB SXM: 2,039 GB/s. H100 SXM: 3.35 TB/s, PCIe: 2 TB/s.
NVIDIA = [
    _nvidia("GeForce RTX 3060", 12, 360),
    _nvidia("GeForce RTX 4060 Ti", 16, 288),
    _nvidia("GeForce RTX 3090", 24, 936),
    _nvidia("GeForce RTX 4090", 24, 1008),
    _nvidia("GeForce RTX 5090", 32, 1792),
    _nvidia("L4", 24, 300),
    _nvidia("RTX 6000 Ada", 48, 960),
    _nvidia("L40S", 48, 864),
    _nvidia("A100", 40, 1555),
    _nvidia("A100 SXM", 80, 2039),
    _nvidia("H100 PCIe", 80, 2000),
    _nvidia("H100 SXM", 80, 3350),
    _nvidia("H200", 141, 4800),
    # GB10: 128 GB LPDDR5x shared by CPU and GPU, like a Mac
    Device("NVIDIA DGX Spark 128GB", "nvidia", "unified", 128 * GIB, 124 * GIB, 273 * GB, PCIE4_NVME),
]

# PCs on MLX's CPU backend. Bandwidth: two 64-bit channels x transfer rate (JEDEC DDR4-3200: 2 x 8 B x 3.2 GT/s
# = 51.2 GB/s; DDR5-5600: 89.6 GB/s); laptops of the DDR4 years shipped PCIe 3 NVMe, DDR5 machines PCIe 4.
PCS = [
    _pc("PC laptop DDR4-3200", 8, 51.2, PCIE3_NVME),
    _pc("PC laptop DDR4-3200", 16, 51.2, PCIE3_NVME),
    _pc("PC desktop DDR5-5600", 32, 89.6, PCIE4_NVME),
    _pc("PC desktop DDR5-5600", 64, 89.6, PCIE4_NVME),
]

DEVICES: list[Device] = [*APPLE, *NVIDIA, *PCS]


def select_devices(names: str | None = None, devices: list[Device] = DEVICES) -> list[Device]:
    """Devices of the families (apple, nvidia, pc) or whose name contains any of the comma-separated ``names``
    (case-insensitive); all when None. ValueError when none matches."""
    if not names:
        return list(devices)
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    families = {d.family for d in devices}
    found = [d for d in devices if any(w == d.family if w in families else w in d.name.lower() for w in wanted)]
    if not found:
        raise ValueError(f"no device matches {names!r}: try a family (apple, nvidia, pc) or a part of a name "
                         "(m4, rtx 4090, h100)")
    return found


def this_machine(disk_path: Path | None = None, max_memory: int | None = None) -> Device:
    """This machine as measured: the memory budget (``edge_llm.machine.memory``), the remembered memory
    bandwidth and the remembered read bandwidth of ``disk_path``'s filesystem (None where never measured:
    ``edge-llm doctor`` measures them). Reads no disk and measures nothing."""
    from edge_llm.machine.backend import detect
    from edge_llm.machine.bandwidth import remembered_bandwidth
    from edge_llm.machine.disk import remembered_disk_bandwidth
    from edge_llm.machine.memory import process_budget

    info = detect()
    budget = process_budget(max_memory)
    disk = remembered_disk_bandwidth(disk_path) if disk_path is not None and disk_path.exists() else None
    return Device(f"this machine ({info.device_name})", "this", info.memory_kind, info.memory_bytes,
                  budget.budget_bytes, remembered_bandwidth(), disk.random if disk else None)
