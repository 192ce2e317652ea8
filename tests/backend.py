"""The backend this suite runs on, as edge-llm detects it (MLX on Metal, CUDA or the CPU).

Facts that depend on the backend are checked against ``BACKEND``; facts that hold only on the CPU (its
float32 compute over half-precision weights, its dtype policy) are skipped elsewhere with ``cpu_only``.
"""

from __future__ import annotations

import pytest

from edge_llm.machine.backend import backend_name

BACKEND = backend_name()


def cpu_only(why: str) -> pytest.MarkDecorator:
    """Skips a test off the CPU backend, saying which CPU fact it checks."""
    return pytest.mark.skipif(BACKEND != "cpu", reason=f"a fact of MLX's CPU backend ({why}); this is {BACKEND}")
