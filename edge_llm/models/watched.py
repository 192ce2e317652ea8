"""Modules whose parameter and child changes are counted, so that what was built from them can tell it is stale.

``fused_stack`` builds a decode plan that holds a dense stack's weights; it must follow any later change (weights
loaded or updated, a module swapped in, as calibration's capturing ones). Comparing the identity of every module and
array each step cost ~250 us on SmolLM2 (a thousand dict lookups, cold after the step's weights passed through the
caches); instead every module of the layers a plan takes is a ``Watched`` one, and any change to one bumps a counter
the plan compares. MLX's modules are dicts: ``update``, attribute assignment and ``load_weights`` all write through
``__setitem__``.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

_changes = 0


def changes() -> int:
    """How many times a watched module's entries (parameters, children, array attributes) have changed."""
    return _changes


def _bump() -> None:
    global _changes
    _changes += 1


class Watched(nn.Module):
    """An ``nn.Module`` whose changes bump ``changes()`` (a mixin: list it first among the bases)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        _bump()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        _bump()
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            _bump()
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> Any:  # nn.Module.update: writes through __setitem__ as well
        _bump()
        return super().update(*args, **kwargs)
