"""Does ``edge_llm.machine.disk`` measure the disk, not the page cache? Read bandwidth of the same file
warm (no eviction), cold by ``posix_fadvise(DONTNEED)`` (what the library does, no root) and cold by
``echo 3 > /proc/sys/vm/drop_caches`` (root only; the strong form), sequential and random, over block
sizes and threads in flight. Medians of ``--repeats``.

    python -m benchmarks.disk_bandwidth [PATH] [--mib 1024] [--repeats 3]

PATH: a file to read, or a folder to write a temporary file in (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable

from edge_llm.machine.disk import evict, probe_file, random_read, sequential_read

MIB = 1 << 20


def drop_caches(fd: int, offset: int, length: int) -> bool:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    return True


def warmed(fd: int, offset: int, length: int) -> bool:
    sequential_read(fd, offset, length, max_seconds=60)  # in the page cache, whatever ran before
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=tempfile.gettempdir())
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modes: dict[str, Callable[[int, int, int], bool]] = {"warm": warmed, "fadvise": evict}
    if os.geteuid() == 0 and os.path.exists("/proc/sys/vm/drop_caches"):
        modes["drop_caches"] = drop_caches
    probes = [("sequential 8 MiB x1", lambda fd, n: sequential_read(fd, 0, n, max_seconds=30))]
    probes += [(f"random {b} MiB x{t}", lambda fd, n, b=b, t=t: random_read(fd, 0, n, b * MIB, t, max_seconds=30))
               for b in (1, 4, 8) for t in (1, 4, 8)]
    nbytes = args.mib * MIB
    print(f"| probe | {' | '.join(modes)} |  (GB/s, median of {args.repeats}, {args.mib} MiB)")
    print("|---|" + "---|" * len(modes))
    with probe_file(args.path, nbytes) as (fd, length, _):
        for name, probe in probes:
            cells = []
            for mode in modes.values():
                runs = []
                for _ in range(args.repeats):
                    mode(fd, 0, length)
                    runs.append(probe(fd, length))
                cells.append(f"{statistics.median(runs) / 1e9:.2f}")
            print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
