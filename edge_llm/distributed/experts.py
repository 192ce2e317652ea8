"""Expert parallelism: each rank holds a contiguous slice of every MoE layer's routed experts.

``LocalExperts`` takes a switch module's place (``switch_mlp``, the same parameter paths, so loading and
quantization see nothing new). Router ids outside this rank's slice run through its first expert and are
zeroed; one ``all_sum`` over the ranks then gives every rank the outputs of all k chosen experts,
``[..., k, D]``. Each (token, expert) output is computed on exactly one rank and added to zeros elsewhere, so
the sum is exact: the MoE block weights and sums the k outputs just as a single process does, bit for bit
(the CPU kernels compute a row the same whatever rows surround it).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.switch import SwitchGLU, SwitchLinear


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
        local = indices.astype(mx.int32) - self._start
        mine = (local >= 0) & (local < self._count)
        y = super().__call__(x, mx.where(mine, local, 0).astype(indices.dtype))  # [..., k, D]
        y = mx.where(mine[..., None], y, mx.zeros((), y.dtype))
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
