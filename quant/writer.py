"""Writing a checkpoint folder safely: streamed safetensors shards and an all-or-nothing destination.

``ShardWriter`` knows every tensor's name, dtype and shape before any data exists (the plan), so it
writes each shard's header first and then each tensor's bytes straight to its offset as soon as it is
computed: memory never holds more than the tensor at hand, whatever the shard size. The layout is the
safetensors format (8-byte little-endian header length, JSON header padded to 8 bytes, raw
little-endian data), read back by ``mx.load``, the ``safetensors`` package and mlx-lm.

``AtomicFolder`` builds the output in a hidden temporary folder beside the destination and renames
it into place only when complete; any failure (an exception, Ctrl-C, a full disk) removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from edge_llm.checkpoint import DTYPE_BYTES

from .plan import MX_NAMES, PlannedTensor

INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"


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
    after the new one is complete.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
        self.tmp: Path | None = None
        self._created: Path | None = None

    def __enter__(self) -> Path:
        parent = self.out.parent
        missing = parent
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        if not parent.exists():
            parent.mkdir(parents=True)
            self._created = missing
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp's 0700 is for secrets, not model folders
        except BaseException:
            self._cleanup()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
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
        old = None
        if self.out.exists() or self.out.is_symlink():
            if not self.force:
                raise FileExistsError(self.out)
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
