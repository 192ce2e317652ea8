"""Read bandwidth of the disk a model lives on, measured once per filesystem and remembered.

A streamed MoE decodes as fast as the disk delivers the experts the bank misses, so the figure that
predicts it is cold random reads of expert-sized blocks (a few MiB) with several in flight, the way the
expert streamer reads: positional reads from a small thread pool. We measure that and, for reference, one
reader going front to back. Cold without root: ``posix_fadvise(DONTNEED)`` drops the probed range from
the page cache before each phase (clean pages nobody maps; macOS has no fadvise and gets ``F_NOCACHE``
instead). The probe reads the largest file under the given path (a model shard) or, when that is too
small, a temporary file written beside it and removed after. Figures are stored with the memory bandwidth
(``bandwidth.remember_figures``) under ``disk:MAJOR:MINOR:sequential`` / ``...:random`` for the
filesystem's device, which the store's older readers keep as plain numbers.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .bandwidth import remember_figures, stored_figures

log = logging.getLogger(__name__)

MIB = 1 << 20
PROBE_BYTES = 256 * MIB  # ~40 ms on a PCIe 4 NVMe, ~1 s on a cloud disk
BLOCK_BYTES = 4 * MIB  # one expert projection: Qwen3-30B-A3B 4-bit ~1 MiB, DeepSeek-V3 ~8 MiB
SEQUENTIAL_BLOCK_BYTES = 8 * MIB
THREADS = 4
MAX_SECONDS = 3.0  # per phase: a slow disk is measured on what it read by then
_WRITE_CHUNK = 16 * MIB


@dataclass(frozen=True)
class DiskBandwidth:
    device: str  # "disk:MAJOR:MINOR" of the filesystem
    sequential: float  # bytes/s, one reader front to back
    random: float  # bytes/s, BLOCK_BYTES at random offsets, THREADS in flight
    cold: bool = True  # the page cache was bypassed or emptied for the probed range (not a cache's speed)


def device_key(path: str | os.PathLike[str]) -> str:
    """The store key of the filesystem ``path`` is on."""
    dev = os.stat(path).st_dev
    return f"disk:{os.major(dev)}:{os.minor(dev)}"


def evict(fd: int, offset: int, length: int) -> bool:
    """Drops the range from the page cache (clean pages no process maps); False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True


def _no_cache(fd: int) -> bool:
    """macOS: reads through this descriptor bypass the unified buffer cache."""
    import fcntl

    flag = getattr(fcntl, "F_NOCACHE", None)
    if flag is None:
        return False
    try:
        fcntl.fcntl(fd, flag, 1)
    except OSError:
        return False
    return True


def _hint(fd: int, offset: int, length: int, advice: str) -> None:
    """The access pattern to come, for the kernel's read-ahead (it holds for the open file, so it is reset)."""
    if hasattr(os, advice):
        os.posix_fadvise(fd, offset, length, getattr(os, advice))


def _read_blocks(fd: int, offsets: list[int], block: int, deadline: float) -> int:
    buf = bytearray(block)
    done = 0
    for off in offsets:
        if time.perf_counter() > deadline:
            break
        done += os.preadv(fd, [buf], off) if hasattr(os, "preadv") else len(os.pread(fd, block, off))
    return done


def sequential_read(fd: int, offset: int, length: int, block: int = SEQUENTIAL_BLOCK_BYTES,
                    max_seconds: float = MAX_SECONDS) -> float:
    """Bytes/s of one reader going through the range in order."""
    _hint(fd, offset, length, "POSIX_FADV_SEQUENTIAL")
    start = time.perf_counter()
    done = _read_blocks(fd, list(range(offset, offset + length, block)), block, start + max_seconds)
    return done / max(time.perf_counter() - start, 1e-9)


def random_read(fd: int, offset: int, length: int, block: int = BLOCK_BYTES, threads: int = THREADS,
                max_seconds: float = MAX_SECONDS, seed: int = 0) -> float:
    """Bytes/s of ``threads`` readers taking the range's blocks in a random order, each block once."""
    _hint(fd, offset, length, "POSIX_FADV_RANDOM")  # no read-ahead past a block: the streamer reads one expert
    slots = list(range(offset, offset + length - block + 1, block))
    random.Random(seed).shuffle(slots)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(lambda i: _read_blocks(fd, slots[i::threads], block, start + max_seconds),
                            range(threads)))
    return done / max(time.perf_counter() - start, 1e-9)


