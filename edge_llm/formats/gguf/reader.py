"""The GGUF container: metadata and tensor directory, read with ``struct`` from a memory map.

Reference: the GGUF spec (ggml-org/ggml ``docs/gguf.md``) and llama.cpp's ``gguf.c``. Versions 2 and 3,
little-endian. Reading the header is cheap (no tensor data is touched) and checks what can be checked
without reading the data: the magic, the version, sane counts, known tensor types and that every
tensor lies inside the file (a truncated download is caught here, with one line saying so).

The header is input from strangers, so every size it declares is bounded before it is believed
(``limits``): a string or array cannot be longer than the bytes left in the file, arrays nest at most
``MAX_NESTING`` deep, all arrays together hold at most ``MAX_METADATA_ITEMS`` items, tensors are at most
``MAX_TENSORS`` with 32-bit dimensions, and no name (metadata key or tensor) appears twice. Reading any
file therefore costs memory in proportion to its size, and a hostile one ends in one CheckpointError.

Shapes: GGUF lists dimensions innermost first (``ne[0]`` is the contiguous one); ``GGUFTensor.shape``
is numpy/MLX order, outermost first, i.e. ``[out_features, in_features]`` for a linear weight.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ...errors import CheckpointError
from ...limits import MAX_DIM, MAX_METADATA_ITEMS, MAX_NESTING, MAX_TENSORS

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml type id -> (name, values per block, bytes per block); from ggml.h / ggml.c's type_traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip



class ValueType(IntEnum):
    """Metadata value types (the spec's ``gguf_metadata_value_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


V = ValueType
# struct format of each scalar type, and its little-endian numpy dtype for arrays read in one go
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
            V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_NUMPY = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
          V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8"}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # outermost first (numpy order)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(repr=False)
    value_types: frozenset[ValueType] = frozenset()  # metadata value types present (array items included)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, key: str, default: Any = None) -> Any:
        """``{general.architecture}.{key}``: llama.cpp prefixes model facts with the architecture."""
        return self.metadata.get(f"{self.metadata.get('general.architecture')}.{key}", default)

    def typed(self, key: str, kinds: type | tuple[type, ...], what: str, default: Any = None) -> Any:
        """``metadata[key]`` (``default`` when absent) if it is one of ``kinds``; a bool is no number.
        Anything else is a corrupt file: CheckpointError naming the key, its value and what it should be."""
        value = self.metadata.get(key)
        if value is None:
            return default
        if not _is_kind(value, kinds):
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is {_shown(value)}, expected {what}; "
                                  "re-convert the file with llama.cpp")  # fmt: skip
        return value

    def typed_list(self, key: str, kinds: type | tuple[type, ...], what: str) -> list | None:
        """``metadata[key]`` (None when absent) if it is a list of ``kinds``; else CheckpointError."""
        value = self.typed(key, list, f"a list of {what}")
        if value is not None:
            bad = next((i for i, item in enumerate(value) if not _is_kind(item, kinds)), None)
            if bad is not None:
                raise CheckpointError(f"{self.path}: GGUF metadata {key}[{bad}] is {_shown(value[bad])}, expected "
                                      f"{what}; re-convert the file with llama.cpp")  # fmt: skip
        return value

    def read(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's raw bytes as a uint8 array (a copy; the file is not kept open)."""
        with self.path.open("rb") as f:
            f.seek(tensor.offset)
            data = f.read(tensor.nbytes)
        if len(data) != tensor.nbytes:
            raise CheckpointError(f"{self.path}: truncated inside tensor {tensor.name!r}; re-download the file")
        return np.frombuffer(data, dtype=np.uint8)


def _is_kind(value: Any, kinds: type | tuple[type, ...]) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, list) else f"a list of {len(value)}"
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({type(value).__name__})"


