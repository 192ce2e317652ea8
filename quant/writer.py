"""Writing a checkpoint folder safely: streamed safetensors shards and an all-or-nothing destination.

``ShardWriter`` knows every tensor's name, dtype and shape before any data exists (the plan), so it
writes each shard's header first and then each tensor's bytes straight to its offset as soon as it is
computed: memory never holds more than the tensor at hand, whatever the shard size. The layout is the
safetensors format (8-byte little-endian header length, JSON header padded to 8 bytes, raw
little-endian data), read back by ``mx.load``, the ``safetensors`` package and mlx-lm.

``AtomicFolder`` builds the output in a hidden temporary folder beside the destination and renames
it into place only when complete; any failure (an exception, Ctrl-C, a full disk) removes it. Each
hidden folder records its owner (pid, process start time, host), so a later run removes those that a
killed run (SIGKILL, a power cut) could not, and only those.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from edge_llm.formats.tensors import DTYPE_BYTES

from .plan import MX_NAMES, PlannedTensor

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
OWNER_FILE = ".edge-llm-owner"  # in a hidden partial/old folder: who made it (JSON)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class _Slot:
    file: int  # index into the shard list
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def assign_shards(tensors: list[PlannedTensor], max_bytes: int = MAX_SHARD_BYTES) -> list[list[PlannedTensor]]:
    """Splits tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[PlannedTensor]) -> tuple[bytes, list[tuple[int, int]]]:
    entries: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    spans, pos = [], 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        spans.append((pos, t.nbytes))
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, spans


class ShardWriter:
    """Writes the planned tensors of ``shards`` into ``folder``; ``write`` may come in any order."""

    def __init__(self, folder: Path, shards: list[list[PlannedTensor]]):
        self.folder = folder
        self.names = shard_names(len(shards))
        self.slots: dict[str, _Slot] = {}
        self.sizes: list[int] = []
        self._fds: list[int] = []
        for i, tensors in enumerate(shards):
            header, spans = _header(tensors)
            fd = os.open(folder / self.names[i], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            os.write(fd, header)
            for t, (start, nbytes) in zip(tensors, spans, strict=True):
                self.slots[t.name] = _Slot(i, len(header) + start, nbytes, t.dtype, t.shape)
            self.sizes.append(len(header) + sum(n for _, n in spans))
        self.pending = set(self.slots)

    def write(self, name: str, array: mx.array) -> int:
        """Writes one tensor (its planned dtype and shape are checked); returns the bytes written."""
        slot = self.slots[name]
        if MX_NAMES.get(slot.dtype) != str(array.dtype).removeprefix("mlx.core.") or tuple(array.shape) != slot.shape:
            raise AssertionError(f"{name}: made {array.dtype}{tuple(array.shape)}, planned {slot.dtype}{slot.shape}")
        if array.dtype == mx.bfloat16:
            array = array.view(mx.uint16)  # the buffer protocol has no bfloat16 format
        array = mx.contiguous(array)
        mx.eval(array)
        data = memoryview(array).cast("B")
        assert data.nbytes == slot.nbytes == array.size * DTYPE_BYTES[slot.dtype]
        fd, offset, done = self._fds[slot.file], slot.offset, 0
        while done < data.nbytes:
            done += os.pwrite(fd, data[done:], offset + done)
        self.pending.discard(name)
        return data.nbytes

    def close(self, complete: bool = True) -> None:
        """Closes the files; with ``complete``, checks every tensor was written and flushes to disk."""
        try:
            if complete:
                if self.pending:
                    raise AssertionError(f"tensors planned but never written: {sorted(self.pending)[:3]}")
                for fd, size in zip(self._fds, self.sizes, strict=True):
                    os.ftruncate(fd, size)  # no-op unless the last tensor was written out of order
                    os.fsync(fd)
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds = []

    def write_index(self, total_parameters: int) -> None:
        weight_map = {name: self.names[slot.file] for name, slot in sorted(self.slots.items())}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.slots.values()),
                              "total_parameters": total_parameters},
                 "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class AtomicFolder:
    """``with AtomicFolder(out, force) as tmp:`` fill ``tmp``; on success it becomes ``out``.

    On any exception, KeyboardInterrupt included, the temporary folder (and any parent folders this
    created) is removed and ``out`` is untouched. With ``force`` an existing ``out`` is replaced only
    after the new one is complete. Stop signals wait while folders are created, swapped or removed, so
    a second Ctrl-C or a SIGTERM never cuts those steps in half. Entering first removes the hidden
    folders of dead runs in the same parent.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
        self.tmp: Path | None = None
        self._created: Path | None = None

    def __enter__(self) -> Path:
        parent = self.out.parent
        if parent.is_dir():
            remove_stale(parent)
        with signals_deferred():
            missing = parent
            while not missing.parent.exists() and missing.parent != missing:
                missing = missing.parent
            if not parent.exists():
                parent.mkdir(parents=True)
                self._created = missing
            try:
                self.tmp = _owned_folder(parent, f".{self.out.name}.partial-", self.out.name)
                os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp's 0700 is for secrets, not model folders
            except BaseException:
                self._cleanup()
                raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        with signals_deferred():
            if exc_type is None:
                try:
                    self._commit()
                    return False
                except BaseException:
                    self._cleanup()
                    raise
            self._cleanup()
        return False

    def _commit(self) -> None:
        assert self.tmp is not None
        (self.tmp / OWNER_FILE).unlink()
        old = None
        if self.out.exists() or self.out.is_symlink():
            if not self.force:
                raise FileExistsError(self.out)
            old = _owned_folder(self.out.parent, f".{self.out.name}.old-", self.out.name)
            os.replace(self.out, old / "previous")
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old / "previous", self.out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        self.tmp = None
        if old is not None:
            _remove(old)

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT, SIGTERM and SIGHUP until the block is done, then delivers the first one that came.

    Python runs signal handlers in the main thread only, so elsewhere this holds nothing (nor needs to: a
    handler there cannot raise into the block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:  # None: set outside Python, cannot be restored
            previous[signum] = signal.signal(signum, lambda n, _frame: pending.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


def _owned_folder(parent: Path, prefix: str, out_name: str) -> Path:
    """A new hidden folder in ``parent`` that records its owner, so ``remove_stale`` can tell when it is orphaned."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    owner = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname(), "out": out_name}
    try:
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    except BaseException:  # a full disk: no folder without its record
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's run on a shared disk: we cannot tell, so it stays
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


def remove_stale(parent: Path) -> list[Path]:
    """Removes the hidden partial folders of dead runs in ``parent`` (and their leftover previous outputs once
    the new output is in place); returns what it removed. A folder without our owner record is never touched."""
    removed = []
    for folder in sorted(parent.glob(".*.partial-*")) + sorted(parent.glob(".*.old-*")):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):  # not ours, or its owner is still writing the record
            continue
        if not isinstance(owner, dict) or _owner_alive(owner):
            continue
        out = parent / Path(str(owner.get("out"))).name
        if ".old-" in folder.name and not out.exists():
            log.warning("%s holds the previous %s of a run that was killed; move it back or remove it",
                        folder / "previous", out)
            continue
        _remove_owned(folder)
        removed.append(folder)
        log.info("removed %s, left by a run that was killed (pid %s)", folder, owner.get("pid"))
    return removed


def _remove_owned(folder: Path) -> None:
    """Removes an owned folder, its owner record last: cut short, what is left is still known to be removable."""
    for child in folder.iterdir():
        if child.name != OWNER_FILE:
            _remove(child)
    _remove(folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
