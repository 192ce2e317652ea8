"""One float parameter into the tensors its plan entries name, written straight to their shard.

A float entry is cast to the output's dtype; a quantized one goes through ``affine.quantize``; a source
tensor already in the planned affine form (a GGUF's Q4_0/Q4_1/Q8_0/... codes) is copied as it is. Every
value is checked finite, so a corrupt or overflowing tensor is named instead of written.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from edge_llm.errors import CheckpointError
from edge_llm.formats.checkpoint import PackedTensor
from edge_llm.machine.backend import DTYPE_NAMES

from . import affine
from .plan import MX_NAMES, PlannedTensor
from .writer import ShardWriter


def _corrupt(source: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: tensor {name!r} {what}; the checkpoint is corrupt or needs a wider dtype "
                           "(try --dtype bfloat16)")


def _finite(source: Path, name: str, array: mx.array, what: str) -> None:
    if not bool(mx.isfinite(array).all().item()):
        raise _corrupt(source, name, what)


def _dtype(t: PlannedTensor) -> mx.Dtype:
    return DTYPE_NAMES[MX_NAMES[t.dtype]]


def _copy_packed(tensors: list[PlannedTensor], packed: PackedTensor | None, writer: ShardWriter) -> int | None:
    """Writes a source tensor already in the planned affine form as it is, scales and offsets in the planned
    dtype; None when there is none or its form differs (equal shapes of codes and scales mean equal bits
    and group size)."""
    if packed is None or tensors[0].kind != "packed":
        return None
    w, scales, biases = packed
    if tuple(w.shape) != tensors[0].shape or tuple(scales.shape) != tensors[1].shape:
        return None
    dtype = _dtype(tensors[1])
    return sum(writer.write(t.name, a) for t, a in zip(tensors, (w, scales.astype(dtype), biases.astype(dtype)),
                                                       strict=True))


def convert_tensor(source: Path, name: str, w: mx.array, tensors: list[PlannedTensor], writer: ShardWriter,
                   original: PackedTensor | None = None) -> int:
    """Writes what the plan makes of parameter ``name`` (``tensors``: its entries, packed codes first) from
    its float value ``w``, or copies ``original``, its packed form in the source; returns the bytes written."""
    copied = _copy_packed(tensors, original, writer)
    if copied is not None:
        return copied
    mx.eval(w)
    first = tensors[0]
    if first.kind == "float":
        _finite(source, name, w, "holds NaN or infinite values")
        out = w.astype(_dtype(first))
        _finite(source, name, out, f"overflows {MX_NAMES[first.dtype]}")
        return writer.write(first.name, out)
    try:  # checks the weights, scales and offsets finite on its way
        packed, scales, biases = affine.quantize(w, first.spec.group_size, first.spec.bits, _dtype(tensors[1]))
    except affine.NonFinite as e:
        raise _corrupt(source, name, str(e)) from None
    return sum(writer.write(t.name, a) for t, a in zip(tensors, (packed, scales, biases), strict=True))