class _Cursor:
    """Sequential little-endian reads of a file's header, buffered in growing chunks.

    Running off the end of the file means a truncated header. (No mmap: an error raised while a
    memoryview of the map is alive would keep it exported and make closing the map fail.)
    """

    CHUNK = 1 << 20

    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path
        self.buf, self.pos = bytearray(), 0
        self.items = 0  # metadata array items read so far
        self.types: set[ValueType] = set()

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:  # checked first: a declared length of 2^40 must not be allocated
            raise CheckpointError(f"{self.path}: truncated GGUF header ({self.size} bytes); re-download the file")
        while self.pos + n > len(self.buf):
            chunk = self.f.read(max(n, len(self.buf), self.CHUNK))
            if not chunk:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF header ({self.size} bytes); re-download the file"
                )
            self.buf += chunk
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("Q")))
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int, depth: int = 0) -> Any:
        try:
            kind = ValueType(type_id)
        except ValueError:
            raise CheckpointError(f"{self.path}: corrupt GGUF metadata (unknown value type {type_id})") from None
        self.types.add(kind)
        if kind == ValueType.STRING:
            return self.string()
        if kind == ValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise CheckpointError(f"{self.path}: corrupt GGUF metadata (arrays nested over {MAX_NESTING} deep)")
            item_type, count = self.unpack("I"), self.unpack("Q")
            self.items += count
            if count > self.size - self.pos or self.items > MAX_METADATA_ITEMS:
                # each item takes at least one byte, and no real file comes near the total
                raise CheckpointError(f"{self.path}: corrupt GGUF metadata (array of {count:,} items)")
            if item_type in _NUMPY:
                self.types.add(ValueType(item_type))
                dtype = np.dtype(_NUMPY[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_type, depth + 1) for _ in range(count)]
        return self.unpack(_SCALARS[kind])


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and tensor directory of a GGUF file; raises CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _parse(_Cursor(f, size, path), path, size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such GGUF file") from None


def _parse(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    if bytes(cur.take(4)) != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no 'GGUF' magic at the start)")
    version = cur.unpack("I")
    if version not in (2, 3) and version.to_bytes(4, "little") in (b"\0\0\0\2", b"\0\0\0\3"):
        # llama.cpp's --bigendian writes the magic as is and every number after it byte-swapped
        raise CheckpointError(f"{path}: a big-endian (byte-swapped) GGUF file; edge-llm reads little-endian GGUF "
                              "files: convert the model again without --bigendian")  # fmt: skip
    if version not in (2, 3):
        raise CheckpointError(
            f"{path}: GGUF version {version} is not supported (2 and 3 are); re-convert with a recent llama.cpp"
        )
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > min(size, MAX_TENSORS) or n_kv > min(size, MAX_METADATA_ITEMS):
        raise CheckpointError(f"{path}: corrupt GGUF header ({n_tensors:,} tensors, {n_kv:,} metadata keys)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:
            raise CheckpointError(f"{path}: corrupt GGUF metadata (key {key[:80]!r} appears twice)")
        metadata[key] = cur.value(cur.unpack("I"))
    entries, names = [], set()
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: corrupt GGUF tensor {name[:80]!r} ({n_dims} dimensions)")
        if name in names:
            raise CheckpointError(f"{path}: corrupt GGUF file (tensor {name[:80]!r} appears twice); re-download it")
        names.add(name)
        dims = [cur.unpack("Q") for _ in range(n_dims)]
        if any(d > MAX_DIM for d in dims):
            raise CheckpointError(f"{path}: corrupt GGUF tensor {name[:80]!r} (dimensions {dims})")
        entries.append((name, dims, cur.unpack("I"), cur.unpack("Q")))
    header_end = cur.pos
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: corrupt GGUF header (general.alignment = {alignment!r})")
    data_start = -(-header_end // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in entries:
        if type_id not in GGML_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown ggml type {type_id}; this file needs a newer reader"
            )
        type_name, block, block_bytes = GGML_TYPES[type_id]
        count = math.prod(dims)
        if dims and dims[0] % block:
            raise CheckpointError(f"{path}: corrupt GGUF tensor {name!r} ({type_name} row of {dims[0]} values)")
        tensors[name] = GGUFTensor(name, type_id, tuple(reversed(dims)), data_start + offset,
                                   count // block * block_bytes)  # fmt: skip
    end = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
    if end > size:
        raise CheckpointError(
            f"{path}: truncated GGUF file ({size} bytes, its tensors need {end}); re-download it"
        )
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, stop, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < stop:
            raise CheckpointError(f"{path}: corrupt GGUF file (tensors {first[:80]!r} and {second[:80]!r} share "
                                  "bytes); re-download it")  # fmt: skip
    return GGUFFile(path, version, metadata, tensors, frozenset(cur.types))
