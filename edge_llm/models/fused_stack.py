"""A dense decoder stack's decode step made in one call into the CPU kernels.

Decoding on the CPU, a dense layer is two ops (``Attention.residual_block``: ``kernels.attention_block``;
``MLP.residual_block``: ``kernels.mlp_block``). Making them from Python cost ~40 us per layer and step (SmolLM2: 1.2 ms
of a ~10 ms step, on two cores taken from the kernels running the step before). ``fused_layers`` makes the same ops
for every layer in one call of ``kernels.DecodePlan``, which holds the layers' weights from the first step on; per
step Python hands it only the caches and the rope angles. The same ops, so the same bits. The plan is kept on the
stack with the identity of everything it was built from (modules and arrays): a weight replaced or a module swapped
in (calibration's capturing ones) makes a new plan, or none.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .cache import KVCache
from .layers import DEQUANTIZE_MIN_ROWS


class _Plan:
    """A DecodePlan (or None: the stack does not qualify) and what it was built from."""

    def __init__(self, stack: nn.Module, plan: Any | None):
        self.plan = plan
        self.layers = list(stack.layers)
        self.held = [held for layer in self.layers for held in _held(layer)]

    def current(self, stack: nn.Module) -> bool:
        """Whether the stack still holds exactly the layers, modules and arrays this plan was built from."""
        layers = stack.layers
        return (len(layers) == len(self.layers) and all(a is b for a, b in zip(layers, self.layers, strict=True))
                and all(container[key] is value for container, key, value in self.held))


def _held(module: nn.Module) -> list[tuple[Any, Any, Any]]:
    """(container, key, value) for every module and array under ``module``."""
    out, todo = [], [module]
    while todo:
        container = todo.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(value, (mx.array, nn.Module, list)):
                out.append((container, key, value))
            if isinstance(value, (nn.Module, list)):
                todo.append(value)
    return out


def _build(stack: nn.Module, h: mx.array) -> _Plan:
    plan = kernels.decode_plan()
    for layer in stack.layers if plan is not None else ():
        args = layer.plan_args(h) if hasattr(layer, "plan_args") else None
        if args is None:
            return _Plan(stack, None)
        plan.add_layer(**args)
    return _Plan(stack, plan if plan is not None and len(plan) else None)


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
    offset = cache[0].offset
    steps = []
    for layer, c in zip(kept.layers, cache, strict=True):
        step = layer.self_attn.step_buffers(c, batch, length) if c.offset == offset else None
        if step is None:
            return None
        steps.append(step)
    angles, scales = [rope[2] for rope, _ in steps], [rope[3] for rope, _ in steps]
    h, keys, values = kept.plan.run(h, [b[0] for _, b in steps], [b[1] for _, b in steps], angles, scales, offset)
    for c, k, v in zip(cache, keys, values, strict=True):
        c.advance(k, v, length)
    return h
