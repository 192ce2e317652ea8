"""Expert parallelism: each rank holds a contiguous slice of every MoE layer's routed experts.

``LocalExperts`` takes a switch module's place (``switch_mlp``, the same parameter paths, so loading and
quantization see nothing new). It reads the router's choice (one sync per MoE layer), runs only the (token,
expert) pairs whose expert it holds, and puts their outputs in a zero buffer ``[..., k, D]``; one ``all_sum``
over the ranks then gives every rank the outputs of all k chosen experts. Each (token, expert) output is
computed on exactly one rank and added to zeros elsewhere, so the sum is exact: the MoE block weights and sums
the k outputs just as a single process does, bit for bit (the CPU kernels compute a row the same whatever rows
surround it).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.switch import SwitchGLU, SwitchLinear
from .protocol import count_sent


class LocalExperts(SwitchGLU):
    """Experts ``start .. start + count`` of a layer's ``E``; outputs summed over the ranks."""

    def __init__(self, switch: SwitchGLU, start: int, count: int, group: mx.distributed.Group):
        nn.Module.__init__(self)
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = switch[name]
            _, out_dims, in_dims = old.weight.shape
            self[name] = SwitchLinear(in_dims, out_dims, count, bias="bias" in old)
        self.act = switch.act
        self._start, self._count, self._group = start, count, group

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k, dim = indices.shape[-1], x.shape[-1]
        local = np.array(indices, dtype=np.int64).reshape(-1) - self._start  # [N * k]
        pairs = np.flatnonzero((local >= 0) & (local < self._count))  # the (token, slot) pairs run here
        y = mx.zeros((local.size, dim), x.dtype)
        if pairs.size:
            rows = x.reshape(-1, dim)[mx.array(pairs // k)]  # [m, D]
            out = super().__call__(rows, mx.array(local[pairs], dtype=indices.dtype)[:, None])  # [m, 1, D]
            y[mx.array(pairs)] = out[:, 0, :]
        y = y.reshape(*indices.shape, dim)  # [..., k, D]
        count_sent(y.nbytes, self._group)
        return mx.distributed.all_sum(y, group=self._group)


def localize_experts(model: nn.Module, start: int, count: int, group: mx.distributed.Group) -> list[str]:
    """Puts ``LocalExperts`` in place of every switch module (before its weights are loaded); returns their
    paths."""
    found = {path: m for path, m in model.named_modules() if type(m) is SwitchGLU}
    if not found:
        return []
    from mlx.utils import tree_unflatten

    model.update_modules(tree_unflatten([(p, LocalExperts(m, start, count, group)) for p, m in found.items()]))
    return list(found)


def slice_experts(weights: dict[str, mx.array], switch_paths: list[str], start: int, end: int) -> None:
    """Cuts each stacked expert tensor ``[E, ...]`` to this rank's ``[start:end]``, one tensor evaluated at a
    time (a stacked or pre-stacked tensor is read once, then only the slice stays)."""
    prefixes = tuple(f"{p}." for p in switch_paths)
    for name in [k for k in weights if k.startswith(prefixes)]:
        weights[name] = mx.contiguous(weights[name][start:end])
        mx.eval(weights[name])
