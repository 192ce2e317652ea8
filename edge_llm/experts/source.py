"""How to read one expert of a MoE layer from the checkpoint's files, as the resident load would hold it.

For every stacked parameter of a switch module (``...switch_mlp.gate_proj.weight`` ``[E, ...]`` and its
``scales``/``biases``), a ``ParamSource`` names the bytes of expert ``e`` (a row of a stacked tensor, or a
tensor of its own: ``provenance``) and turns them into exactly the array row ``e`` of the resident
parameter would be: the format decodes them (``Checkpoint.decode_stored``: safetensors dtypes, GGUF blocks
into MLX's affine form), FP8 blocks are dequantized as on load, and the loader's dtype policy casts them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..formats.checkpoint import Checkpoint
from ..formats.fp8 import SCALE_SUFFIX, block_size, dequantize_block_fp8
from ..formats.tensors import StoredTensor
from .provenance import FusedHalf, PerExpert, Renamed, Source
from .reads import ByteRange, ExpertFiles

# (parameter name, array as read) -> the array as the resident model holds it (the loader's dtype policy)
Cast = Callable[[str, mx.array], mx.array]


@dataclass(frozen=True)
class _Tensor:
    """Expert ``e``'s part of one stored tensor: a row of a stacked one, or all of a per-expert one."""

    key: str  # the name stored_tensors() gives it
    stored: StoredTensor
    stacked: bool

    def range(self, e: int) -> ByteRange:
        if not self.stacked:
            return ByteRange(self.stored.file, self.stored.offset, self.stored.nbytes)
        row = self.stored.nbytes // self.stored.shape[0]
        return ByteRange(self.stored.file, self.stored.offset + e * row, row)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape[1:] if self.stacked else self.stored.shape


@dataclass(frozen=True)
class ParamSource:
    """Expert ``e`` of one stacked parameter: which stored tensor(s), and which part of what they decode to."""

    parameter: str
    tensors: tuple[_Tensor, ...]  # one per expert for per-expert files, else one stacked tensor
    half: tuple[int, int] | None = None  # (part, parts) of a fused tensor's first axis

    def tensor(self, e: int) -> _Tensor:
        return self.tensors[e] if len(self.tensors) > 1 else self.tensors[0]


def param_source(checkpoint: Checkpoint, stored: dict[str, StoredTensor], parameter: str,
                 source: Source | None, experts: int) -> ParamSource:
    """Where expert rows of ``parameter`` live; CheckpointError when the files do not hold them per expert."""
    if isinstance(source, PerExpert):
        tensors = tuple(_Tensor(name, stored[name], stacked=False) for name in source.names)
        return ParamSource(parameter, tensors)
    name = source.name if isinstance(source, FusedHalf | Renamed) else parameter
    if name not in stored and parameter.endswith((".scales", ".biases")):
        name = parameter.rsplit(".", 1)[0] + ".weight"  # a format's own quantized blocks carry their scales
    if name not in stored or not stored[name].shape or stored[name].shape[0] != experts:
        raise CheckpointError(f"{checkpoint.path}: cannot stream {parameter!r}: its file holds no tensor with "
                              f"one row per expert ({experts}); run the model resident")
    half = (source.part, source.parts) if isinstance(source, FusedHalf) else None
    return ParamSource(parameter, (_Tensor(name, stored[name], stacked=True),), half)


class ExpertSource:
    """Reads experts of one switch module; ``load`` returns each expert's parameters as the bank holds them."""

    def __init__(self, checkpoint: Checkpoint, params: dict[str, ParamSource], cast: Cast, files: ExpertFiles,
                 compute: mx.Dtype):
        self.checkpoint, self.params, self.cast, self.files, self.compute = checkpoint, params, cast, files, compute
        self.stored = checkpoint.stored_tensors()
        self.fp8_block = block_size(checkpoint.config)
        self.widened: set[str] = set()  # parameters held wider than the resident model holds them

    def widened_to_compute(self, name: str, row: mx.array) -> mx.array:
        """A float expert matrix in the compute dtype where that is wider: the CPU computes half weights in float32,
        so the resident model upcasts the k experts a token uses at every step, and a prefill all of them at once
        (``models.switch.SwitchLinear``). A bank kept in float32 does neither: streaming never needs memory beyond
        its bank, and the values are the same (upcasting is exact)."""
        if mx.issubdtype(row.dtype, mx.floating) and row.dtype.size < self.compute.size and row.ndim >= 2:
            self.widened.add(name)
            return row.astype(self.compute)
        return row

    def _scale_of(self, t: _Tensor) -> _Tensor | None:
        if not t.stored.dtype.startswith("F8"):
            return None
        name = t.key + SCALE_SUFFIX
        if name not in self.stored:
            raise CheckpointError(f"{self.checkpoint.path}: FP8 tensor {t.key!r} has no {name!r}")
        return _Tensor(name, self.stored[name], t.stacked)

    def expert_bytes(self) -> int:
        """Bytes read per expert (all its parameters, as stored)."""
        seen = {}
        for p in self.params.values():
            for t in filter(None, (p.tensor(0), self._scale_of(p.tensor(0)))):
                seen[t.key] = t.range(0).nbytes
        return sum(seen.values())

    def read(self, experts: list[int]) -> dict[int, dict[tuple[str, int], np.ndarray]]:
        """The raw bytes of every tensor part each expert needs, read concurrently."""
        wanted: dict[tuple[str, int], _Tensor] = {}
        for e in experts:
            for p in self.params.values():
                for t in filter(None, (p.tensor(e), self._scale_of(p.tensor(e)))):
                    wanted[(t.key, e)] = t
        keys = list(wanted)
        data = dict(zip(keys, self.files.read([wanted[k].range(k[1]) for k in keys]), strict=True))
        return {e: {k: v for k, v in data.items() if k[1] == e} for e in experts}

    def decode(self, e: int, raw: dict[tuple[str, int], np.ndarray]) -> dict[str, mx.array]:
        """Expert ``e``'s parameters as the bank holds them, from its raw bytes (``read``)."""
        decoded: dict[tuple[str, int], dict[str, mx.array]] = {}
        return {name: self.widened_to_compute(name, self.cast(p.parameter, self._decode(p, e, raw, decoded)))
                for name, p in self.params.items()}

    def load(self, experts: list[int]) -> dict[int, dict[str, mx.array]]:
        """Every parameter of each expert in ``experts``, read concurrently and decoded."""
        loaded = {e: self.decode(e, raw) for e, raw in self.read(experts).items()}
        mx.eval(loaded)  # copied out of the read buffers before they are reused
        self.files.release()
        return loaded

    def _decode(self, p: ParamSource, e: int, data: dict, decoded: dict) -> mx.array:
        t = p.tensor(e)
        if (t.key, e) not in decoded:
            arrays = self.checkpoint.decode_stored(t.key, t.stored, data[(t.key, e)], t.shape)
            scale = self._scale_of(t)
            if scale is not None:
                s = self.checkpoint.decode_stored(scale.key, scale.stored, data[(scale.key, e)], scale.shape)
                arrays = {t.key: dequantize_block_fp8(arrays[t.key], s[scale.key], self.fp8_block)}
            decoded[(t.key, e)] = arrays
        arrays = decoded[(t.key, e)]
        # the tensor itself, or a format's own quantized blocks' scales/biases under the parameter's name
        array = arrays[p.parameter] if p.parameter in arrays else arrays[t.key]
        if p.half is not None:
            part, parts = p.half
            array = mx.split(array, parts, axis=0)[part]
        return array

