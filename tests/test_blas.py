"""OpenBLAS preloading: used when present, off with EDGE_LLM_OPENBLAS=0, harmless when missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edge_llm.machine.blas import find_openblas

PROBE = (
    "import edge_llm, numpy as np, mlx.core as mx\n"
    "from edge_llm.machine.backend import blas_library\n"
    "a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)\n"
    "b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)\n"
    "assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-3)\n"
    "print(blas_library())\n"
)


def probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS (make test installs libopenblas0-pthread)")
def test_openblas_used_when_present():
    assert probe().startswith("OpenBLAS")


def test_disabled_by_environment():
    out = probe(EDGE_LLM_OPENBLAS="0")
    assert "OpenBLAS (" not in out and "disabled" in out


def test_missing_library_does_not_crash():
    assert "OpenBLAS (" not in probe(EDGE_LLM_OPENBLAS="/nonexistent/libopenblas.so.0")
