"""A safetensors file's header, read and checked before MLX (or anything else) parses it.

Format (huggingface/safetensors ``docs``, and its Rust reader's ``Metadata::validate``, which we follow):
8 bytes of little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the data; each tensor's bytes are ``end - begin ==
prod(shape) * itemsize`` inside the data section, no two tensors overlapping.

Everything a header says is bounded here by the file it came with (``limits``): the header by 100 MB,
the number of entries, the nesting (a valid header is three levels deep), every dimension by MLX's
32-bit shapes and every size by the file's real size. A file that passes cannot make the loader
allocate more than the file holds, and ``mx.load`` only ever sees headers that passed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..limits import MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES, MAX_TENSORS
from .tensors import DTYPE_BYTES, TensorInfo

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [k for k, _ in pairs]
        duplicate = next(k for i, k in enumerate(names) if k in names[:i])
        raise ValueError(f"the name {duplicate[:80]!r} appears twice")
    return out


def _header_json(path: Path, raw: bytes) -> dict[str, Any]:
    # Count entries before parsing: 1.3 million of them would take ~1 GB of Python objects to find out.
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise CheckpointError(f"{path}: safetensors header lists {entries:,} tensors (at most {MAX_TENSORS:,} "
                              "are read); the file is corrupt or not a model")  # fmt: skip
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    return header


def _entry(path: Path, name: str, meta: Any, data_start: int, data_size: int) -> tuple[TensorInfo, int, int]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors entry {name[:80]!r}: {what}; re-download it")

    if not isinstance(meta, dict) or set(meta) != _ENTRY_KEYS:
        raise bad("expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r:.40} is not a string")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name[:80]!r} has dtype {dtype[:20]!r}, which edge-llm cannot read "
                              f"({', '.join(DTYPE_BYTES)})")  # fmt: skip
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d, MAX_DIM) for d in shape):
        raise bad(f"shape {shape!r:.60} is not a list of at most {MAX_DIMS} sizes below 2^31")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o, data_size) for o in offsets):
        if isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, 2**64) for o in offsets):
            raise CheckpointError(f"{path}: truncated (tensor {name[:80]!r} lies past the end of the file, "
                                  f"{data_size:,} bytes of data); re-download the checkpoint")  # fmt: skip
        raise bad(f"data_offsets {offsets!r:.60} are not two byte offsets in the file")
    begin, end = offsets
    info = TensorInfo(name, path, dtype, tuple(shape), data_start + begin)
    if end - begin != info.nbytes:
        raise bad(f"{end - begin:,} bytes of data for shape {tuple(shape)} in {dtype} ({info.nbytes:,} bytes)")
    return info, begin, end


def _is_int(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and data offsets of one file, checking it is complete and consistent on disk."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weight shard is missing; re-download the checkpoint")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (says {n:,} bytes, the file has "
                                  f"{size:,}); re-download it")  # fmt: skip
        raw = f.read(n)
    header = _header_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}  # MLX writes null when there is none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for name, meta in header.items():
        info, begin, end = _entry(path, name, meta, 8 + n, data_size)
        tensors[name] = info
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensors {first[:80]!r} and {second[:80]!r} "
                                  "share bytes); re-download it")  # fmt: skip
    return tensors
