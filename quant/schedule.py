"""Which source tensors a conversion reads together: one decoder layer at a time, where the architecture's
``sanitize`` allows (it joins per-expert tensors into stacked ones, renames, drops), so memory holds one
layer's tensors, not the model's."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import mlx.core as mx
from mlx.utils import tree_flatten

from edge_llm.errors import CheckpointError
from edge_llm.formats.checkpoint import Checkpoint
from edge_llm.models.base import CausalLM

from .plan import Plan
from .recipes import layer_of

log = logging.getLogger(__name__)


def _groups(names: Iterable[str]) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _sanitize(model: CausalLM, weights: dict[str, mx.array], names: list[str]) -> dict[str, mx.array]:
    return model.sanitize({k: weights[k] for k in names})


def _check_tensor(checkpoint: Checkpoint, name: str, array: mx.array, expected: tuple[int, ...]) -> None:
    if tuple(array.shape) != expected:
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} has shape {tuple(array.shape)}, "
                              f"config implies {expected}")
    if not mx.issubdtype(array.dtype, mx.floating):
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} is {array.dtype}, expected float weights")


def schedule(model: CausalLM, checkpoint: Checkpoint, weights: dict[str, mx.array],
             plan: Plan) -> list[tuple[list[str], list[str]]]:
    """Source groups and the parameters each produces, checked lazily (no data read).

    Sanitizing layer by layer is what keeps memory flat; every architecture's ``sanitize`` works on
    one layer's tensors. Should one not (its outputs differ from the whole-model result), all tensors
    form a single group: slower on memory, still correct.
    """
    expected = {t.param for t in plan.tensors if t.kind in ("float", "packed")}
    shapes = {name: p.shape for name, p in tree_flatten(model.parameters())}
    groups, produced = [], set()
    for names in _groups(weights).values():
        out = [k for k in _sanitize(model, weights, names) if k in expected]
        if produced.intersection(out):
            break
        produced.update(out)
        groups.append((names, sorted(out)))
    if produced != expected:
        log.info("%s: sanitize needs the whole model at once; converting in one group", checkpoint.path)
        groups = [(list(weights), sorted(set(_sanitize(model, weights, list(weights))) & expected))]
    missing = sorted(expected - {k for _, out in groups for k in out})
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint.path}: checkpoint lacks tensor {missing[0]!r}{more}; re-download it")
    for names, out in groups:
        arrays = _sanitize(model, weights, names)
        for k in out:
            _check_tensor(checkpoint, k, arrays[k], shapes[k])
    return groups
