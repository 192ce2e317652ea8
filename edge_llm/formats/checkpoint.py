"""The ``Checkpoint`` interface: what every checkpoint format answers, so no caller asks which format it is.

``open.open_checkpoint(path)`` picks the reader: ``folder.FolderCheckpoint`` for a Hugging Face folder
(config.json + safetensors), ``gguf.checkpoint.GGUFCheckpoint`` for a GGUF file. Reading one is cheap:
config and tensor headers only. The estimator, ``info`` and the loader all start there; weights are
only touched by ``load_weights`` (lazily). Every problem becomes a ``CheckpointError`` with one line
naming the path and what to do.

What a checkpoint tells, whatever its format:

- ``config`` (Hugging Face keys, both rope styles normalized) and ``tensors``: every tensor's header as
  the model will hold it (``TensorInfo``, Hugging Face names, packed ``U32`` + scales/biases where the
  ``quantization`` block in the MLX format says a module stays quantized);
- ``stored_tensors()``: where each tensor's bytes lie in its file (``StoredTensor``: file, offset, length,
  dtype and shape as stored), for reads of single tensors or experts with ``os.pread``;
- ``load_weights()``, ``tokenizer()``, ``sampling_config()``: the weights (lazily), the tokenizer and the
  sampling settings its files recommend;
- for a converter: ``quantized`` (it holds already-quantized tensors), ``module_bits()`` and
  ``describe_quantization()``, ``dequantized()`` (the same tensors seen in float) and
  ``load_float_weights()`` (float weights plus the packed originals to copy exactly), ``hf_config()`` and
  ``side_files()`` (what a converted folder starts from).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from .tensors import FLOAT_DTYPES, StoredTensor, TensorInfo

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

# A module's already-quantized weight in MLX's affine form: packed uint32 codes, scales, biases.
PackedTensor = tuple[mx.array, mx.array, mx.array]


class SideFiles(Protocol):
    """What a converted folder gets from its source besides weights and config.json (tokenizer files,
    chat templates, README, licence...)."""

    @property
    def nbytes(self) -> int:
        """The bytes they take (0 where only known once written)."""

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        """(name, why) of the source's files that are left out."""

    def write(self, dest: Path) -> None:
        """Writes them into the folder ``dest``."""


