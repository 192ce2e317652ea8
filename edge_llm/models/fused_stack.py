"""A dense decoder stack's decode step made in one call into the CPU kernels.

Decoding on the CPU, a dense layer is two ops (``Attention.residual_block``: ``kernels.attention_block``;
``MLP.residual_block``: ``kernels.mlp_block``). Making them from Python cost ~40 us per layer and step (SmolLM2: 1.2 ms
of a ~10 ms step, on two cores taken from the kernels running the step before). ``fused_layers`` makes the same ops
for every layer in one call of ``kernels.DecodePlan``, which holds the layers' weights from the first step on; per
step Python hands it only the caches. The same ops, so the same bits. The plan is kept on the stack with the layers it
was built from and ``watched.changes()`` then: a weight replaced or a module swapped in (calibration's capturing
ones) makes a new plan, or none.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from . import watched
from .cache import KVCache
from .layers import DEQUANTIZE_MIN_ROWS
from .watched import Watched


class _Plan:
    """A DecodePlan (or None: the stack does not qualify) and what it was built from."""

    def __init__(self, stack: nn.Module, plan: Any | None):
        self.plan = plan
        self.layers = list(stack.layers)
        self.changes = watched.changes()
        self.attentions = [layer.self_attn for layer in self.layers] if plan is not None else []
        # rope's arguments where they do not change with the position (all variants but the dynamic one)
        fixed = [a.rope.fixed_kernel_args() for a in self.attentions]
        self.angles = None if None in fixed else [rope[2] for rope in fixed]
        self.rope_scales = None if None in fixed else [rope[3] for rope in fixed]
        self.windows = [a.sliding_window for a in self.attentions if a.sliding_window is not None]

    def current(self, stack: nn.Module) -> bool:
        """Whether the stack still holds the layers this plan was built from, unchanged (``watched``)."""
        layers = stack.layers
        return (self.changes == watched.changes() and len(layers) == len(self.layers)
                and all(a is b for a, b in zip(layers, self.layers, strict=True)))


def _all_watched(module: nn.Module) -> bool:
    """Whether every module under ``module`` (itself included) counts its changes (``watched.Watched``)."""
    todo: list[Any] = [module]
    while todo:
        item = todo.pop()
        if isinstance(item, nn.Module):
            if not isinstance(item, Watched):
                return False
            todo.extend(item.children().values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
    return True


def _build(stack: nn.Module, h: mx.array) -> _Plan:
    plan = kernels.decode_plan()
    for layer in stack.layers if plan is not None else ():
        args = layer.plan_args(h) if hasattr(layer, "plan_args") and _all_watched(layer) else None
        if args is None:
            return _Plan(stack, None)
        plan.add_layer(**args)
    return _Plan(stack, plan if plan is not None and len(plan) else None)


def _step(kept: _Plan, cache: list, batch: int, length: int) -> tuple[list, list, list, list] | None:
    """(k buffers, v buffers, rope angles, position scales) for this step, each cache with room for ``length`` more
    rows; None where a layer's step does not apply (see ``Attention.step_buffers``)."""
    offset = cache[0].offset
    if any(offset + length > window for window in kept.windows):
        return None
    if kept.angles is not None:  # the fast path: fixed rope, buffers with room
        rooms = [c.room(length) if c.offset == offset else None for c in cache]
        if None not in rooms:
            return [r[0] for r in rooms], [r[1] for r in rooms], kept.angles, kept.rope_scales
    steps = [a.step_buffers(c, batch, length) if c.offset == offset else None
             for a, c in zip(kept.attentions, cache, strict=True)]
    if None in steps:
        return None
    return ([b[0] for _, b in steps], [b[1] for _, b in steps], [rope[2] for rope, _ in steps],
            [rope[3] for rope, _ in steps])


def fused_layers(stack: nn.Module, h: mx.array, cache: list | None) -> mx.array | None:
    """``h`` through every layer of ``stack`` (their caches extended), or None where the plan does not apply: the
    caller runs the layers one by one."""
    if (cache is None or h.ndim != 3 or h.dtype != mx.float32 or h.shape[0] * h.shape[1] >= DEQUANTIZE_MIN_ROWS
            or h.shape[1] > kernels.ATTENTION_MAX_QUERIES or not kernels.active()):
        return None
    kept = vars(stack).get("_decode_plan")
    if kept is None or not kept.current(stack):
        kept = _build(stack, h)
        object.__setattr__(stack, "_decode_plan", kept)  # a plain attribute, not a parameter or child module
    if kept.plan is None or len(cache) != len(kept.layers) or not all(isinstance(c, KVCache) for c in cache):
        return None
    batch, length = h.shape[:2]
    step = _step(kept, cache, batch, length)
    if step is None:
        return None
    h, keys, values = kept.plan.run(h, *step, cache[0].offset)
    for c, k, v in zip(cache, keys, values, strict=True):
        c.advance(k, v, length)
    return h
