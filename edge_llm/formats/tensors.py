"""What a tensor is, whatever file it comes from.

``TensorInfo`` is a tensor's header as the model will hold it (``Checkpoint.tensors``: what ``load_weights``
returns, named as Hugging Face names it). ``StoredTensor`` is where its bytes lie in its file, as the file
stores them (``Checkpoint.stored_tensors()``), for reading a tensor, or a slice of one, with ``os.pread``.
Dtypes are spelled as safetensors spells them; a stored GGUF tensor keeps its ggml type name (``Q4_1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# bytes per element of each safetensors dtype edge-llm reads
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors spelling: F32, BF16, U32, F8_E4M3, ...
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset of its data in ``file`` when the file stores it as described

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor's bytes in its file: ``os.pread(fd, nbytes, offset)`` returns exactly them."""

    name: str  # as the file names it (a GGUF file: ``blk.0.ffn_gate_exps.weight``)
    file: Path
    offset: int  # absolute, from the start of the file
    nbytes: int
    dtype: str  # as the file's format names it: ``BF16``, ``U32``, ``F8_E4M3``; GGUF: ``F16``, ``Q4_1``, ``Q6_K``
    shape: tuple[int, ...]  # outermost first, in values (a Q4_1 matrix: its [rows, columns] of weights)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


# safetensors dtype -> the numpy type of its bytes; BF16 travels as its uint16 bit pattern and F8 as uint8 codes
# (what ``mx.load`` hands over for them too)
_NUMPY_OF = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def safetensors_array(data: np.ndarray, dtype: str, shape: tuple[int, ...]):
    """Raw little-endian bytes of a safetensors tensor (or of a slice along its outermost axis) as the MLX
    array ``mx.load`` gives for it."""
    import mlx.core as mx

    array = mx.array(np.frombuffer(data, dtype=_NUMPY_OF[dtype]).reshape(shape))
    return array.view(mx.bfloat16) if dtype == "BF16" else array