@dataclass
class Checkpoint(ABC):
    """A checkpoint read cheaply: normalized config and every tensor's header."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)
    format_name: ClassVar[str]  # how a person calls the files' format: "safetensors", "GGUF"

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def config_path(self) -> Path:
        """Where the config came from, for error messages (a GGUF checkpoint: the file itself)."""
        return self.path / "config.json"

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The MLX quantization block: which modules the loaded model keeps quantized, at which bits."""
        return self.config.get("quantization")

    @property
    def weight_files(self) -> list[Path]:
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    @property
    def dtype(self) -> str:
        """The float dtype holding most parameters (``BF16``, ``F16``, ``F32``...)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_DTYPES or t.dtype.startswith("F8"):
                counts[t.dtype] = counts.get(t.dtype, 0) + t.size
        return max(counts, key=counts.__getitem__) if counts else "F32"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def quantized(self) -> bool:
        """Whether the files hold already-quantized (packed) tensors."""
        return bool(self.quantization)

    def quantized_bits(self, module: str) -> int | None:
        """Bits of a module the quantization block quantizes (its own entry or the default), None when it is
        not quantized."""
        q = self.quantization
        if not q or f"{module}.scales" not in self.tensors:
            return None
        override = q.get(module)
        return (override or {}).get("bits", q["bits"]) if isinstance(override, dict) else q["bits"]

    def module_bits(self) -> dict[str, int | None]:
        """The bits each weight matrix is stored in, by module path; None for a float matrix."""
        return {name[: -len(".weight")]: self.quantized_bits(name[: -len(".weight")])
                for name, info in self.tensors.items() if name.endswith(".weight") and len(info.shape) >= 2}

    @property
    def quantized_group_size(self) -> int | None:
        """Values per scale of the tensors the files hold quantized (re-quantizing at this group size can copy
        them exactly); None when nothing is quantized."""
        q = self.quantization
        return int(q["group_size"]) if q else None

    def describe_quantization(self) -> str | None:
        """``info``'s quantization line (``4-bit affine, group 64``); None when nothing is quantized."""
        q = self.quantization
        return f"{q['bits']}-bit {q.get('mode', 'affine')}, group {q['group_size']}" if q else None

    def dequantized(self) -> Checkpoint | None:
        """The same checkpoint with every tensor seen in float (float headers, no quantization block, weights
        dequantized lazily), what a converter re-quantizing it reads; itself when nothing is quantized; None
        where the format has no float view of its quantized tensors (an MLX-quantized folder)."""
        return None if self.quantized else self

    def load_float_weights(self) -> tuple[dict[str, mx.array], dict[str, PackedTensor]]:
        """The weights in float (a converter's input, lazily), and the packed originals of the ones that were
        quantized, by module path, which a converter may copy exactly instead of re-quantizing."""
        if self.quantization:
            raise CheckpointError(f"{self.path}: holds quantized weights; read them through dequantized()")
        return self.load_weights(), {}

    def stored_tensors(self) -> dict[str, StoredTensor]:
        """Where each tensor's bytes lie in its file, by the name ``load_weights`` gives it (before any join
        or rename a model's ``sanitize`` does). The bytes are as stored: a format's own encoding, no cast."""
        stored = {}
        for name, t in self.tensors.items():
            if t.offset is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is not in a local file; pull the model first")
            stored[name] = StoredTensor(name, t.file, t.offset, t.nbytes, t.dtype, t.shape)
        return stored

    @abstractmethod
    def load_weights(self, skip: Callable[[str], bool] | None = None) -> dict[str, mx.array]:
        """All tensors, lazily, named and shaped as ``tensors`` says: nothing is read until evaluated.

        Tensors whose name ``skip`` accepts come back as lazy zeros of their shape and dtype, never read:
        a caller that will drop them (expert streaming) keeps the whole pipeline and no memory for them."""

    @abstractmethod
    def decode_stored(self, name: str, stored: StoredTensor, data: np.ndarray,
                      shape: tuple[int, ...]) -> dict[str, mx.array]:
        """The arrays ``load_weights`` gives for ``data``: the bytes of the stored tensor ``name`` (as
        ``stored_tensors()`` keys it), or of a slice of it along its outermost axis, whose shape as stored is
        ``shape``. By name: the tensor itself, and for a format's own quantized blocks also its
        ``scales``/``biases`` in MLX's affine form."""

    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the checkpoint carries; raises TokenizerError when it has none or a broken one."""

    @abstractmethod
    def sampling_config(self) -> tuple[str, dict[str, Any]]:
        """The sampling settings the model's files recommend, and where they were found."""

    @abstractmethod
    def hf_config(self) -> dict[str, Any]:
        """config.json as Hugging Face writes it, for a converted folder (whose converter adds its own
        quantization block)."""

    @abstractmethod
    def side_files(self) -> SideFiles:
        """The files besides weights and config.json that a converted folder gets from this checkpoint."""


_MX_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8",
              "I32": "int32", "U16": "uint16", "I8": "int8", "F8_E4M3": "uint8", "F8_E5M2": "uint8"}  # fmt: skip


def lazy_zeros(info: TensorInfo) -> mx.array:
    """A placeholder for a tensor that is not read: lazy zeros of its in-memory shape and dtype."""
    return mx.zeros(info.shape, dtype=getattr(mx, _MX_DTYPES.get(info.dtype, "float32")))


def commonest_bits(bits_of: dict[str, int | None]) -> int | None:
    """The bits most matrices have (ties: the first seen); None when none is quantized."""
    counts = Counter(b for b in bits_of.values() if b is not None)
    return counts.most_common(1)[0][0] if counts else None
