"""What each linear layer of a decoder layer reads, while the layer runs on the calibration tokens.

``capture(layer, paths)`` swaps the named modules for recorders for the duration of a ``with`` block and
restores them after. A dense linear's recorder sums ``H = XᵀX`` over every call (float64, from NumPy's
float32 products); a stack of routed experts (``SwitchLinear``) keeps the rows it was given with the expert
each row went to, so every expert gets the ``H`` of the tokens routed to it (``expert_hessian``). Layers that
read the same input array (q/k/v, gate/up) are told apart by identity, so their GPTQ can share one
factorisation (``shared_inputs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from edge_llm.models.switch import SwitchLinear


class Record:
    """What a recorder saw (a plain object: an ``nn.Module`` would take lists and arrays for parameters)."""

    def __init__(self) -> None:
        self.inputs: list[mx.array] = []  # per call: the input array itself (identity shows sharing)
        self.h: np.ndarray | None = None  # dense: the sum of XᵀX
        self.rows: list[np.ndarray] = []  # experts: the rows, and the expert each went to
        self.experts: list[np.ndarray] = []

    def tokens_per_expert(self, num_experts: int) -> np.ndarray:
        return np.bincount(np.concatenate(self.experts), minlength=num_experts)

    def expert_hessian(self, expert: int) -> np.ndarray:
        h = np.zeros((self.rows[0].shape[1],) * 2)
        for rows, experts in zip(self.rows, self.experts, strict=True):
            chosen = rows[experts == expert]
            h += chosen.T @ chosen
        return h


class _Recorder(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.record = Record()


class LinearInputs(_Recorder):
    """Wraps an ``nn.Linear``: sums XᵀX of its inputs."""

    def __call__(self, x: mx.array) -> mx.array:
        r = self.record
        r.inputs.append(x)
        flat = np.array(x.reshape(-1, x.shape[-1]).astype(mx.float32))
        gram = (flat.T @ flat).astype(np.float64)
        r.h = gram if r.h is None else r.h + gram
        return self.module(x)


class ExpertInputs(_Recorder):
    """Wraps a ``SwitchLinear``: keeps (rows, expert of each row)."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        r = self.record
        r.inputs.append(x)
        # x is [..., 1 or k, 1, D] against indices [..., k], or sorted rows [N*k, 1, D] against [N*k]
        rows = mx.broadcast_to(x, (*indices.shape, 1, x.shape[-1])).reshape(-1, x.shape[-1])
        r.rows.append(np.array(rows.astype(mx.float32)))
        r.experts.append(np.array(indices.flatten()))
        return self.module(x, indices, sorted_indices)


def recorder_for(module: nn.Module) -> _Recorder | None:
    if isinstance(module, SwitchLinear):
        return ExpertInputs(module)
    if isinstance(module, nn.Linear):
        return LinearInputs(module)
    return None


@contextmanager
def capture(layer: nn.Module, paths: list[str]) -> Iterator[dict[str, _Recorder]]:
    """Recorders in place of the modules at ``paths`` (relative to ``layer``) that have one, by path."""
    modules = dict(layer.named_modules())
    recorders = {p: r for p in paths if (r := recorder_for(modules[p])) is not None}
    layer.update_modules(tree_unflatten(list(recorders.items())))
    try:
        yield recorders
    finally:
        layer.update_modules(tree_unflatten([(p, r.module) for p, r in recorders.items()]))


def shared_inputs(recorders: dict[str, _Recorder]) -> list[list[str]]:
    """The recorded paths grouped by identical inputs on every call (q/k/v; gate/up), in first-seen order."""
    groups: list[list[str]] = []
    for path, rec in recorders.items():
        for group in groups:
            first, mine = recorders[group[0]].record.inputs, rec.record.inputs
            if type(rec) is type(recorders[group[0]]) and len(first) == len(mine) and all(
                    a is b for a, b in zip(first, mine, strict=True)):
                group.append(path)
                break
        else:
            groups.append([path])
    return groups