def _size(f: Path) -> int:
    try:
        return f.stat().st_size if f.is_file() else -1
    except OSError:  # gone meanwhile, or a dangling link
        return -1


def _largest_file(path: Path) -> Path | None:
    """``path`` itself, or the largest file in the folder (a checkpoint's shards sit at its top)."""
    if path.is_file():
        return path
    try:
        entries = list(path.iterdir()) if path.is_dir() else []
    except OSError:
        return None
    best = max(entries, key=_size, default=None)
    return best if best is not None and _size(best) >= 0 else None


@contextmanager
def _open_existing(found: Path, length: int) -> Iterator[tuple[int, int, bool]]:
    fd = os.open(found.resolve(), os.O_RDONLY)
    try:
        yield fd, length, _no_cache(fd) or evict(fd, 0, length)
    finally:
        os.close(fd)


@contextmanager
def _temporary(folder: Path, nbytes: int) -> Iterator[tuple[int, int, bool]]:
    fd, tmp = tempfile.mkstemp(prefix=".edge-llm-disk-probe-", dir=folder)
    try:
        nocache = _no_cache(fd)
        chunk = os.urandom(_WRITE_CHUNK)  # incompressible: a compressing filesystem must not shortcut it
        for off in range(0, nbytes, _WRITE_CHUNK):
            os.pwrite(fd, chunk[: min(_WRITE_CHUNK, nbytes - off)], off)
        os.fsync(fd)  # only clean pages can be evicted
        yield fd, nbytes, evict(fd, 0, nbytes) or nocache
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


def probe_file(path: str | os.PathLike[str], nbytes: int) -> AbstractContextManager[tuple[int, int, bool]]:
    """(fd, length, cold) of a file on ``path``'s filesystem to read: the largest file there when it holds
    ``nbytes``, else a temporary one of ``nbytes`` written in the folder (removed afterwards), else, in a
    folder we may not write, the largest file there as it is. OSError when there is nothing to read."""
    path = Path(path)
    found = _largest_file(path)
    size = _size(found) if found is not None else 0
    if size >= nbytes:
        return _open_existing(found, nbytes)
    folder = path if path.is_dir() else path.parent
    if os.access(folder, os.W_OK) or size < MIB:
        return _temporary(folder, nbytes)
    return _open_existing(found, size)


def measure_disk_bandwidth(path: str | os.PathLike[str], nbytes: int = PROBE_BYTES, block: int = BLOCK_BYTES,
                           threads: int = THREADS, max_seconds: float = MAX_SECONDS) -> DiskBandwidth:
    """Sequential and random read bandwidth of the filesystem ``path`` is on, cold where the OS lets us."""
    with probe_file(path, nbytes) as (fd, length, cold):
        seq = sequential_read(fd, 0, length, max_seconds=max_seconds)
        # macOS has no fadvise: its reads bypass the cache (F_NOCACHE) instead
        cold = cold and (evict(fd, 0, length) or not hasattr(os, "posix_fadvise"))
        rnd = random_read(fd, 0, length, block, threads, max_seconds)
    result = DiskBandwidth(device_key(path), seq, rnd, cold)
    log.info("disk %s: sequential %.0f MB/s, random %d KiB x%d %.0f MB/s%s", result.device, seq / 1e6,
             block // 1024, threads, rnd / 1e6, "" if cold else " (page cache not bypassed)")
    return result


def remembered_disk_bandwidth(path: str | os.PathLike[str]) -> DiskBandwidth | None:
    """The stored figures for ``path``'s filesystem, or None when never measured (or the store is damaged)."""
    key = device_key(path)
    figures = stored_figures()
    seq, rnd = figures.get(f"{key}:sequential"), figures.get(f"{key}:random")
    return DiskBandwidth(key, seq, rnd) if seq is not None and rnd is not None else None


def disk_bandwidth(path: str | os.PathLike[str], refresh: bool = False, nbytes: int = PROBE_BYTES) -> DiskBandwidth:
    """The remembered figures of ``path``'s filesystem, measuring (and storing cold ones) first when needed."""
    if not refresh and (known := remembered_disk_bandwidth(path)) is not None:
        return known
    found = measure_disk_bandwidth(path, nbytes)
    if found.cold:  # a page-cache figure would promise a speed the disk does not have
        remember_figures({f"{found.device}:sequential": found.sequential, f"{found.device}:random": found.random})
    return found
